"""BatchNorm layers in eval mode (running statistics: every sample is normalised on its own)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_unlearn.curvature._engine.base import LayerRule, Settings
from lightning_unlearn.curvature._support import display

if TYPE_CHECKING:
    from lightning_unlearn.curvature._engine.capture import Capture


class BatchNormRule(LayerRule):
    """BatchNorm in eval mode: per-sample gradients ``Σ_spatial g·x̂`` (weight) and ``Σ_spatial g`` (bias)."""

    @classmethod
    def elements(cls, capture: Capture, k: int, settings: Settings) -> int:
        return math.prod(capture.output_shape[1:])

    @classmethod
    def check(cls, name: str, module: nn.Module, estimator: str) -> None:
        if module.training:
            raise ValueError(
                f"BatchNorm {display(name)} ({type(module).__name__}) is in training mode: put the model in eval "
                f"mode (profile_model/accumulate_diagonal do this) before the '{estimator}' estimator runs."
            )
        has_params = any(True for _ in module.parameters(recurse=False))
        if has_params and module.running_mean is None:
            raise ValueError(
                f"BatchNorm {display(name)} ({type(module).__name__}) has no running statistics "
                f"(track_running_stats=False), so samples interact; the '{estimator}' estimator needs per-sample "
                "gradients. Use estimator='hutchinson'."
            )

    @classmethod
    def inexact(cls, module: nn.Module) -> str | None:
        if module.training:
            return "is in training mode (batch statistics)"
        if module.running_mean is None:
            return "has no running statistics (track_running_stats=False)"
        return None

    def _setup(self, out_shape: torch.Size) -> None:
        module, x, buffers = self.module, self.x, self.buffers
        self.ch = out_shape[1]
        if module.weight is not None:
            shape = (1, self.ch, 1)
            mean = module.running_mean.to(x.dtype).view(shape)
            inv_std = torch.rsqrt(module.running_var.to(x.dtype).view(shape) + module.eps)
            xhat = buffers.take((self.m, self.ch, x[0].numel() // self.ch), x)
            torch.mul(torch.sub(x.reshape(self.m, self.ch, -1), mean, out=xhat), inv_std, out=xhat)
            self.xhat = xhat

    def consume(self, j: int, grad: Tensor) -> None:
        g = grad.reshape(self.m, self.ch, -1)
        if self.module.weight is not None:
            scratch = self.buffers.get("product", tuple(self.xhat.shape), g)
            per_sample = torch.mul(g, self.xhat, out=scratch).sum(-1)
            self._acc("weight", (self.ch,), g).add_(per_sample.square().sum(0))
        if self.module.bias is not None:
            self._acc("bias", (self.ch,), g).add_(g.sum(-1).square().sum(0))
