"""Whether a profile read from a file (or handed over) can be the curvature of this model's loss.

The fingerprints a profile carries say which weights and architecture it was computed for, not that its values are
the ones computed: a file edited after the fact (a layer's diagonal zeroed, or scaled) passes them, and the selection
then ranks parameters by made-up numbers. :func:`check_plausible` compares the profile with what one batch of the
training data says, cheaply:

* **no curvature where the loss has a gradient**: for a generalised Gauss-Newton (``exact``, ``mc``) or Fisher
  diagonal, a parameter whose per-sample logit Jacobian is not a multiple of the all-ones vector has a positive
  diagonal, and a non-zero loss gradient proves such a Jacobian. So a layer whose diagonal is zero everywhere while
  the batch gradient of its parameters is not is refused (for ``hutchinson``, whose Hessian diagonal may vanish in
  sums, only when the whole profile is zero);
* **the wrong order of magnitude**: for ``exact``, ``mc`` and ``fisher`` profiles, each layer's mean diagonal is
  compared with a one-batch ``mc`` estimate (:data:`SAMPLES` samples, about two backward passes); a layer off by more
  than :data:`FACTOR` either way is refused. The margin is wide on purpose: curvature is heavy-tailed over samples,
  and a batch of well-fit samples can be tens of times flatter than the training-set mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_unlearn.curvature.compute import default_batch_transform, eval_mode, profile_model, selected_output
from lightning_unlearn.curvature.profile import SharpnessProfile, layer_of

__all__ = ["check_plausible", "FACTOR", "SAMPLES"]

#: How far (either way) a layer's mean diagonal may be from the one-batch estimate's.
FACTOR = 1000.0
#: Training samples of the one-batch estimate.
SAMPLES = 128
_GGN_LIKE = ("exact", "mc", "fisher")


def _layer_means(diagonals: dict[str, torch.Tensor]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for name, value in diagonals.items():
        entry = sums.setdefault(layer_of(name), [0.0, 0.0])
        entry[0] += float(value.double().sum())
        entry[1] += value.numel()
    return {layer: total / max(count, 1) for layer, (total, count) in sums.items()}


def _zero_layers(diagonals: dict[str, torch.Tensor]) -> set[str]:
    layers: dict[str, bool] = {}
    for name, value in diagonals.items():
        layer = layer_of(name)
        layers[layer] = layers.get(layer, True) and bool((value == 0).all())
    return {layer for layer, zero in layers.items() if zero}


def _gradient_layers(
    model: nn.Module, batch: Any, output_transform: Callable[[Any], torch.Tensor] | None, device: torch.device
) -> set[str]:
    """Layers with a non-zero gradient of the mean cross-entropy on ``batch`` (the model in eval mode, unchanged)."""
    x, y = default_batch_transform(batch)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model), selected_output(model, output_transform):
        logits = model(x.to(device))
        loss = nn.functional.cross_entropy(logits.float(), y.to(device))
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {layer_of(n) for (n, _), g in zip(params, grads, strict=True) if g is not None and bool(g.abs().max() > 0)}


def check_plausible(
    profile: SharpnessProfile,
    model: nn.Module,
    batches: Iterable[Any],
    output_transform: Callable[[Any], torch.Tensor] | None = None,
    where: str = "the profile",
    device: torch.device | str | None = None,
) -> None:
    """Refuse a profile that cannot be this model's curvature (see the module docstring).

    Args:
        profile: The profile (already checked to fit the model's parameter names and shapes).
        model: The model (its own parameter names; unchanged by the check).
        batches: Training batches ``(inputs, labels, ...)``; the first :data:`SAMPLES` samples are used.
        output_transform: Maps the model's output to logits.
        where: What the profile is, for messages.
        device: Where to compute (default: the model's device).

    Raises:
        ValueError: Naming the layer and the numbers.
    """
    diagonals = profile.diagonals
    if diagonals and all(bool((v == 0).all()) for v in diagonals.values()):
        raise ValueError(
            f"{where} is zero everywhere: no trained model's loss is flat in every parameter (an empty or edited "
            "file). Recompute it."
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    first = next(iter(batches), None)
    if first is None:
        return
    zero = _zero_layers(diagonals)
    if profile.estimator in _GGN_LIKE and zero:
        moving = sorted(zero & _gradient_layers(model, first, output_transform, device))
        if moving:
            raise ValueError(
                f"{where} holds a zero diagonal everywhere in layer(s) {moving[:3]} while the training loss has a "
                f"non-zero gradient there, which a {profile.estimator!r} diagonal cannot have (an edited file?). "
                "Recompute it."
            )
    if profile.estimator not in _GGN_LIKE:
        return
    try:
        estimate = profile_model(
            model,
            batches,
            "mc",
            max_samples=SAMPLES,
            output_transform=output_transform,
            device=device,
            seed=0,
            strict=False,
        )
    except ValueError:
        return  # a layer kind the engine has no rule for: the profile's estimator could not have run either
    ours, batch = _layer_means(diagonals), _layer_means(estimate.diagonals)
    for layer, value in batch.items():
        given = ours.get(layer)
        if given is None or value <= 0:
            continue
        if given <= 0 or not (value / FACTOR <= given <= value * FACTOR):
            raise ValueError(
                f"{where} gives layer {layer!r} a mean diagonal of {given:.3g}, while {estimate.num_samples} training "
                f"samples give {value:.3g} (more than {FACTOR:g}x apart): not this model's curvature (an edited or "
                "foreign file?). Recompute it."
            )
