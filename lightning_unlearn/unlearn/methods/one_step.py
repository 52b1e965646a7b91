"""One-step unlearning (Warnecke et al. 2023): a single update of the selected parameters from forget-set gradients.

With ``g = Σ_{i∈D_f} [∇_S ℓ(x_i, y_true_i) − ∇_S ℓ(x_i, y_poisoned_i)]`` (a sum over the whole forget set, across
all ranks), the update is ``θ_S ← θ_S − τ · d`` with

* ``first_order``: ``d = g``;
* ``first_order_removal``: ``d = g`` without the corrected-label term, ``g = −Σ_{i∈D_f} ∇_S ℓ(x_i, y_poisoned_i)``
  (removal without corrected labels);
* ``second_order``: ``d = (H_SS + λI)⁻¹ g`` where ``H`` is the Hessian of the *summed* training loss
  (``N ×`` the profiled mean-loss Hessian): ``solver="diag"`` uses the profile's diagonal, ``"cg"`` / ``"lissa"``
  solve with Hessian-vector products on ``hvp_samples`` training samples.

The step size ``τ`` is chosen by the request's criterion (:mod:`~lightning_unlearn.unlearn.request.criterion`) with
:func:`~lightning_unlearn.unlearn.request.step_search.search_step`: ``steps`` is a coarse log grid that brackets the
minimum of the score, and a golden-section search on ``log τ`` refines it. ``criterion="target"`` (the default) scores
a step by the validation loss on the retained classes plus the distance to the forgetting target on the forget set
(:mod:`~lightning_unlearn.unlearn.request.target`); ``"loss"`` by the clean validation loss alone (the paper's recipe:
optionally weighted to the retain set's classes, ``validation_weights="retain"``, and joined by the corrected forget
set, ``forget_weight``). ``τ = 0``, "no change", is always a candidate. The second-order update searches its damping λ
the same way (every λ gets its own step search), and a ``Validated`` selection its candidates; discrete choices keep
the earlier candidate unless a later one is better beyond the noise (:func:`~lightning_unlearn.unlearn.request.
criterion.prefer`). Each evaluation costs one forward pass over the validation split (and the forget set), most of it
served from the frozen-activation cache. The test set is never looked at.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities import rank_zero_warn

from lightning_unlearn.batches import unpack_batch
from lightning_unlearn.curvature.precision import no_autocast
from lightning_unlearn.evaluation.cost import device_clock
from lightning_unlearn.evaluation.figures import log_figure, step_search_figure
from lightning_unlearn.selection import ParameterMask, Validated
from lightning_unlearn.unlearn.base import UnlearnContext, UnlearnMethod
from lightning_unlearn.unlearn.request.criterion import CRITERIA as SEARCH_CRITERIA
from lightning_unlearn.unlearn.request.criterion import prefer, score
from lightning_unlearn.unlearn.request.step_search import DEFAULT_TOL, search_step

CRITERIA = (*SEARCH_CRITERIA, "fixed")
VALIDATION_WEIGHTS = ("uniform", "retain")
SOLVERS = ("diag", "cg", "lissa")


def forget_gradient(
    net: torch.nn.Module,
    x: torch.Tensor,
    y_poisoned: torch.Tensor,
    y_true: torch.Tensor | None,
    params: list[torch.nn.Parameter],
    weight: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``Σ_i w_i [∇ ℓ(x_i, y_true_i) − ∇ ℓ(x_i, y_poisoned_i)]`` w.r.t. ``params`` over a batch (one forward, one
    backward); ``w_i = 1`` by default (0 marks padding). ``y_true=None`` (removal: nothing in place of the removed
    samples) drops the first term: ``−Σ_i w_i ∇ ℓ(x_i, y_poisoned_i)``.

    Cross-entropy summed over the batch; the network is used as it is (callers put it in ``eval()``). Autocast is
    switched off: under ``precision="16-mixed"`` Lightning runs ``training_step`` in autocast, and a float16 backward
    pass without a loss scaler lets small gradients underflow to zero; the one-step update is one pass over the
    forget set, so it is computed in the weights' own precision. Gradients come back in at least float32 (with
    half-precision weights a sum over the forget set would lose its small terms, or overflow, in float16).
    """
    with torch.enable_grad(), no_autocast(x.device.type):
        logits = net(x)
        per_sample = -F.cross_entropy(logits, y_poisoned, reduction="none")
        if y_true is not None:
            per_sample = per_sample + F.cross_entropy(logits, y_true, reduction="none")
        loss = per_sample.sum() if weight is None else (weight.to(per_sample.dtype) * per_sample).sum()
        grads = torch.autograd.grad(loss, params)
    return [g.detach().to(torch.promote_types(g.dtype, torch.float32)) for g in grads]


