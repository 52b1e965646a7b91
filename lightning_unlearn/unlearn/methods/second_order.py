"""Warnecke's second-order one-step update: the first-order gradient preconditioned by the training loss's Hessian
restricted to the selection, ``θ_S ← θ_S − τ (H_SS + λI)⁻¹ g`` (diagonal from the profile, or CG / LiSSA solves);
the step and the damping are searched by the request's criterion as for every one-step method
(:mod:`~lightning_unlearn.unlearn.methods.one_step`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_unlearn.unlearn.base import UnlearnContext
from lightning_unlearn.unlearn.methods.inverse_hvp import conjugate_gradient, lissa
from lightning_unlearn.unlearn.methods.one_step import SOLVERS, OneStepMethod
from lightning_unlearn.unlearn.request.step_search import DEFAULT_TOL

__all__ = ["SecondOrder"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SecondOrder(OneStepMethod):
    """Warnecke's second-order update ``θ_S ← θ_S − τ (H_SS + λI)⁻¹ g``; ``τ = 1`` is the Newton step.

    Args:
        solver: ``"diag"`` (``H_SS ≈ N · diag(profile)``, free given the profile), ``"cg"`` or ``"lissa"``
            (Hessian-vector products of the summed training loss on ``hvp_samples`` training samples).
        damping: λ, relative to the mean of ``N · diag(profile)`` over the selection (so it is scale free); a list is
            searched on validation (one solve and one step search per value, the best pair wins). Default
            ``(0.01, 0.1, 1.0, 10.0)`` (``1.0`` with ``criterion="fixed"``).
        steps: Multipliers ``τ`` of the Newton direction (the coarse grid of the step search).
        criterion: See :class:`OneStepMethod`.
        batch_size: Batch size over the forget set.
        max_iter: CG iterations / LiSSA depth.
        hvp_samples: Training samples (the first ones, fixed) used by the HVPs of ``cg`` / ``lissa``.
        lissa_scale: LiSSA scale, relative to the same mean as ``damping`` (must exceed the largest eigenvalue).
        validation_weights: See :class:`OneStepMethod`.
        forget_weight: See :class:`OneStepMethod`.
    """

    name = "second_order"
    needs_curvature = True  # H_SS from the profile (diag) or its mean (the damping's scale)
    default_steps = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    default_damping = (0.01, 0.1, 1.0, 10.0)
    setting_keys = ("damping_relative",)

    def __init__(
        self,
        solver: str = "diag",
        damping: float | list[float] | None = None,
        steps: list[float] | None = None,
        criterion: str | None = None,
        batch_size: int = 512,
        tol: float = DEFAULT_TOL,
        max_iter: int = 100,
        hvp_samples: int = 2048,
        lissa_scale: float = 1000.0,
        validation_weights: str = "uniform",
        forget_weight: float = 0.0,
    ) -> None:
        super().__init__(steps, criterion, batch_size, tol, validation_weights, forget_weight)
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        if damping is None:  # searched by default; one value when nothing is searched
            damping = 1.0 if criterion == "fixed" else list(self.default_damping)
        dampings = [damping] if _is_number(damping) else damping
        if not dampings or any(not _is_number(d) or not math.isfinite(d) or d < 0 for d in dampings):
            raise ValueError(f"`damping` must be a number >= 0 or a non-empty list of them, got {damping!r}.")
        if criterion == "fixed" and len(dampings) != 1:
            raise ValueError(f"`criterion='fixed'` needs exactly one `damping`, got {dampings}.")
        self.solver, self.dampings, self.max_iter = solver, sorted(float(d) for d in dampings), max_iter
        self.hvp_samples, self.lissa_scale = hvp_samples, lissa_scale

    def settings(self) -> list[dict[str, Any]]:
        return [{"damping_relative": d} for d in self.dampings]

    def direction(
        self, module: UnlearnContext, grad: dict[str, torch.Tensor], damping_relative: float = 1.0
    ) -> dict[str, torch.Tensor]:
        profile = module.require_profile()
        n_train = module.num_train_samples  # H of the summed loss = N · (profiled mean-loss Hessian)
        diag = {name: n_train * profile.diagonals[name].to(g.device, g.dtype) for name, g in grad.items()}
        masks = {name: module.guard.mask_update(name, torch.ones_like(g)).bool() for name, g in grad.items()}
        selected = torch.cat([diag[name][masks[name]] for name in grad])
        level = float(selected.mean()) if selected.numel() else 0.0
        if not math.isfinite(level) or level <= 0:
            raise ValueError(f"second_order: the profile's diagonal over the selection has mean {level}; cannot damp.")
        damping = damping_relative * level
        self.result.update(solver=self.solver, curvature_mean=level, dampings=self.dampings)
        if self.solver == "diag":
            return {name: g / (diag[name] + damping) for name, g in grad.items()}
        names = list(grad)
        flat_g = torch.cat([grad[n].reshape(-1) for n in names])
        hvp = module.training_hvp(names, self.hvp_samples, scale=n_train)
        if self.solver == "cg":
            flat_d, info = conjugate_gradient(hvp, flat_g, damping, self.max_iter, tol=1e-6)
        else:
            flat_d, info = lissa(hvp, flat_g, damping, scale=self.lissa_scale * level, depth=self.max_iter)
        solve = {"damping_relative": damping_relative, "damping": damping, "iterations": info.iterations}
        self.result.setdefault("solves", []).append(solve | {"residual": info.residual, "status": info.status})
        if info.status in ("diverged", "negative_curvature"):
            rank_zero_warn(f"second_order ({self.solver}) stopped: {info.status}; increase `damping`.")
        if not torch.isfinite(flat_d).all():
            raise FloatingPointError(f"second_order ({self.solver}) produced a non-finite direction.")
        out, offset = {}, 0
        for n in names:
            out[n] = flat_d[offset : offset + grad[n].numel()].reshape(grad[n].shape)
            offset += grad[n].numel()
        return out
