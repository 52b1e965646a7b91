"""lightning-unlearn: sharpness-aware machine unlearning for PyTorch Lightning."""

__version__ = "0.1.0"