def _require_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a non-finite gradient or direction before any parameter is touched (the model stays as it was)."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise FloatingPointError(
            f"The {what} is non-finite (NaN/inf) in {bad}: the model is left unchanged. Check the checkpoint's "
            "weights and the forget set's inputs; for second-order updates, increase `damping`."
        )


def _selection_candidates(module: UnlearnContext) -> list[tuple[str | None, ParameterMask | None]]:
    """The candidates of a :class:`~lightning_unlearn.selection.Validated` selection (in its order of preference),
    else one: the selection."""
    if isinstance(module.selection, Validated):
        return list(module.selection.candidates(module.profile))
    return [(None, None)]


def _restrict(tensor: torch.Tensor, mask: ParameterMask, name: str) -> torch.Tensor:
    """``tensor`` (of parameter ``name``) with the entries outside a candidate selection set to zero."""
    if name not in mask.masks:
        return torch.zeros_like(tensor)
    return tensor if mask.is_full(name) else tensor * mask.masks[name].to(tensor.device, tensor.dtype)


def _chosen_mask(mask: ParameterMask, label: str, candidates: list[dict[str, Any]]) -> ParameterMask:
    """The chosen candidate's mask, with what the validated choice saw in its details."""
    scores = {}
    for c in candidates:  # each candidate's best evaluation
        key = c.get("selection")
        if key not in scores or (c["score"], c["step"]) < (scores[key]["score"], scores[key]["step"]):
            scores[key] = c
    keys = ("step", "score", "val_loss", "val_acc", "distance")
    table = [{"selection": k, **{key: c[key] for key in keys if key in c}} for k, c in scores.items()]
    details = {**mask.details, "validated": True, "chosen": label, "candidates": table}
    return ParameterMask(mask.masks, f"validated:{mask.strategy}", list(mask.layers), details)


@torch.no_grad()
def _apply(
    params: dict[str, torch.nn.Parameter],
    original: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor] | None,
    step: float,
) -> None:
    """``θ = θ₀ − step · d``; step 0 writes the original values back exactly."""
    for name, p in params.items():
        p.copy_(original[name] - step * direction[name].to(p.dtype) if step else original[name])


def _log_search(module: UnlearnContext, method: OneStepMethod) -> None:
    """The chosen step's validation scores as scalars, and every evaluated step as a figure, to the loggers."""
    result, trainer = method.result, module.attached_trainer
    scalars = {f"unlearn/{k}": float(result[k]) for k in ("step", "val_loss", "val_acc") if k in result}
    if scalars and trainer is not None:
        module.log_dict(scalars)
    if method._candidates and method.criterion != "fixed":
        if trainer is not None and trainer.is_global_zero:
            draw = lambda: step_search_figure(method._candidates, result, method.name)  # noqa: E731
            log_figure(trainer.loggers, "unlearn/step_search", draw, module.global_step)


