"""One-step unlearning (Warnecke et al. 2023): a single update of the selected parameters from forget-set gradients.

With ``g = Σ_{i∈D_f} [∇_S ℓ(x_i, y_true_i) − ∇_S ℓ(x_i, y_poisoned_i)]`` (a sum over the whole forget set, across
all ranks), the update is ``θ_S ← θ_S − τ · d`` with

* ``first_order``: ``d = g``;
* ``second_order``: ``d = (H_SS + λI)⁻¹ g`` where ``H`` is the Hessian of the *summed* training loss
  (``N ×`` the profiled mean-loss Hessian): ``solver="diag"`` uses the profile's diagonal, ``"cg"`` / ``"lissa"``
  solve with Hessian-vector products on ``hvp_samples`` training samples.

The step size ``τ`` is chosen from ``steps`` on the clean validation split (one forward pass per candidate; ``τ = 0``,
"no change", is always a candidate, so the model is never left worse on validation than before). The test set is
never looked at.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities import rank_zero_warn

from lightning_unlearn.unlearn.base import UnlearnMethod
from lightning_unlearn.unlearn.inverse_hvp import conjugate_gradient, lissa

if TYPE_CHECKING:
    from lightning_unlearn.unlearn.module import UnlearnModule

CRITERIA = ("acc", "loss", "fixed")
SOLVERS = ("diag", "cg", "lissa")


def forget_gradient(
    net: torch.nn.Module,
    x: torch.Tensor,
    y_poisoned: torch.Tensor,
    y_true: torch.Tensor,
    params: list[torch.nn.Parameter],
    weight: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``Σ_i w_i [∇ ℓ(x_i, y_true_i) − ∇ ℓ(x_i, y_poisoned_i)]`` w.r.t. ``params`` over a batch (one forward, one
    backward); ``w_i = 1`` by default (0 marks padding).

    Cross-entropy summed over the batch; the network is used as it is (callers put it in ``eval()``).
    """
    with torch.enable_grad():
        logits = net(x)
        per_sample = F.cross_entropy(logits, y_true, reduction="none") - F.cross_entropy(
            logits, y_poisoned, reduction="none"
        )
        loss = per_sample.sum() if weight is None else (weight.to(per_sample.dtype) * per_sample).sum()
        grads = torch.autograd.grad(loss, params)
    return [g.detach() for g in grads]


def _require_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a non-finite gradient or direction before any parameter is touched (the model stays as it was)."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(
            f"The {what} is non-finite (NaN/inf) in {bad}: the model is left unchanged. Check the checkpoint's "
            "weights and the forget set's inputs; for second-order updates, increase `damping`."
        )


