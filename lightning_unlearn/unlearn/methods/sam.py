"""SAM-style unlearning objectives under Lightning's manual optimization.

``sam_forget`` solves ``min_θ max_{‖ε‖≤ρ} L_forget(θ + ε) + λ L_retain(θ)`` on the selected parameters, with
``L_forget = CE(D̃_f) − CE(D_f)`` (loss on the corrected labels minus loss on the poisoned ones, the seed paper's
eq. 7/11): the forget term is *minimised* at its worst nearby point (SAM), the retain term at ``θ``.

``sharp_minmax`` (Tang & Khanna, "Sharpness-Aware Machine Unlearning", code: HaoranTang/sharp-unlearn) splits the
trainable entries in two and takes two sequential steps per batch, each with its own optimizer (and state): the
*retain branch* (the entries outside the selection) takes a SAM step on ``α CE(D_r)``; then, from the updated
weights, the *forget branch* (the selected entries) takes a sharpness-*maximising* step on the NegGrad objective
``L = −(1 − α) CE(D_f, poisoned labels)``: with ``h = ∇L(θ)`` and ``h̃ = ∇L(θ + ρ ĥ)`` it follows
``h − λ (h̃ − h) ≈ ∇(L − λ ρ ‖∇L‖)``, which raises the forget loss *and* its gradient norm (sharpness).
Element-wise selections are routed per entry: a tensor's selected entries belong to the forget branch, its other
entries to the retain branch. ``adaptive=True`` gives ASAM's element-wise scaling, as in the official code:
``ε = ρ θ² ⊙ g / ‖|θ| ⊙ g‖``. Deviations from the official code are listed in ``docs/fidelity.md``.

A step: the gradient that defines a perturbation is summed over all ranks with one explicit all-reduce (from
``torch.autograd.grad`` for SAM-forget; from a backward pass under ``trainer.strategy.block_backward_sync()`` for
Sharp MinMax, whose update reuses that gradient), so every rank moves to the same perturbed point; the perturbation
is applied under ``no_grad`` and skipped when that gradient is zero or not finite; the network stays in ``eval()``
(BatchNorm statistics frozen); the weights are then restored *exactly* (copied back, not subtracted) and the final
``optimizer.step()`` goes through Lightning (gradients averaged by DDP in ``manual_backward``), so ``global_step``,
checkpointing and precision plugins keep working (Sharp MinMax makes two optimizer steps per batch, so its
``global_step`` advances by two).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_unlearn.unlearn.base import UnlearnContext
from lightning_unlearn.unlearn.methods.iterative import PairedMethod, cross_entropy, rank_counts


def loss_scaler(module: UnlearnContext) -> Any:
    """The precision plugin's gradient scaler (``precision="16-mixed"``: a ``torch.amp.GradScaler``), else None."""
    trainer = module.attached_trainer
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None


def synced_gradient(
    module: UnlearnContext, loss: torch.Tensor, named: dict[str, torch.nn.Parameter]
) -> list[torch.Tensor]:
    """``∇ loss`` w.r.t. ``named`` parameters, summed over all ranks, unselected entries zeroed (for a perturbation).

    Under a precision plugin with a loss scaler (``16-mixed``) the loss is scaled first, as ``manual_backward`` scales
    it: a float16 backward pass without it lets small gradients underflow to zero, and a zero gradient would skip the
    perturbation. The result is then the scaled gradient, which is fine for its one use, the *direction* of the
    perturbation (``ρ g/‖g‖`` and ASAM's form do not depend on the scale).
    """
    scaler = loss_scaler(module)
    if scaler is not None:
        loss = scaler.scale(loss)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    local = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named.items(), grads, strict=True)}
    total = module.all_reduce_sum(local)
    return [module.guard.mask_update(n, total[n]) for n in named]


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))


