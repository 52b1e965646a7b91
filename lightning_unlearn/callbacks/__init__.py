"""Lightning callbacks."""

from lightning_unlearn.callbacks.profiler import SharpnessProfiler

__all__ = ["SharpnessProfiler"]
