"""``Auto``: the default request. It chooses the update's method, selection and size by the request's one criterion
(:mod:`~lightning_unlearn.unlearn.request.target`), without a retrained model, within a compute budget.

A one-step update ``θ_S ← θ_S − τ d`` whose direction ``d`` is one of

* ``corrected``: Warnecke's first order with the corrected labels, ``Σ_f [∇ℓ(x, ỹ) − ∇ℓ(x, y)]`` (target
  ``corrected``: the labels are known);
* ``relabel``: the same towards the model's own best *other* label ``ŷ = argmax_{c ≠ y} f(x)_c`` (targets
  ``class_removed`` and ``trigger_removed``: what a model that never saw the class, or the trigger, predicts is the
  class it finds next most likely — for a triggered image, usually its true class);
* ``removal``: gradient ascent on the forget set, ``−Σ_f ∇ℓ(x, y)`` (every target; the only one for ``unseen``);

on each of the selection's candidates (default: the last layer, then the flattest layer when the profile has
curvature), each with its own step searched by the criterion (bracket, then golden section). The target's first
direction is tried on every selection before the next direction, the selections cheapest first; a later candidate
is chosen only when it beats the best so far by more than twice the noise of their paired difference
(:func:`~lightning_unlearn.unlearn.request.criterion.prefer`). "No change" (step 0) is a candidate of every search;
the report states the target's reading before and after, so a request that changes nothing says whether the target
was already met (within two standard errors) or not.

**Budget**: ``budget_epochs`` training-epoch equivalents (default 0.5), measured on the spot as the mean time of
three training batches' forward and backward passes (after one warm-up) times the batches of one epoch. The
forget-set gradients and the target's own direction on every selection candidate always run (two candidates by
default), so that which selection wins never depends on the machine's speed or load; a fallback direction starts only
while the time spent plus its estimated cost (the first selection's, or the last search's on the same selection)
stays within the budget, and the report lists what was skipped. On the MNIST CNN the two selections cost 0.37–0.56
training epochs in all (``benchmarks/auto.py``, ``docs/results.md``); the backdoor needs the second one.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader

from lightning_unlearn.batches import unpack_batch
from lightning_unlearn.curvature.precision import no_autocast
from lightning_unlearn.unlearn.base import UnlearnContext
from lightning_unlearn.unlearn.methods.one_step import FirstOrder
from lightning_unlearn.unlearn.request.splits import requiring_grad
from lightning_unlearn.unlearn.request.step_search import DEFAULT_TOL

__all__ = ["Auto", "DIRECTIONS", "TARGET_DIRECTIONS"]

DIRECTIONS = ("corrected", "relabel", "removal")
#: The directions tried for each target, in order of preference.
TARGET_DIRECTIONS = {
    "corrected": ("corrected", "removal"),
    "unseen": ("removal",),
    "class_removed": ("relabel", "removal"),
    "trigger_removed": ("relabel", "removal"),
}


def forget_gradients(
    net: torch.nn.Module,
    x: torch.Tensor,
    y_trained: torch.Tensor,
    y_corrected: torch.Tensor,
    directions: tuple[str, ...],
    params: list[torch.nn.Parameter],
    weight: torch.Tensor,
) -> dict[str, list[torch.Tensor]]:
    """The summed forget-set gradient of each direction (see the module docstring) over a batch: one forward pass,
    one backward pass per direction; autocast off, gradients in at least float32 (as
    :func:`~lightning_unlearn.unlearn.methods.one_step.forget_gradient`)."""
    out = {}
    with torch.enable_grad(), no_autocast(x.device.type):
        logits = net(x)
        trained = F.cross_entropy(logits, y_trained, reduction="none")
        for i, direction in enumerate(directions):
            if direction == "corrected":
                per_sample = F.cross_entropy(logits, y_corrected, reduction="none") - trained
            elif direction == "relabel":
                other = logits.detach().clone()
                other.scatter_(1, y_trained[:, None], -math.inf)
                per_sample = F.cross_entropy(logits, other.argmax(1), reduction="none") - trained
            else:
                per_sample = -trained
            loss = (weight.to(per_sample.dtype) * per_sample).sum()
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(directions) - 1)
            out[direction] = [g.detach().to(torch.promote_types(g.dtype, torch.float32)) for g in grads]
    return out


class Auto(FirstOrder):
    """The default request (see the module docstring): method, selection and step chosen by the forgetting target's
    criterion within ``budget_epochs`` training-epoch equivalents.

    Args:
        budget_epochs: Compute budget, in epochs of training (measured here, see the module docstring).
        directions: The directions to try (default: those of the request's target, :data:`TARGET_DIRECTIONS`).
        steps: The coarse grid of step sizes (default: :class:`FirstOrder`'s, 1e-6 … 1e-2).
        batch_size: Batch size over the forget set.
        tol: Tolerance of the step refinement, in decades.
    """

    name = "auto"
    needs_corrected_labels = False  # used where the target is "corrected", which requires them itself
    setting_keys = ("direction",)

    def __init__(
        self,
        budget_epochs: float = 0.5,
        directions: list[str] | None = None,
        steps: list[float] | None = None,
        batch_size: int = 512,
        tol: float = DEFAULT_TOL,
    ) -> None:
        super().__init__(steps, "target", batch_size, tol)
        if not (isinstance(budget_epochs, (int, float)) and math.isfinite(budget_epochs) and budget_epochs > 0):
            raise ValueError(f"`budget_epochs` must be a number > 0 (training epochs), got {budget_epochs!r}.")
        unknown = [d for d in directions or [] if d not in DIRECTIONS]
        if unknown or (directions is not None and not directions):
            raise ValueError(f"`directions` must be a non-empty list of {DIRECTIONS}, got {directions!r}.")
        self.budget_epochs = float(budget_epochs)
        self.requested_directions = None if directions is None else tuple(dict.fromkeys(directions))
        self._directions: tuple[str, ...] = ()
        self._budget: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------------- the choices
    def default_selection(self) -> Any:
        from lightning_unlearn.selection import AutoCandidates

        return AutoCandidates()

    def _directions_for(self, module: UnlearnContext) -> tuple[str, ...]:
        target = module.forgetting_target.target
        directions = self.requested_directions or TARGET_DIRECTIONS[target]
        if "corrected" in directions and target != "corrected":
            raise ValueError(
                f"Auto: the direction 'corrected' uses the forget set's corrected labels, which a request with the "
                f"target {target!r} does not use; choose among {TARGET_DIRECTIONS[target]}."
            )
        return directions

    def settings(self) -> list[dict[str, Any]]:
        return [{"direction": d} for d in self._directions]

    def plan(self, num_candidates: int, settings: list[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
        """The target's own direction on every selection before the fallback directions (removal): within the budget,
        a second selection is worth more than a second direction (on the MNIST backdoor with its true labels the
        flattest layer's corrected step beats both of the last layer's)."""
        return [(index, [setting]) for setting in settings for index in range(num_candidates)]

    def variant(self, setting: dict[str, Any]) -> str:
        return setting["direction"]

    # ------------------------------------------------------------------------------------------------- the fit
    def train_dataloader(self, module: UnlearnContext) -> Any:
        loader = super().train_dataloader(module)
        self._directions = self._directions_for(module)
        start = time.perf_counter()
        self._budget = {"epochs": self.budget_epochs, "epoch_seconds": self._epoch_seconds(module), "skipped": []}
        self._budget["measuring"] = time.perf_counter() - start  # counted; the clock itself starts with the gradients
        return loader

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> None:
        self._budget.setdefault("start", time.perf_counter() - self._budget["measuring"])
        super().training_step(module, batch, batch_idx)

    def gradients(self, module: UnlearnContext, batch: Any, params: list[torch.nn.Parameter]) -> dict[str, list]:
        x, y_trained, y_corrected, weight = batch[0], batch[1], batch[2], batch[-1]
        return forget_gradients(module.net, x, y_trained, y_corrected, self._directions, params, weight)

    def within_budget(self, module: UnlearnContext, label: str | None, setting: dict[str, Any]) -> bool:
        if setting.get("direction") == self._directions[0]:
            # the target's own direction runs on every selection whatever the clock says: the choice between
            # selections must not depend on the machine's speed or load (the same request, the same choice)
            return True
        spent = time.perf_counter() - self._budget["start"]
        # what the next candidate will cost: another search where the selection's caches are built, else about what
        # the first selection cost from its caches to the end of its first search
        same = label == self._budget.get("label")
        self._budget["label"] = label
        estimate = self._budget.get("search", 0.0) if same else self._budget.get("first", 0.0)
        over = float(spent + estimate > self.budget_epochs * self._budget["epoch_seconds"])
        # one decision for all ranks (their clocks differ): a candidate skipped anywhere is skipped everywhere
        if not float(module.all_reduce_sum({"over": torch.tensor(over, device=module.device)})["over"]):
            return True
        self._budget["skipped"].append(" / ".join(str(v) for v in (label, setting.get("direction")) if v is not None))
        return False

    def _epoch_seconds(self, module: UnlearnContext) -> float:
        """Seconds of one training epoch, measured: loading, forward and backward of training batches (of 128)
        through the whole network — the first one a warm-up, the next three timed — times the batches of an epoch
        (a lower bound of a real epoch, which also steps an optimizer)."""
        dataset = module.datamodule.train_dataset()
        batches = iter(DataLoader(dataset, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0)))
        params = list(module.net.parameters())
        times = []
        for _ in range(min(4, math.ceil(len(dataset) / 128))):
            start = time.perf_counter()
            x, y = unpack_batch(next(batches))
            with torch.enable_grad(), requiring_grad(params):  # as training would: every parameter (none frozen)
                loss = F.cross_entropy(module.net(x.to(module.device)), y.to(module.device))
                torch.autograd.grad(loss, params, allow_unused=True)
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            times.append(time.perf_counter() - start)
        timed = times[1:] or times
        return sum(timed) / len(timed) * math.ceil(len(dataset) / 128)

    def on_train_epoch_end(self, module: UnlearnContext) -> None:
        self._budget["gradients_done"] = time.perf_counter()
        super().on_train_epoch_end(module)

    def searched(self, label: str | None, seconds: float) -> None:
        self._budget["search"] = seconds
        self._budget.setdefault("label", label)
        if "first" not in self._budget:  # the first selection, from the start of its cache to the end of its search
            self._budget["first"] = time.perf_counter() - self._budget.get("gradients_done", self._budget["start"])

    def finish(self, module: UnlearnContext) -> None:
        spent = time.perf_counter() - self._budget.pop("start", time.perf_counter())
        epoch = self._budget["epoch_seconds"]
        for key in ("label", "search", "first", "gradients_done", "measuring"):
            self._budget.pop(key, None)
        self._budget.update(spent_seconds=spent, spent_epochs=spent / epoch if epoch > 0 else math.nan)
        self.result["budget"] = dict(self._budget)
        self.result["directions"] = list(self._directions)

    def report(self) -> dict[str, Any]:
        return super().report() | {"budget_epochs": self.budget_epochs}