class Perturbation:
    """Moves parameters by ``ε = sign · ρ · g / ‖g‖`` and puts the exact original values back.

    With ``adaptive=True`` (ASAM, as the official Sharp MinMax code scales it): ``ε = sign · ρ · θ² ⊙ g / ‖|θ| ⊙ g‖``.
    Entries where ``g`` is zero do not move. Nothing moves (``applied`` is False) when the norm is zero or not
    finite. One host synchronisation per perturbation (the norm and the factor read in one transfer), not one per
    parameter.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        grads: list[torch.Tensor | None],
        rho: float,
        sign: float = 1.0,
        adaptive: bool = False,
    ) -> None:
        self.params = params
        self.saved = [p.detach().clone() for p in params]
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        with torch.no_grad():
            if adaptive:
                norm = _norm([p.abs() * g for p, g in zip(params, grads, strict=True)])
                directions = [p * p * g for p, g in zip(params, grads, strict=True)]
            else:
                norm, directions = _norm(grads), grads
            # one device-to-host transfer for the decision and the factor (both float64, as before)
            norm_value, factor = torch.stack([norm, sign * rho / norm]).tolist()
            self.applied = math.isfinite(norm_value) and norm_value > 0
            if self.applied:
                for p, d in zip(params, directions, strict=True):
                    p.add_(d, alpha=factor)

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self.saved, strict=True):
            p.copy_(saved)


def forget_loss(
    module: UnlearnContext,
    x: torch.Tensor,
    y_poisoned: torch.Tensor,
    y_true: torch.Tensor,
    weight: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """``L_forget = CE(corrected labels) − CE(poisoned labels)`` (weighted batch means, see ``cross_entropy``)."""
    logits = module.net(x)
    return cross_entropy(logits, y_true, weight, count) - cross_entropy(logits, y_poisoned, weight, count)


class SharpnessAware(PairedMethod):
    """What SAM-style methods share: the radius, ASAM scaling, and a count of skipped perturbations.

    Args:
        epochs: Passes over the data (see ``epoch_over``).
        batch_size: Batch size of the forget and retain loaders.
        rho: Radius ρ of the perturbation.
        adaptive: ASAM: scale the perturbation element-wise by ``|θ|`` (``ε = ρ θ² ⊙ g / ‖|θ| ⊙ g‖``).
        epoch_over: ``"forget"`` or ``"retain"``, see
            :class:`~lightning_unlearn.unlearn.methods.iterative.PairedMethod`.
    """

    def __init__(
        self,
        epochs: int = 1,
        batch_size: int = 128,
        rho: float = 0.05,
        adaptive: bool = False,
        epoch_over: str = "forget",
    ) -> None:
        super().__init__(epochs, batch_size, epoch_over)
        if rho < 0:
            raise ValueError(f"`rho` must be >= 0, got {rho}.")
        self.rho = rho
        self.adaptive = adaptive
        self.skipped = 0

    def perturb(self, params: list[nn.Parameter], grads: list[torch.Tensor]) -> Perturbation:
        """Move ``params`` to their perturbed point (counted in ``skipped_perturbations`` when it cannot)."""
        eps = Perturbation(params, grads, self.rho, adaptive=self.adaptive)
        self.skipped += not eps.applied
        return eps

    def report(self) -> dict[str, Any]:
        return {**super().report(), "rho": self.rho, "adaptive": self.adaptive, "skipped_perturbations": self.skipped}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", self.skipped))


class SamForget(SharpnessAware):
    """``min_θ max_{‖ε‖≤ρ} L_forget(θ + ε) + λ L_retain(θ)`` on the selected parameters (the seed paper's eq. 11).

    One step follows ``∇L_forget(θ + ε̂) + λ ∇L_retain(θ)`` with ``ε̂ = ρ ∇L_forget / ‖∇L_forget‖`` (or its ASAM
    form); everything outside the selection stays hard-frozen (``module.guard``).

    Args:
        epochs: Passes over the data (see ``epoch_over``).
        batch_size: Batch size of the forget and retain loaders.
        rho: Radius ρ of the perturbation.
        lam: Weight λ of the retain loss.
        adaptive: ASAM perturbation (element-wise ``|θ|`` scaling).
        epoch_over: ``"forget"`` (one pass over D_f) or ``"retain"`` (one pass over D_r, D_f cycled).
    """

    name = "sam_forget"
    needs_corrected_labels = True  # L_forget = CE(corrected) − CE(trained-on)

    def __init__(
        self,
        epochs: int = 1,
        batch_size: int = 128,
        rho: float = 0.05,
        lam: float = 1.0,
        adaptive: bool = False,
        epoch_over: str = "forget",
    ) -> None:
        super().__init__(epochs, batch_size, rho, adaptive, epoch_over)
        if lam < 0:
            raise ValueError(f"`lam` must be >= 0, got {lam}.")
        self.lam = lam

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        (xf, yp, yt, _, wf), (xr, yr, _, wr) = batch["forget"], batch["retain"]
        nf, nr = rank_counts(module, wf, wr)
        sharp, retain = self.step(
            module,
            lambda: forget_loss(module, xf, yp, yt, wf, nf),
            lambda: cross_entropy(module.net(xr), yr, wr, nr),
        )
        losses = {"unlearn/forget_loss_sharp": sharp, "unlearn/retain_loss": retain}
        module.log_dict(losses, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(wr))
        return sharp + self.lam * retain

    def step(
        self,
        module: UnlearnContext,
        forget_fn: Callable[[], torch.Tensor],
        retain_fn: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One update with the gradient ``∇F(θ + ε̂) + λ ∇R(θ)`` of the closures ``F = forget_fn``, ``R = retain_fn``
        (each computes its loss at the current weights); returns ``F(θ + ε̂)`` and ``R(θ)``."""
        optimizer = module.optimizers()
        named = module.guard.trainable
        eps = self.perturb(list(named.values()), synced_gradient(module, forget_fn(), named))
        optimizer.zero_grad()
        sharp = forget_fn()  # at θ + ε
        module.manual_backward(sharp)
        eps.restore()
        retain = retain_fn()  # at θ
        module.manual_backward(self.lam * retain)
        module.guard.zero_frozen_grads()
        optimizer.step()
        module.guard.restore()
        return sharp.detach(), retain.detach()

    def report(self) -> dict[str, Any]:
        return {**super().report(), "lam": self.lam}


class Branch:
    """The entries one Sharp MinMax branch trains.

    Args:
        name: ``"retain"`` or ``"forget"`` (for messages).
        entries: Parameter name → (parameter, boolean mask of the branch's entries, or None for the whole tensor).
    """

    def __init__(self, name: str, entries: dict[str, tuple[nn.Parameter, torch.Tensor | None]]) -> None:
        self.name = name
        self.entries = entries

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p, _ in self.entries.values()]

    @property
    def num_entries(self) -> int:
        return sum(p.numel() if m is None else int(m.sum()) for p, m in self.entries.values())

    def _mask(self, name: str) -> torch.Tensor | None:
        p, mask = self.entries[name]
        if mask is not None and mask.device != p.device:  # Lightning moves the module after the split
            mask = mask.to(p.device)
            self.entries[name] = (p, mask)
        return mask

    def restrict(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like parameter ``name``) with the entries outside this branch set to zero."""
        mask = self._mask(name)
        return tensor if mask is None else tensor * mask.to(tensor.dtype)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Values of the partly owned parameters (for :meth:`put_back_outside`)."""
        return {n: p.detach().clone() for n, (p, m) in self.entries.items() if m is not None}

    @torch.no_grad()
    def put_back_outside(self, saved: dict[str, torch.Tensor]) -> None:
        """Write ``saved`` back into the entries outside this branch (weight decay, momentum cannot move them)."""
        for name, before in saved.items():
            p = self.entries[name][0]
            p.copy_(torch.where(self._mask(name), p, before))


