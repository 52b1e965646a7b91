"""``hutchinson``: Hutchinson's estimator of the true Hessian diagonal, for any twice-differentiable network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

from lightning_unlearn.curvature._engine.generic import math_attention
from lightning_unlearn.curvature._support import init_sums, make_generator
from lightning_unlearn.curvature.base import CurvatureEstimator

__all__ = ["HutchinsonDiagonal"]


class HutchinsonDiagonal(CurvatureEstimator):
    """Hutchinson's estimator of the true Hessian diagonal, ``E[v ⊙ Hv]`` with Rademacher ``v``.

    Works for any twice-differentiable network and any loss. Per batch, ``num_probes`` fresh probes are drawn; the
    Hessian-vector product is a double backward pass through the batch's mean loss, and the batch's estimate is
    weighted by its number of samples, so that the final estimate is that of the mean-loss Hessian diagonal. The
    variance of one probe's estimate of ``H_ii`` is ``Σ_{j≠i} H_ij²``.

    Args:
        num_probes: Rademacher probes per batch.
        loss_fn: ``loss_fn(logits, targets)`` with mean reduction (default: cross-entropy).
    """

    name = "hutchinson"
    target = "hessian"
    deterministic = False

    def __init__(self, *, num_probes: int = 1, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if int(num_probes) < 1:
            raise ValueError(f"`num_probes` must be >= 1, got {num_probes}.")
        self.num_probes = int(num_probes)
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn
        self.default_loss = loss_fn is None

    @classmethod
    def options_for(cls, *, num_draws: int = 1, strict: bool = True, loss_fn: Any = None) -> dict[str, Any]:
        return {"num_probes": num_draws, "loss_fn": loss_fn}

    def options(self) -> dict[str, Any]:
        loss = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        return {"num_probes": self.num_probes, "loss_fn": loss}

    def accumulate(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sums: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
    ) -> int:
        with math_attention():  # the fused attention kernels have no double backward
            return self._accumulate(model, inputs, targets, sums, generator)

    def _accumulate(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sums: dict[str, Tensor],
        generator: torch.Generator | None,
    ) -> int:
        init_sums(model, sums)
        n = int(inputs.shape[0])
        if n == 0:
            return 0
        if generator is None:
            generator = make_generator(0)
        params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
        names = list(params)
        leaves = [params[name] for name in names]
        loss = self.loss_fn(functional_call(model, params, (inputs,)), targets)
        if loss.dim() != 0:
            raise ValueError("`loss_fn` must return a scalar (mean reduction)")
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        # under cross-entropy every gradient depends on the parameters (through the softmax): one that does not was
        # cut off by an operation without a double backward, and its Hessian diagonal would silently read zero
        cut = [names[i] for i, g in enumerate(grads) if g is not None and not g.requires_grad]
        if cut and self.default_loss:
            raise ValueError(
                f"the gradient of {cut[:3]} cannot be differentiated a second time (an operation of the model has "
                "no double backward: a fused kernel, a once-differentiable custom function); Hutchinson's "
                "Hessian-vector products need it. Use estimator='exact' or 'mc' (first derivatives only)."
            )
        if not live:
            return n
        weight = n / self.num_probes
        draws = _draw_signs(self.num_probes, sum(leaves[i].numel() for i in live), generator, leaves[live[0]].device)
        for probe in range(self.num_probes):
            probes, offset = [], 0
            for i in live:
                size = leaves[i].numel()
                bits = draws[probe, offset : offset + size].view(leaves[i].shape)
                probes.append(bits.to(device=leaves[i].device, dtype=leaves[i].dtype).mul_(2).sub_(1))
                offset += size
            hvps = torch.autograd.grad(
                [grads[i] for i in live],
                [leaves[i] for i in live],
                grad_outputs=probes,
                retain_graph=probe < self.num_probes - 1,
                allow_unused=True,
            )
            for i, v, hv in zip(live, probes, hvps, strict=True):
                if hv is not None:
                    sums[names[i]] += (v * hv).to(sums[names[i]].dtype) * weight
        return n


def _draw_signs(num_probes: int, size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``num_probes × size`` random bits (int8, 0 or 1) from the CPU ``generator``, moved to ``device`` in one copy.

    The bits are drawn on the host, so a profile on a GPU uses the very probes of the same profile on the CPU (same
    seed); one draw and one copy per batch (pinned memory, asynchronous, on CUDA) instead of one per parameter and
    probe. CPU random draws are sequential, so one draw of ``num_probes × size`` bits equals the per-probe,
    per-parameter draws it replaces, bit for bit.
    """
    bits = torch.randint(0, 2, (num_probes, size), generator=generator, dtype=torch.int8)
    if device.type == "cuda":
        return bits.pin_memory().to(device, non_blocking=True)
    return bits.to(device)
