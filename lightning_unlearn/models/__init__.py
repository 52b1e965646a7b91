"""Classifier architectures and the Lightning module that trains them."""

from lightning_unlearn.models.classifier import ClassifierModule
from lightning_unlearn.models.cnn import MnistCNN
from lightning_unlearn.models.registry import ARCHITECTURES, build_model
from lightning_unlearn.models.resnet import ResNet18

__all__ = ["ARCHITECTURES", "ClassifierModule", "MnistCNN", "ResNet18", "build_model"]