def split_branches(module: UnlearnContext) -> tuple[Branch, Branch]:
    """Route every trainable entry: selected → forget branch, unselected → retain branch (per entry for element-wise
    selections; whole tensors stay whole).

    Raises:
        ValueError: If either branch would be empty (a selection covering every trainable parameter leaves nothing to
            train on the retain set).
    """
    selected, allowed = module.mask.masks, module.guard.mask.masks
    retain: dict[str, tuple[nn.Parameter, torch.Tensor | None]] = {}
    forget: dict[str, tuple[nn.Parameter, torch.Tensor | None]] = {}
    for name, p in module.guard.trainable.items():
        trainable = allowed[name].detach().cpu().bool()
        chosen = selected[name].detach().cpu().bool() if name in selected else torch.zeros_like(trainable)
        for entries, mask in ((forget, trainable & chosen), (retain, trainable & ~chosen)):
            if bool(mask.all()):
                entries[name] = (p, None)
            elif bool(mask.any()):
                entries[name] = (p, mask)
    strategy = module.mask.strategy
    if not retain:
        raise ValueError(
            f"Sharp MinMax: the selection {strategy!r} covers every trainable parameter, so the retain branch (the "
            "unselected entries, trained with SAM on the retain set) would be empty. Choose a `selection` that leaves "
            "parameters out (e.g. SmallestLayer, LastLayer, TopKParameters), or a method without a retain branch "
            "(NegGradPlus, SamForget)."
        )
    if not forget:
        raise ValueError(
            f"Sharp MinMax: the selection {strategy!r} selects no trainable entry, so the forget branch would be "
            "empty. Choose a `selection` that selects parameters the profile covers."
        )
    return Branch("retain", retain), Branch("forget", forget)


