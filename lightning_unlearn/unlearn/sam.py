"""SAM-style unlearning objectives under Lightning's manual optimization.

``sam_forget`` solves ``min_θ max_{‖ε‖≤ρ} L_forget(θ + ε) + λ L_retain(θ)`` on the selected parameters, with
``L_forget = CE(D̃_f) − CE(D_f)`` (loss on the corrected labels minus loss on the poisoned ones, the seed paper's
eq. 7/11). ``sharp_minmax`` (Tang & Khanna) splits the model: the selection (forget part) takes sharpness-*maximizing*
ascent steps on the forget loss with poisoned labels, every other parameter (retain part) takes SAM steps on the
retain loss.

A step: the gradient that defines the perturbation ``ε`` is computed with ``torch.autograd.grad`` (no DDP hooks)
and summed over all ranks with one explicit all-reduce, so every rank moves to the same perturbed point (ε depends
on the gradient's direction only, so a sum is as good as a mean); the perturbation is applied under ``no_grad`` and
skipped when that gradient is zero or not finite; the network stays in ``eval()`` (BatchNorm statistics frozen);
the weights are then restored *exactly* (copied back, not subtracted) and the final ``optimizer.step()`` goes through
Lightning (gradients averaged by DDP in ``manual_backward``), so ``global_step``, checkpointing and precision plugins
keep working.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_unlearn.unlearn.iterative import IterativeMethod, cross_entropy, rank_count

if TYPE_CHECKING:
    from lightning_unlearn.unlearn.module import UnlearnModule


def synced_gradient(
    module: UnlearnModule, loss: torch.Tensor, named: dict[str, torch.nn.Parameter]
) -> list[torch.Tensor]:
    """``∇ loss`` w.r.t. ``named`` parameters, summed over all ranks, unselected entries zeroed (for a perturbation)."""
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    local = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named.items(), grads, strict=True)}
    total = module.all_reduce_sum(local)
    return [module.guard.mask_update(n, total[n]) for n in named]


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


def forget_loss(
    module: UnlearnModule,
    x: torch.Tensor,
    y_poisoned: torch.Tensor,
    y_true: torch.Tensor,
    weight: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """``L_forget = CE(corrected labels) − CE(poisoned labels)`` (weighted batch means, see ``cross_entropy``)."""
    logits = module.net(x)
    return cross_entropy(logits, y_true, weight, count) - cross_entropy(logits, y_poisoned, weight, count)


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
        (xf, yp, yt, _, wf), (xr, yr, _, wr) = batch["forget"], batch["retain"]
        optimizer = module.optimizers()
        named = module.guard.trainable
        nf, nr = rank_count(module, wf), rank_count(module, wr)
        grads = synced_gradient(module, forget_loss(module, xf, yp, yt, wf, nf), named)
        eps = Perturbation(list(named.values()), grads, self.rho, sign=1.0)
        self.skipped += not eps.applied
        optimizer.zero_grad()
        sharp = forget_loss(module, xf, yp, yt, wf, nf)  # at θ + ε
        module.manual_backward(sharp)
        eps.restore()
        retain = cross_entropy(module.net(xr), yr, wr, nr)  # at θ
        module.manual_backward(self.lam * retain)
        module.guard.zero_frozen_grads()
        optimizer.step()
        module.guard.restore()
        module.log_dict({"unlearn/forget_loss_sharp": sharp, "unlearn/retain_loss": retain}, prog_bar=True)
        return sharp + self.lam * retain

    def report(self) -> dict[str, Any]:
        return {**super().report(), "rho": self.rho, "lam": self.lam, "skipped_perturbations": self.skipped}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", self.skipped))


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
        (xf, yp, _, _, wf), (xr, yr, _, wr) = batch["forget"], batch["retain"]
        optimizer = module.optimizers()
        forget_named = {n: p for n, p in module.net_named_parameters() if n in module.selected_names}
        retain_named = {n: p for n, p in module.net_named_parameters() if n not in module.selected_names}
        forget_part, retain_part = list(forget_named.values()), list(retain_named.values())
        nf, nr = rank_count(module, wf), rank_count(module, wr)
        g_r = synced_gradient(module, cross_entropy(module.net(xr), yr, wr, nr), retain_named)
        g_f = synced_gradient(module, cross_entropy(module.net(xf), yp, wf, nf), forget_named)
        eps_r = Perturbation(retain_part, g_r, self.rho, sign=1.0)
        eps_f = Perturbation(forget_part, g_f, self.rho_forget, sign=-1.0)
        optimizer.zero_grad()
        retain = cross_entropy(module.net(xr), yr, wr, nr)
        module.manual_backward(retain)
        retain_grads = [None if p.grad is None else p.grad.clone() for p in retain_part]
        optimizer.zero_grad()
        forget = cross_entropy(module.net(xf), yp, wf, nf)
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
