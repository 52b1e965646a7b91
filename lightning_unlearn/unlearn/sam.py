"""SAM-style unlearning objectives under Lightning's manual optimization.

``sam_forget`` solves ``min_θ max_{‖ε‖≤ρ} L_forget(θ + ε) + λ L_retain(θ)`` on the selected parameters, with
``L_forget = CE(D̃_f) − CE(D_f)`` (loss on the corrected labels minus loss on the poisoned ones, the seed paper's
eq. 7/11). ``sharp_minmax`` (Tang & Khanna) splits the model: the selection (forget part) takes sharpness-*maximizing*
ascent steps on the forget loss with poisoned labels, every other parameter (retain part) takes SAM steps on the
retain loss.

A step, as DESIGN.md prescribes: the first backward (for ε) runs without gradient synchronisation
(``trainer.strategy.block_backward_sync()``); the perturbation is applied under ``no_grad`` and skipped when the
gradient norm is zero or not finite; the second forward runs with BatchNorm statistics frozen (the network is in
``eval()`` throughout); the weights are then restored *exactly* (copied back, not subtracted) and the final
``optimizer.step()`` goes through Lightning, so ``global_step``, checkpointing and precision plugins keep working.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812

from lightning_unlearn.unlearn.iterative import IterativeMethod

if TYPE_CHECKING:
    from lightning_unlearn.unlearn.module import UnlearnModule


def no_sync(module: UnlearnModule) -> contextlib.AbstractContextManager:
    """Skip gradient synchronisation for the next backward (DDP); a no-op for single-device strategies."""
    block = getattr(module.trainer.strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


class Perturbation:
    """Moves parameters by ``ε = sign · ρ · g / ‖g‖`` and puts the exact original values back."""

    def __init__(self, params: list[torch.nn.Parameter], grads: list[torch.Tensor | None], rho: float, sign: float):
        self.params = params
        self.saved = [p.detach().clone() for p in params]
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        norm = _norm(grads)
        self.applied = bool(torch.isfinite(norm)) and float(norm) > 0
        if self.applied:
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=float(sign * rho / norm))

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self.saved, strict=True):
            p.copy_(saved)


def forget_loss(module: UnlearnModule, x: torch.Tensor, y_poisoned: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """``L_forget = CE(corrected labels) − CE(poisoned labels)`` (mean over the batch)."""
    logits = module.net(x)
    return F.cross_entropy(logits, y_true) - F.cross_entropy(logits, y_poisoned)


class SamForget(IterativeMethod):
    """``min_θ max_{‖ε‖≤ρ} L_forget(θ + ε) + λ L_retain(θ)`` on the selected parameters.

    Args:
        epochs: Passes over the forget set.
        batch_size: Batch size of the forget and retain loaders.
        rho: Radius ρ of the perturbation.
        lam: Weight λ of the retain loss.
    """

    name = "sam_forget"

    def __init__(self, epochs: int = 1, batch_size: int = 128, rho: float = 0.05, lam: float = 1.0) -> None:
        super().__init__(epochs, batch_size)
        if rho < 0 or lam < 0:
            raise ValueError(f"`rho` and `lam` must be >= 0, got {rho} and {lam}.")
        self.rho, self.lam = rho, lam
        self.skipped = 0

    def train_dataloader(self, module: UnlearnModule) -> Any:
        return self.forget_and_retain(module)

    def training_step(self, module: UnlearnModule, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        (xf, yp, yt, _), (xr, yr, _) = batch["forget"], batch["retain"]
        optimizer = module.optimizers()
        params = module.guard.parameters()
        optimizer.zero_grad()
        with no_sync(module):
            module.manual_backward(forget_loss(module, xf, yp, yt))
        module.guard.zero_frozen_grads()
        eps = Perturbation(params, [p.grad for p in params], self.rho, sign=1.0)
        self.skipped += not eps.applied
        optimizer.zero_grad()
        sharp = forget_loss(module, xf, yp, yt)  # at θ + ε
        module.manual_backward(sharp)
        eps.restore()
        retain = F.cross_entropy(module.net(xr), yr)  # at θ
        module.manual_backward(self.lam * retain)
        module.guard.zero_frozen_grads()
        optimizer.step()
        module.guard.restore()
        module.log_dict({"unlearn/forget_loss_sharp": sharp, "unlearn/retain_loss": retain}, prog_bar=True)
        return sharp + self.lam * retain

    def report(self) -> dict[str, Any]:
        return {**super().report(), "rho": self.rho, "lam": self.lam, "skipped_perturbations": self.skipped}


class SharpMinMax(IterativeMethod):
    """Sharp MinMax: SAM-min on the retain loss for unselected parameters, SAM-max on the forget loss for the selection.

    The selection (forget part) ascends ``CE(D_f, poisoned labels)`` at ``θ − ρ g_f / ‖g_f‖`` (the nearby point where
    that loss is *lowest*, which drives it to sharp regions); the rest (retain part) descends ``CE(D_r)`` at
    ``θ + ρ g_r / ‖g_r‖`` (plain SAM). Parameters outside the selection therefore do change with this method.

    Args:
        epochs: Passes over the forget set.
        batch_size: Batch size of the forget and retain loaders.
        rho: Perturbation radius of the retain part.
        rho_forget: Perturbation radius of the forget part (default: ``rho``).
    """

    name = "sharp_minmax"
    freezes_unselected = False

    def __init__(self, epochs: int = 1, batch_size: int = 128, rho: float = 0.05, rho_forget: float | None = None):
        super().__init__(epochs, batch_size)
        if rho < 0 or (rho_forget is not None and rho_forget < 0):
            raise ValueError(f"`rho` and `rho_forget` must be >= 0, got {rho} and {rho_forget}.")
        self.rho = rho
        self.rho_forget = rho if rho_forget is None else rho_forget

    def train_dataloader(self, module: UnlearnModule) -> Any:
        return self.forget_and_retain(module)

    def training_step(self, module: UnlearnModule, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        (xf, yp, _, _), (xr, yr, _) = batch["forget"], batch["retain"]
        optimizer = module.optimizers()
        forget_part = [p for n, p in module.net_named_parameters() if n in module.selected_names]
        retain_part = [p for n, p in module.net_named_parameters() if n not in module.selected_names]
        # local gradients for the two perturbations (no synchronisation needed)
        g_r = torch.autograd.grad(F.cross_entropy(module.net(xr), yr), retain_part, allow_unused=True)
        g_f = torch.autograd.grad(F.cross_entropy(module.net(xf), yp), forget_part, allow_unused=True)
        eps_r = Perturbation(retain_part, list(g_r), self.rho, sign=1.0)
        eps_f = Perturbation(forget_part, list(g_f), self.rho_forget, sign=-1.0)
        optimizer.zero_grad()
        retain = F.cross_entropy(module.net(xr), yr)
        module.manual_backward(retain)
        retain_grads = [None if p.grad is None else p.grad.clone() for p in retain_part]
        optimizer.zero_grad()
        forget = F.cross_entropy(module.net(xf), yp)
        module.manual_backward(-forget)  # ascent
        for p, g in zip(retain_part, retain_grads, strict=True):
            p.grad = g
        eps_r.restore()
        eps_f.restore()
        optimizer.step()
        module.log_dict({"unlearn/retain_loss_sharp": retain, "unlearn/forget_loss_flat": forget}, prog_bar=True)
        return retain - forget

    def report(self) -> dict[str, Any]:
        return {**super().report(), "rho": self.rho, "rho_forget": self.rho_forget}