def _no_backward_sync(module: UnlearnContext) -> contextlib.AbstractContextManager:
    """DDP's gradient all-reduce switched off for the next backward (a no-op on strategies without DDP)."""
    block = getattr(module.attached_trainer.strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


class SharpMinMax(SharpnessAware):
    """Sharp MinMax (Tang & Khanna): SAM-min on the retain branch, then sharpness-maximising NegGrad on the forget one.

    The selected entries form the forget branch, every other trainable entry the retain branch (per entry for
    element-wise selections, see :func:`split_branches`); parameters outside the selection therefore do change. Each
    batch takes two sequential optimizer steps, each branch with its own optimizer (``module.build_optimizer``,
    separate state):

    1. retain: ``L_r = α CE(D_r)``, gradient ``h + λ_r (h̃ − h)`` with ``h = ∇L_r(θ)``, ``h̃ = ∇L_r(θ + ρ ĥ)``
       (``λ_r = 1``: plain SAM, ``h̃``);
    2. forget, from the weights step 1 left: ``L_f = −(1 − α) CE(D_f, poisoned labels)``, gradient
       ``h − λ (h̃ − h) ≈ ∇(L_f − λ ρ ‖∇L_f‖)``: sharpness *maximisation* (the forget loss rises and so does its
       gradient norm).

    Every gradient and perturbation is restricted to the branch's entries; entries outside the branch are written
    back after its step. ``global_step`` advances by two per batch.

    Args:
        epochs: Passes over the data (see ``epoch_over``).
        batch_size: Batch size of the forget and retain loaders.
        alpha: ``α`` in [0, 1]: weight of the retain loss; the forget loss gets ``1 − α`` (official default 0.99).
        rho: Perturbation radius ρ of both branches (official: 0.1 by default, 1.0 with ``adaptive``).
        lam: ``λ`` of the forget branch's sharpness maximisation (official default 1).
        lam_retain: ``λ_r`` of the retain branch (1 = plain SAM; the official code passes one λ to both branches).
        adaptive: ASAM perturbations (element-wise ``|θ|`` scaling), as the official ``--adaptive``.
        epoch_over: ``"forget"`` (one pass over D_f) or ``"retain"`` (one pass over D_r, D_f cycled: official).
    """

    name = "sharp_minmax"
    freezes_unselected = False

    def __init__(
        self,
        epochs: int = 1,
        batch_size: int = 128,
        alpha: float = 0.99,
        rho: float = 0.1,
        lam: float = 1.0,
        lam_retain: float = 1.0,
        adaptive: bool = False,
        epoch_over: str = "forget",
    ) -> None:
        super().__init__(epochs, batch_size, rho, adaptive, epoch_over)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must lie in [0, 1], got {alpha}.")
        if lam < 0 or lam_retain < 0:
            raise ValueError(f"`lam` and `lam_retain` must be >= 0, got {lam} and {lam_retain}.")
        self.alpha, self.lam, self.lam_retain = alpha, lam, lam_retain
        self.branches: tuple[Branch, Branch] | None = None

    def configure_optimizers(self, module: UnlearnContext) -> Any:
        """One optimizer per branch (retain first), each over the parameters with an entry in its branch."""
        self.branches = split_branches(module)
        return [module.build_optimizer(branch.params) for branch in self.branches]

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        (xf, yp, _, _, wf), (xr, yr, _, wr) = batch["forget"], batch["retain"]
        if self.branches is None:
            self.branches = split_branches(module)
        (retain_branch, forget_branch), (retain_opt, forget_opt) = self.branches, module.optimizers()
        nf, nr = rank_counts(module, wf, wr)

        def retain_loss() -> torch.Tensor:
            return self.alpha * cross_entropy(module.net(xr), yr, wr, nr)

        def neggrad_loss() -> torch.Tensor:  # the NegGrad objective: ascent on the poisoned labels
            return -(1 - self.alpha) * cross_entropy(module.net(xf), yp, wf, nf)

        retain = self.branch_step(module, retain_opt, retain_branch, retain_loss, lam=self.lam_retain, sign=1.0)
        forget = self.branch_step(module, forget_opt, forget_branch, neggrad_loss, lam=self.lam, sign=-1.0)
        objectives = {"unlearn/retain_objective": retain, "unlearn/forget_objective": forget}
        module.log_dict(objectives, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(wr))
        return retain + forget

    def branch_step(
        self,
        module: UnlearnContext,
        optimizer: Any,
        branch: Branch,
        loss_fn: Callable[[], torch.Tensor],
        lam: float,
        sign: float,
    ) -> torch.Tensor:
        """One sharpness-aware step of ``branch`` on the closure ``L = loss_fn`` (its loss at the current weights).

        ``h = ∇L(θ)`` (a backward without DDP sync, then one all-reduce: every rank gets the mean), ``θ + ε`` with
        ``ε = ρ ĥ`` (or ASAM's form), ``h̃ = ∇L(θ + ε)`` (a synced backward), weights restored exactly, gradient
        ``h + sign · λ (h̃ − h)`` (``sign = +1``: SAM-min, ``−1``: sharpness maximisation), all restricted to the
        branch's entries; ``optimizer.step()`` through Lightning; entries outside the branch written back.
        Both gradients come from ``manual_backward``, so a precision plugin's loss scaling applies to both alike.

        Returns:
            ``L(θ)`` before the step (detached).
        """
        names, params = branch.names, branch.params
        module.net.zero_grad(set_to_none=True)
        with _no_backward_sync(module):
            loss = loss_fn()
            module.manual_backward(loss)
        local = {
            n: branch.restrict(n, torch.zeros_like(p) if p.grad is None else p.grad)
            for n, p in zip(names, params, strict=True)
        }
        h = {n: g / module.world_size for n, g in module.all_reduce_sum(local).items()}
        eps = self.perturb(params, [h[n] for n in names])
        module.net.zero_grad(set_to_none=True)
        module.manual_backward(loss_fn())  # at θ + ε
        eps.restore()
        with torch.no_grad():
            for n, p in zip(names, params, strict=True):
                h_tilde = torch.zeros_like(p) if p.grad is None else p.grad
                p.grad = branch.restrict(n, h[n] + sign * lam * (h_tilde - h[n]))
        saved = branch.snapshot()
        optimizer.step()
        branch.put_back_outside(saved)
        return loss.detach()

    def report(self) -> dict[str, Any]:
        out = {**super().report(), "alpha": self.alpha, "lam": self.lam, "lam_retain": self.lam_retain}
        if self.branches is not None:
            out.update({f"{b.name}_entries": b.num_entries for b in self.branches})
        return out
