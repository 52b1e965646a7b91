"""``exact``: the exact GGN diagonal, which is the Hessian diagonal for piecewise-linear networks.

Why it is the Hessian diagonal: the Hessian of ``loss(f(x; w))`` is ``JᵀH_f J + Σ_c ∂loss/∂f_c ∇²f_c``. For a network
made of Linear/Conv layers, BatchNorm in eval mode and piecewise-linear operations (ReLU, max/avg pooling, residual
additions, ...), the output is piecewise linear in every *single* weight, so ``∂²f_c/∂w²`` is zero and the second
term has a zero diagonal: ``diag(H) = diag(GGN)`` exactly (almost everywhere). :func:`~lightning_unlearn.curvature.
checks.check_exact` verifies the modules of a model against that whitelist.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_unlearn.curvature.checks import check_exact, find_inexact_modules
from lightning_unlearn.curvature.squared import SquaredGradientEstimator

__all__ = ["ExactDiagonal", "exact_factor"]


class ExactDiagonal(SquaredGradientEstimator):
    """The exact GGN diagonal, which is the Hessian diagonal for piecewise-linear networks (see :func:`check_exact`).

    The per-sample cross-entropy Hessian w.r.t. the logits, ``diag(p) - p pᵀ``, has rank ``C - 1``; it is factored
    with ``C - 1`` columns (a Householder reflection that maps ``√p`` to a basis vector) which are backpropagated, so
    the cost is about ``C - 1`` backward passes to the layer outputs plus ``C - 1`` per-sample weight gradients.

    Args:
        strict: ``True``: refuse models for which ``diag(GGN) != diag(H)`` (:func:`check_exact` raises). ``False``:
            warn and compute the GGN diagonal anyway.
        **options: Memory and algorithm options of :class:`~lightning_unlearn.curvature.squared.
            SquaredGradientEstimator` (``max_memory_mb``, ``segments``, ``pooling``, ``conv_mode``,
            ``min_auto_budget_mb``, ``products``).
    """

    name = "exact"
    target = "ggn"
    deterministic = True

    def __init__(self, *, strict: bool = True, **options: Any) -> None:
        super().__init__(**options)
        self.strict = bool(strict)

    @classmethod
    def options_for(cls, *, num_draws: int = 1, strict: bool = True, loss_fn: Any = None) -> dict[str, Any]:
        return {"strict": strict}

    def options(self) -> dict[str, Any]:
        return {"strict": self.strict, **super().options()}

    def exact_for_model(self, model: nn.Module) -> bool:
        return not find_inexact_modules(model)

    def _check_model(self, model: nn.Module) -> None:
        if self.strict:
            check_exact(model, strict=True)
        # strict=False asks for the GGN diagonal whatever the network: the profile records which diagonal it holds
        # (``metadata["diagonal"]``), so nothing is warned about

    def _num_columns(self, num_classes: int) -> int:
        return num_classes - 1

    def _columns(self, logits: Tensor, targets: Tensor, draws: Tensor | None) -> Tensor:
        return exact_factor(logits)


def exact_factor(logits: Tensor) -> Tensor:
    """Columns ``S`` (m, C-1, C) with ``Σ_j s_j s_jᵀ = diag(p) - p pᵀ``, ``p = softmax(logits)``, in float64.

    ``diag(p) - p pᵀ = D (I - q qᵀ) D`` with ``q = √p``, ``D = diag(q)``. The Householder reflection
    ``H = I - 2 u uᵀ / uᵀu`` with ``u = q + e_k`` (``k`` = most likely class, so ``uᵀu ≥ 2``) maps ``q`` to ``-e_k``;
    hence ``I - q qᵀ = Σ_{j≠k} (H e_j)(H e_j)ᵀ`` and ``s_j = q ⊙ H e_j`` for ``j ≠ k``.

    Args:
        logits: (m, C) logits.
    """
    p = logits.detach().double().softmax(-1)
    m, c = p.shape
    q = p.sqrt()
    top = p.argmax(-1)
    rows = torch.arange(m, device=p.device)
    u = q.clone()
    u[rows, top] += 1.0
    scale = 1.0 / (1.0 + q[rows, top])  # 2 / uᵀu
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    householder = eye - scale[:, None, None] * u[:, :, None] * u[:, None, :]  # symmetric: columns = rows
    vectors = q[:, None, :] * householder  # row j = q ⊙ H e_j
    keep = torch.arange(c - 1, device=p.device)[None, :]
    keep = keep + (keep >= top[:, None]).long()  # (m, C-1): every j except top
    return vectors.gather(1, keep[:, :, None].expand(m, c - 1, c))