class OneStepMethod(UnlearnMethod):
    """Shared machinery: accumulate ``g`` over the forget set, turn it into a direction, search the step on validation.

    Args:
        steps: Candidate step sizes ``τ`` (positive); ``0`` is always added.
        criterion: ``"acc"`` (highest validation accuracy; ties → lower loss, then the smaller step), ``"loss"``
            (lowest validation loss) or ``"fixed"`` (apply the single step in ``steps``, no search).
        batch_size: Batch size over the forget set.
    """

    one_step = True
    default_steps: tuple[float, ...] = ()

    def __init__(self, steps: list[float] | None = None, criterion: str = "acc", batch_size: int = 512) -> None:
        steps = list(self.default_steps if steps is None else steps)
        if not steps or any(not math.isfinite(s) or s <= 0 for s in steps):
            raise ValueError(f"`steps` must be a non-empty list of positive step sizes, got {steps}.")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}.")
        if criterion == "fixed" and len(steps) != 1:
            raise ValueError(f"`criterion='fixed'` needs exactly one step in `steps`, got {steps}.")
        self.steps = sorted(steps)
        self.criterion = criterion
        self.batch_size = batch_size
        self._grad: dict[str, torch.Tensor] = {}
        self._count = 0
        self._seconds_grad = 0.0
        self.result: dict[str, Any] = {}

    def configure_optimizers(self, module: UnlearnModule) -> Any:
        return None  # the update is written directly into the parameters

    def train_dataloader(self, module: UnlearnModule) -> Any:
        self._grad, self._count, self._seconds_grad, self.result = {}, 0, 0.0, {}  # one request per fit
        return module.loader(module.datamodule.forget_pairs_dataloader().dataset, batch_size=self.batch_size)

    def training_step(self, module: UnlearnModule, batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        x, y_poisoned, y_true, weight = batch[0], batch[1], batch[2], batch[-1]
        module.net.eval()
        params = module.guard.trainable
        grads = forget_gradient(module.net, x, y_poisoned, y_true, list(params.values()), weight)
        for name, grad in zip(params, grads, strict=True):
            self._grad[name] = self._grad[name] + grad if name in self._grad else grad
        self._count = self._count + weight.sum()  # a tensor: no device synchronisation per batch
        self._seconds_grad += time.perf_counter() - start

    def on_train_epoch_end(self, module: UnlearnModule) -> None:
        start = time.perf_counter()
        grad = module.all_reduce_sum(self._grad)
        count = int(module.all_reduce_sum({"n": torch.as_tensor(self._count, device=module.device)})["n"].item())
        grad = {name: module.guard.mask_update(name, g) for name, g in grad.items()}
        _require_finite("forget gradient", grad)
        seconds_reduce = time.perf_counter() - start
        start = time.perf_counter()
        direction = self.direction(module, grad)
        direction = {name: module.guard.mask_update(name, d) for name, d in direction.items()}
        _require_finite("update direction", direction)
        seconds_direction = time.perf_counter() - start
        start = time.perf_counter()
        best = self._search(module, direction)
        seconds_search = time.perf_counter() - start
        self.result.update(
            forget_samples=count,
            step=best["step"],
            candidates=self._candidates,
            grad_norm=float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad.values())).item()),
            seconds_update=self._seconds_grad + seconds_reduce + seconds_direction,
            seconds_search=seconds_search,
        )

    # ------------------------------------------------------------------------------------------------- direction
    def direction(self, module: UnlearnModule, grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------- search
    @torch.no_grad()
    def _search(self, module: UnlearnModule, direction: dict[str, torch.Tensor]) -> dict[str, float]:
        params = module.guard.trainable
        original = {name: p.detach().clone() for name, p in params.items()}
        self._candidates = []

        def apply(step: float) -> None:  # step 0: the original values exactly (also where the direction is not finite)
            for name, p in params.items():
                p.copy_(original[name] - step * direction[name].to(p.dtype) if step else original[name])

        if self.criterion == "fixed":
            apply(self.steps[0])
            return {"step": self.steps[0]}
        with module.validation_cache() as cache:
            for step in [0.0, *self.steps]:
                apply(step)
                acc, loss = module.validate()
                self._candidates.append({"step": step, "val_acc": acc, "val_loss": loss})
        self.result["validation_cached"] = bool(cache is not None and cache.cached)
        if self.criterion == "acc":
            key = lambda c: (-c["val_acc"], c["val_loss"], c["step"])  # noqa: E731
        else:
            key = lambda c: (c["val_loss"] if math.isfinite(c["val_loss"]) else math.inf, c["step"])  # noqa: E731
        best = min(self._candidates, key=key)
        if best["step"] == self.steps[-1]:
            rank_zero_warn(f"{self.name}: the largest step {best['step']} was chosen; consider extending `steps`.")
        elif best["step"] == self.steps[0] and len(self.steps) > 1:
            rank_zero_warn(f"{self.name}: the smallest step {best['step']} was chosen; consider smaller `steps`.")
        if best["step"] == 0.0:
            rank_zero_warn(f"{self.name}: no step improved the validation {self.criterion}; the model is unchanged.")
        apply(best["step"])
        return best

    def report(self) -> dict[str, Any]:
        return {"method": self.name, "criterion": self.criterion, **self.result}

    def state_dict(self) -> dict[str, Any]:
        return {"result": self.result}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.result = dict(state.get("result", self.result))


class FirstOrder(OneStepMethod):
    """Warnecke's first-order update ``θ_S ← θ_S − τ g``; ``τ`` from ``steps`` on validation.

    The default grid spans 1e-6 … 1e-2 in half decades (Warnecke's code used ``τ = 2e-5``).
    """

    name = "first_order"
    default_steps = tuple(round(10 ** (e / 2), 10) for e in range(-12, -3))

    def direction(self, module: UnlearnModule, grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return grad


class SecondOrder(OneStepMethod):
    """Warnecke's second-order update ``θ_S ← θ_S − τ (H_SS + λI)⁻¹ g``; ``τ = 1`` is the Newton step.

    Args:
        solver: ``"diag"`` (``H_SS ≈ N · diag(profile)``, free given the profile), ``"cg"`` or ``"lissa"``
            (Hessian-vector products of the summed training loss on ``hvp_samples`` training samples).
        damping: λ, relative to the mean of ``N · diag(profile)`` over the selection (so it is scale free).
        steps: Multipliers ``τ`` of the Newton direction.
        max_iter: CG iterations / LiSSA depth.
        hvp_samples: Training samples (the first ones, fixed) used by the HVPs of ``cg`` / ``lissa``.
        lissa_scale: LiSSA scale, relative to the same mean as ``damping`` (must exceed the largest eigenvalue).
    """

    name = "second_order"
    default_steps = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)

    def __init__(
        self,
        solver: str = "diag",
        damping: float = 1.0,
        steps: list[float] | None = None,
        criterion: str = "acc",
        batch_size: int = 512,
        max_iter: int = 100,
        hvp_samples: int = 2048,
        lissa_scale: float = 1000.0,
    ) -> None:
        super().__init__(steps, criterion, batch_size)
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}.")
        if damping < 0:
            raise ValueError(f"`damping` must be >= 0, got {damping}.")
        self.solver, self.damping, self.max_iter = solver, damping, max_iter
        self.hvp_samples, self.lissa_scale = hvp_samples, lissa_scale

    def direction(self, module: UnlearnModule, grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        profile = module.require_profile()
        n_train = module.num_train_samples  # H of the summed loss = N · (profiled mean-loss Hessian)
        diag = {name: n_train * profile.diagonals[name].to(g.device, g.dtype) for name, g in grad.items()}
        masks = {name: module.guard.mask_update(name, torch.ones_like(g)).bool() for name, g in grad.items()}
        selected = torch.cat([diag[name][masks[name]] for name in grad])
        level = float(selected.mean()) if selected.numel() else 0.0
        if not math.isfinite(level) or level <= 0:
            raise ValueError(f"second_order: the profile's diagonal over the selection has mean {level}; cannot damp.")
        damping = self.damping * level
        self.result.update(solver=self.solver, damping=damping, damping_relative=self.damping, curvature_mean=level)
        if self.solver == "diag":
            return {name: g / (diag[name] + damping) for name, g in grad.items()}
        names = list(grad)
        flat_g = torch.cat([grad[n].reshape(-1) for n in names])
        hvp = module.training_hvp(names, self.hvp_samples, scale=n_train)
        if self.solver == "cg":
            flat_d, info = conjugate_gradient(hvp, flat_g, damping, self.max_iter, tol=1e-6)
        else:
            flat_d, info = lissa(hvp, flat_g, damping, scale=self.lissa_scale * level, depth=self.max_iter)
        self.result.update(solve_iterations=info.iterations, solve_residual=info.residual, solve_status=info.status)
        if info.status in ("diverged", "negative_curvature"):
            rank_zero_warn(f"second_order ({self.solver}) stopped: {info.status}; increase `damping`.")
        if not torch.isfinite(flat_d).all():
            raise FloatingPointError(f"second_order ({self.solver}) produced a non-finite direction.")
        out, offset = {}, 0
        for n in names:
            out[n] = flat_d[offset : offset + grad[n].numel()].reshape(grad[n].shape)
            offset += grad[n].numel()
        return out