class OneStepMethod(UnlearnMethod):
    """Shared machinery: accumulate ``g`` over the forget set, turn it into a direction, search the step on validation.

    Args:
        steps: The coarse grid of step sizes ``τ`` (positive) that brackets the search; ``0`` is always added. With
            ``criterion="fixed"``: the single step to apply.
        criterion: ``"target"`` (the default, unless ``forget_weight`` or ``validation_weights`` ask for the
            validation-loss criterion: the lowest score of the request's forgetting target, validation loss
            on the retained classes plus the distance to the target, :mod:`~lightning_unlearn.unlearn.request.
            target`), ``"loss"`` (lowest validation cross-entropy: the paper's recipe), both by the grid, then
            extension beyond the grid's ends and golden-section refinement on ``log τ``; ``"acc"`` (highest
            validation accuracy on the grid only; ties → lower loss, then the smaller step) or ``"fixed"`` (apply
            the single step in ``steps``, no search).
        batch_size: Batch size over the forget set.
        tol: Tolerance of the refinement, in decades of ``τ`` (``criterion="loss"``).
        validation_weights: How the validation samples count in the criterion. ``"uniform"``: equally (the plain
            validation loss / accuracy). ``"retain"``: a sample of class ``c`` counts ``p_retain(c) / p_val(c)``,
            so the criterion estimates the loss on the *retain* set's class distribution, which is what the model
            retrained without the forget set minimises. A class that leaves the training data entirely (class-wise
            forgetting) gets weight 0: its validation samples can no longer hold the step back from forgetting it.
            Measured, not universal: it wrecks the flattest layer in a label flip (``docs/results.md``); pick it
            per scenario. Costs one pass over the retain set's labels.
        forget_weight: Weight ``w`` of the forget set *with its corrected labels* in the criterion: the score is
            ``L_val + w · L_forget`` (mean cross-entropies; ``criterion="acc"``: ``(A_val + w · A_forget) / (1 + w)``).
            Clean validation cannot see what only the forget samples carry — a backdoor's trigger is on no
            validation image, so every step along the forget gradient only raises the clean loss and the search
            keeps "no change"; the corrected forget set (which a poison's requester holds) shows the step that
            removes it. ``0`` (default): validation alone. Needs corrected labels (not for removal methods). For
            ``criterion="loss"`` and ``"acc"`` (the target criterion measures the forget set itself).
    """

    one_step = True
    needs_corrected_labels = True  # Warnecke's update: ∇ℓ(x, corrected) − ∇ℓ(x, trained-on)
    default_steps: tuple[float, ...] = ()

    def __init__(
        self,
        steps: list[float] | None = None,
        criterion: str | None = None,
        batch_size: int = 512,
        tol: float = DEFAULT_TOL,
        validation_weights: str = "uniform",
        forget_weight: float = 0.0,
    ) -> None:
        if criterion is None:  # the options of the validation-loss criterion ask for it; otherwise the target's
            criterion = "loss" if forget_weight or validation_weights != "uniform" else "target"
        steps = list(self.default_steps if steps is None else steps)
        if not steps or any(not math.isfinite(s) or s <= 0 for s in steps):
            raise ValueError(f"`steps` must be a non-empty list of positive step sizes, got {steps}.")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}.")
        if criterion == "fixed" and len(steps) != 1:
            raise ValueError(f"`criterion='fixed'` needs exactly one step in `steps`, got {steps}.")
        if not tol > 0:
            raise ValueError(f"`tol` must be > 0 (decades of the step size), got {tol}.")
        if validation_weights not in VALIDATION_WEIGHTS:
            raise ValueError(f"`validation_weights` must be one of {VALIDATION_WEIGHTS}, got {validation_weights!r}.")
        self.validation_weights = validation_weights
        number = isinstance(forget_weight, (int, float)) and not isinstance(forget_weight, bool)
        if not (number and math.isfinite(forget_weight) and forget_weight >= 0):
            raise ValueError(f"`forget_weight` must be a finite number >= 0, got {forget_weight!r}.")
        if criterion == "target" and (forget_weight > 0 or validation_weights != "uniform"):
            raise ValueError(
                "`forget_weight` and `validation_weights` change the validation-loss criterion (`criterion='loss'`); "
                "the target criterion measures the forget set itself and weighs a removed class out on its own."
            )
        if forget_weight > 0 and not self.needs_corrected_labels:
            raise ValueError(
                f"`forget_weight` scores the forget set with its corrected labels, which {self.name!r} (a removal "
                "method, for data without them) does not use: set forget_weight=0, or use FirstOrder / SecondOrder."
            )
        self.forget_weight = float(forget_weight)
        self._class_weights: torch.Tensor | None = None
        self.steps = sorted(steps)
        self.criterion = criterion
        self.batch_size = batch_size
        self.tol = tol
        self._grad: dict[str, torch.Tensor] = {}
        self._count = 0
        self._seconds_grad = 0.0
        self.result: dict[str, Any] = {}

    def configure_optimizers(self, module: UnlearnContext) -> Any:
        return None  # the update is written directly into the parameters

    def train_dataloader(self, module: UnlearnContext) -> Any:
        self._grads, self._count, self._seconds_grad, self.result = {}, 0, 0.0, {}  # one request per fit
        return module.loader(module.datamodule.forget_pairs_dataloader().dataset, batch_size=self.batch_size)

    def gradients(self, module: UnlearnContext, batch: Any, params: list[torch.nn.Parameter]) -> dict[str, list]:
        """This batch's summed forget gradient of each variant (one: ``""``; :class:`~lightning_unlearn.unlearn.
        methods.auto.Auto` computes one per direction it tries)."""
        x, y_poisoned, weight = batch[0], batch[1], batch[-1]
        y_true = batch[2] if self.needs_corrected_labels else None  # a method without them removes (FirstOrderRemoval)
        return {"": forget_gradient(module.net, x, y_poisoned, y_true, params, weight)}

    def variant(self, setting: dict[str, Any]) -> str:
        """Which gradient of :meth:`gradients` a setting of :meth:`settings` turns into its direction."""
        return ""

    def plan(self, num_candidates: int, settings: list[dict[str, Any]]) -> list[tuple[int, list[dict[str, Any]]]]:
        """The order of the searches: runs of ``(selection candidate, its settings)``, each run under one validation
        cache. By default every setting of the first candidate, then of the next (each cache built once)."""
        return [(index, settings) for index in range(num_candidates)]

    def within_budget(self, module: UnlearnContext, label: str | None, setting: dict[str, Any]) -> bool:
        """Whether a candidate after the first is still searched (every one, by default)."""
        return True

    def searched(self, label: str | None, seconds: float) -> None:
        """A candidate's search took ``seconds`` (subclasses keep account)."""

    def finish(self, module: UnlearnContext) -> None:
        """After the update (subclasses record what they measured)."""

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> None:
        # timings read the clock once the device has finished (CUDA runs kernels asynchronously)
        start = device_clock(module.device)
        module.net.eval()
        params = module.guard.trainable
        for variant, grads in self.gradients(module, batch, list(params.values())).items():
            sums = self._grads.setdefault(variant, {})
            for name, grad in zip(params, grads, strict=True):
                sums[name] = sums[name] + grad if name in sums else grad
        self._count = self._count + batch[-1].sum()  # a tensor: no device synchronisation per batch
        self._seconds_grad += device_clock(module.device) - start

    def on_train_epoch_end(self, module: UnlearnContext) -> None:
        start = device_clock(module.device)
        flat = module.all_reduce_sum({f"{v}\0{n}": g for v, grads in self._grads.items() for n, g in grads.items()})
        count = int(module.all_reduce_sum({"n": torch.as_tensor(self._count, device=module.device)})["n"].item())
        grads: dict[str, dict[str, torch.Tensor]] = {}
        for key, g in flat.items():
            variant, name = key.split("\0", 1)
            grads.setdefault(variant, {})[name] = module.guard.mask_update(name, g)
        for grad in grads.values():
            _require_finite("forget gradient", grad)
        seconds_reduce = device_clock(module.device) - start
        seconds_direction = seconds_search = 0.0
        start = device_clock(module.device)
        self._class_weights = self._validation_class_weights(module)
        seconds_search += device_clock(module.device) - start
        params = module.guard.trainable
        original = {name: p.detach().clone() for name, p in params.items()}
        target = module.forgetting_target if self.criterion == "target" else None
        self._candidates, best, cached, notes = [], None, [], []
        candidates = _selection_candidates(module)
        for index, settings in self.plan(len(candidates), self.settings()):
            label, mask = candidates[index]
            if best is not None:  # decided before the candidate's cache is built (a skipped run costs nothing)
                settings = [setting for setting in settings if self.within_budget(module, label, setting)]
                if not settings:
                    continue
            names = [n for n in params if mask is None or (n in mask.masks and bool(mask.masks[n].any()))]
            part = {n: params[n] for n in names}
            with module.validation_cache(list(part.values())) as cache:
                if target is not None and best is None:  # the original model, before any candidate
                    self.result["target_before"] = module.read_target()[0].to_dict()
                for setting in settings:
                    grad = grads[self.variant(setting)]
                    sub_grad = {n: grad[n] if mask is None else _restrict(grad[n], mask, n) for n in names}
                    start = device_clock(module.device)
                    direction = self.direction(module, sub_grad, **setting)
                    direction = {n: module.guard.mask_update(n, d) for n, d in direction.items()}
                    if mask is not None:
                        direction = {n: _restrict(d, mask, n) for n, d in direction.items()}
                    _require_finite("update direction", direction)
                    seconds_direction += device_clock(module.device) - start
                    start = device_clock(module.device)
                    labels = setting | ({"selection": label} if label is not None else {})
                    chosen = self._search(module, part, direction, original, labels)
                    took = device_clock(module.device) - start
                    seconds_search += took
                    self.searched(label, took)
                    take, note = prefer(best, chosen, target)
                    if note is not None:
                        notes.append(note)
                    if take:
                        best = chosen | {"_direction": direction, "_params": part, "_mask": mask}
            cached.append(bool(cache is not None and cache.cached))
        self.result["validation_cached"] = all(cached)
        _apply(best["_params"], original, best["_direction"], best["step"])
        if best["_mask"] is not None:  # Validated: the chosen candidate is the request's selection
            module.mask = _chosen_mask(best["_mask"], best["selection"], self._candidates)
            module.selected_names = set(module.mask.trainable)
        best = {k: v for k, v in best.items() if not k.startswith("_")}
        self._warn_about(best)
        measured = ("val_loss", "val_acc", "forget_loss", "forget_acc", "selection", "distance", "forget_stat", "level")
        every = [g for grad in grads.values() for g in grad.values()]
        self.result.update(
            forget_samples=count,
            step=best["step"],
            **{k: best[k] for k in measured if k in best},
            **{k: v for k, v in best.items() if k in self.setting_keys},
            candidates=self._candidates,
            evaluations=len(self._candidates),
            choice_notes=notes,
            grad_norm=float(torch.sqrt(sum((g.double() ** 2).sum() for g in every)).item()),
            seconds_update=self._seconds_grad + seconds_reduce + seconds_direction,
            seconds_search=seconds_search,
        )
        self.finish(module)
        _log_search(module, self)

    # ------------------------------------------------------------------------------------------------- direction
    #: Keys of :meth:`settings` (hyper-parameters searched besides the step, e.g. ``damping``).
    setting_keys: tuple[str, ...] = ()

    def settings(self) -> list[dict[str, Any]]:
        """The settings of the direction searched besides the step (one empty setting: nothing else is searched)."""
        return [{}]

    def direction(
        self, module: UnlearnContext, grad: dict[str, torch.Tensor], **setting: Any
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------- search
    @torch.no_grad()
    def _search(
        self,
        module: UnlearnContext,
        params: dict[str, torch.nn.Parameter],
        direction: dict[str, torch.Tensor],
        original: dict[str, torch.Tensor],
        setting: dict[str, Any],
    ) -> dict[str, Any]:
        """Search the step along ``direction`` for ``params`` (left at ``original`` afterwards); returns the best
        evaluation with its ``score``."""
        if self.criterion == "fixed":
            return {"step": self.steps[0], "score": 0.0, "phase": "fixed", **setting}
        parts: dict[float, Any] = {}

        def evaluate(step: float) -> tuple[float, dict[str, Any]]:
            _apply(params, original, direction, step)
            value, measured, parts[step] = score(module, self.criterion, self._class_weights, self.forget_weight)
            return value, {**measured, **setting}

        search = search_step(evaluate, self.steps, refine=self.criterion != "acc", tol=self.tol)
        _apply(params, original, direction, 0.0)
        self._candidates.extend(search.evaluations)
        return search.best | {"_parts": parts[search.best["step"]]}

    def _validation_class_weights(self, module: UnlearnContext) -> torch.Tensor | None:
        """``p_retain(c) / p_val(c)`` per class for ``validation_weights="retain"`` (None: uniform); recorded in the
        report as ``class_weights``."""
        if self.validation_weights == "uniform" or self.criterion == "fixed":
            return None
        labels = torch.cat([unpack_batch(batch)[1].reshape(-1) for batch in module.datamodule.val_dataloader()])
        if labels.numel() == 0:
            raise ValueError("The validation loader yielded no samples.")
        num_classes = int(labels.max()) + 1
        val = torch.bincount(labels.cpu(), minlength=num_classes).double()
        retain = module.split_class_counts("retain", num_classes)
        if retain.sum() == 0:
            raise ValueError(
                "`validation_weights='retain'` needs retain samples of the validation split's classes; the retain "
                "set has none. Use validation_weights='uniform'."
            )
        weights = torch.where(val > 0, (retain / retain.sum()) / (val / val.sum()).clamp_min(1e-300), 0.0)
        self.result["class_weights"] = [round(float(w), 6) for w in weights]
        return weights

    def _warn_about(self, best: dict[str, Any]) -> None:
        if self.criterion == "fixed":
            return
        if best["step"] == 0.0:
            before = self.result.get("target_before")
            state = "" if before is None else f" (the target was {'already' if before['met'] else 'not'} met)"
            what = {"loss": "validation loss", "acc": "validation acc", "target": "target criterion"}[self.criterion]
            rank_zero_warn(f"{self.name}: no step improved the {what}{state}; the model is unchanged.")
        elif best["step"] >= max(c["step"] for c in self._candidates):
            rank_zero_warn(f"{self.name}: the largest step {best['step']:.3g} was chosen; consider extending `steps`.")
        elif best["step"] <= min(c["step"] for c in self._candidates if c["step"] > 0):
            rank_zero_warn(f"{self.name}: the smallest step {best['step']:.3g} was chosen; consider smaller `steps`.")

    def report(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "criterion": self.criterion,
            "tol": self.tol,
            "validation_weights": self.validation_weights,
            "forget_weight": self.forget_weight,
            **self.result,
        }

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

    def direction(
        self, module: UnlearnContext, grad: dict[str, torch.Tensor], **setting: Any
    ) -> dict[str, torch.Tensor]:
        return grad


class FirstOrderRemoval(FirstOrder):
    """First-order **removal**, for forget sets without corrected labels (privacy requests, class removal):
    ``θ_S ← θ_S + τ Σ_{i∈D_f} ∇_S ℓ(x_i, y_i)``, ``y_i`` the labels the model was trained on.

    Warnecke et al.'s first-order update with nothing in place of the removed points (their ``Z̃`` empty): the
    gradient is ``g = −Σ_i ∇_S ℓ(x_i, y_i)`` and the update ``θ_S − τ g``, an ascent step on the forget set's summed
    loss. ``τ`` is searched on validation exactly as :class:`FirstOrder` searches it (same arguments, same grid).
    """

    name = "first_order_removal"
    needs_corrected_labels = False  # only the labels the model was trained on
