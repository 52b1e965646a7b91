"""Linear layers (any number of leading dimensions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_unlearn.curvature._engine.base import LayerRule, Settings, add_row_squares

if TYPE_CHECKING:
    from lightning_unlearn.curvature._engine.capture import Capture


class LinearRule(LayerRule):
    """Linear layer.

    2-D input: per-sample gradients are rank one, ``Σ_c (g_c xᵀ)² = (Σ_c g_c²)(x²)ᵀ``. Inputs with extra dimensions
    (sequences): per-sample products ``g_cᵀ X`` over positions, squared.
    """

    @classmethod
    def elements(cls, capture: Capture, k: int, settings: Settings) -> int:
        return capture.output_shape[-1]

    def _setup(self, out_shape: torch.Size) -> None:
        x = self.x
        self.flat = x.dim() == 2
        if self.flat:
            self.g2 = self.buffers.take((self.m, out_shape[-1]), x).zero_()
        else:
            self.xt = x.reshape(self.m, -1, x.shape[-1])  # (m, T, in)

    def consume(self, j: int, grad: Tensor) -> None:
        module = self.module
        if self.flat:
            self.g2.addcmul_(grad, grad)
            return
        g = grad.reshape(self.m, -1, grad.shape[-1])  # (m, T, out)
        if module.bias is not None:
            self._acc("bias", (g.shape[-1],), g).add_(g.sum(1).square().sum(0))
        acc = self._acc("weight", (module.weight.numel(),), g)
        per_sample = module.weight.numel()
        step = max(1, min(self.m, self.buffers.chunk_elements // per_sample))
        for start in range(0, self.m, step):
            stop = min(self.m, start + step)
            prod = self.buffers.get("product", (stop - start, *module.weight.shape), g)
            torch.bmm(g[start:stop].transpose(1, 2), self.xt[start:stop], out=prod)
            add_row_squares(acc, prod.view(stop - start, per_sample))

    def finish(self) -> dict[str, Tensor]:
        weight = self.module.weight
        if self.flat:
            self._acc("weight", tuple(weight.shape), self.x).addmm_(self.g2.t(), self.x.square())
            if self.module.bias is not None:
                self._acc("bias", (self.g2.shape[1],), self.x).add_(self.g2.sum(0))
        if "weight" in self.sums:
            self.sums["weight"] = self.sums["weight"].view(weight.shape)
        return self.sums
