"""What every layer rule shares: the engine's settings and the :class:`LayerRule` base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_unlearn.curvature._engine.buffers import Buffers
    from lightning_unlearn.curvature._engine.capture import Capture, PoolLink

#: Values of :attr:`Settings.segments`.
SEGMENT_MODES = ("auto", "none", "all")
#: Values of :attr:`Settings.conv_mode` besides ``None`` (automatic).
CONV_MODES = ("stream", "stack", "gram")


@dataclass(frozen=True)
class Settings:
    """How the engine splits and computes its work (see :class:`~lightning_unlearn.curvature.squared.
    SquaredGradientEstimator` for the meaning of each option). None of them changes the results beyond floating-point
    rounding, except ``products=False``, which leaves the sums at zero.

    Attributes:
        segments: ``"auto"``, ``"none"`` or ``"all"``.
        pooling: Whether first convolutions followed by a ReLU and a max-pooling take the pooled products.
        conv_mode: ``None`` (chosen by cost) or one of :data:`CONV_MODES` for every convolution.
        min_auto_budget: Smallest automatic memory budget, in bytes.
        products: Whether the layer rules compute their per-sample products at all.
    """

    segments: str = "auto"
    pooling: bool = True
    conv_mode: str | None = None
    min_auto_budget: int = 32 * 2**20
    products: bool = True


def add_row_squares(acc: Tensor, rows: Tensor) -> None:
    """``acc += Σ_r rows[r]²`` for ``rows`` (R, P); ``rows`` is scratch and may be overwritten."""
    if rows.shape[1] >= 16384:
        for row in rows:  # memory-bound: one pass per row, no temporary
            acc.addcmul_(row, row)
    else:
        squares = rows.square_()
        acc.addmv_(squares.t(), torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device))


class LayerRule:
    """How one layer kind's sums of squared per-sample gradients are computed; one subclass per kind, registered in
    the ``{module type: rule}`` map :data:`~lightning_unlearn.curvature._engine.registry.RULES`.

    The class methods state the kind's facts, used before any backward pass: :meth:`elements` (what a layer's state
    keeps per sample, for the memory plan), :meth:`check` (refuse a layer the engine cannot handle), :meth:`inexact`
    (why the layer breaks ``diag(H) = diag(GGN)``) and :meth:`can_pool` (whether it may take pooled products).

    An instance is the state of one layer during one backward segment: ``consume(j, grad)`` is called (from a tensor
    hook) with the gradient of the layer output for column ``j`` (of the pooling output instead, for a convolution
    with a ``pool`` link); ``finish()`` returns the sums over samples and columns that still have to be added to the
    caller's accumulators, keyed by the parameter's local name. Accumulators in ``direct`` (the caller's own, when their
    dtype matches) are added to in place instead, which saves a parameter-sized temporary per layer.
    """

    @classmethod
    def elements(cls, capture: Capture, k: int, settings: Settings) -> int:
        """Elements per sample that a layer's state keeps during the backward passes of ``k`` columns."""
        raise NotImplementedError

    @classmethod
    def check(cls, name: str, module: nn.Module, estimator: str) -> None:
        """Raise ``ValueError`` if ``estimator`` cannot compute per-sample gradients of this layer (with or without
        parameters of its own)."""

    @classmethod
    def inexact(cls, module: nn.Module) -> str | None:
        """Why this layer breaks ``diag(H) = diag(GGN)`` under cross-entropy (``None``: it does not)."""
        return None

    @classmethod
    def can_pool(cls, module: nn.Module) -> bool:
        """Whether the layer may take pooled products when a ReLU and a max-pooling follow it alone."""
        return False

    def __init__(
        self,
        name: str,
        module: nn.Module,
        x: Tensor,
        out_shape: torch.Size,
        k: int,
        buffers: Buffers,
        settings: Settings,
        direct: dict[str, Tensor] | None = None,
        pool: PoolLink | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.x = x
        self.m = x.shape[0]
        self.k = k
        self.buffers = buffers
        self.settings = settings
        self.pool = pool
        self.sums: dict[str, Tensor] = {}
        self.direct = {
            pname: acc for pname, acc in (direct or {}).items() if acc.dtype == x.dtype and acc.is_contiguous()
        }
        self._setup(out_shape)

    def _setup(self, out_shape: torch.Size) -> None:
        """Subclass-specific preparation (buffers for the layer's output gradients)."""

    def _acc(self, pname: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if pname in self.direct:
            return self.direct[pname].view(shape)
        if pname not in self.sums:
            self.sums[pname] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.sums[pname]

    def consume(self, j: int, grad: Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, Tensor]:
        return self.sums


class NoProducts(LayerRule):
    """The state of every layer with ``products=False``: output gradients are dropped, nothing is summed (a timing
    diagnostic of the forward and backward passes alone)."""

    def consume(self, j: int, grad: Tensor) -> None:
        pass
