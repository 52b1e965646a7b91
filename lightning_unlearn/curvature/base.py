"""The estimator interface: :class:`CurvatureEstimator`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["CurvatureEstimator"]


class CurvatureEstimator:
    """Base class: accumulates per-parameter sums of a Hessian-diagonal estimate over batches.

    Every estimator adds per-parameter *sums* over samples into a dict keyed by parameter name and returns how many
    samples it saw; dividing by the total count gives the estimate. A distributed caller can therefore all-reduce sums
    and counts and divide once.

    Attributes:
        name: Registry name (``exact``, ``mc``, ``hutchinson``, ``fisher``).
        target: What the estimate converges to: ``"hessian"``, ``"ggn"`` or ``"empirical_fisher"`` diagonal.
        deterministic: Whether the result is free of random draws.
    """

    name: ClassVar[str] = ""
    target: ClassVar[str] = ""
    deterministic: ClassVar[bool] = True

    @classmethod
    def options_for(
        cls, *, num_draws: int = 1, strict: bool = True, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    ) -> dict[str, Any]:
        """The constructor options that the profiling loop's uniform arguments stand for with this estimator.

        :func:`~lightning_unlearn.curvature.accumulate_diagonal`, ``profile_model`` and the ``SharpnessProfiler``
        callback take the same three arguments for every estimator; each class picks those it understands.

        Args:
            num_draws: Random draws: sampled labels per sample (``mc``) or probes per batch (``hutchinson``).
            strict: Refuse models for which the estimate would not be the Hessian diagonal (``exact``).
            loss_fn: The loss (``hutchinson``; ``None``: cross-entropy).
        """
        return {}

    def exact_for_model(self, model: nn.Module) -> bool:
        """Whether this estimator returns exactly the Hessian diagonal of the mean loss for ``model`` (no randomness).

        Args:
            model: The network, in the mode it will be profiled in (eval).
        """
        return False

    def options(self) -> dict[str, Any]:
        """The estimator's settings (shown by ``repr``)."""
        return {}

    def accumulate(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sums: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
    ) -> int:
        """Add this batch's per-parameter sums over samples into ``sums`` (in place) and return the batch size.

        Args:
            model: The network (put it in eval mode first; it is not modified).
            inputs: A batch of inputs on the model's device.
            targets: Class indices (``exact``/``mc``/``fisher``) or whatever ``loss_fn`` takes (``hutchinson``).
            sums: Accumulators keyed by parameter name; missing entries are created (zeros on the parameter's device,
                at least float32), so an empty dict will do.
            generator: CPU random generator for the stochastic estimators (a fixed default when ``None``).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
