"""How far an unlearned model's outputs are from the retrained model's, sample by sample (beyond ToW's accuracies).

Two models can have the same accuracy on a split and still disagree on most of its samples. For each split of a
request (the forget set with the labels it was trained on, the validation split and the test split), over the same
samples in the same order:

* ``distance/<split>/kl``: the mean KL divergence ``KL(p_reference(·|x) ‖ p_model(·|x))`` of the predicted class
  distributions (nats; 0 = identical outputs);
* ``distance/<split>/margin_gap``: the mean absolute difference of the margins ``f(x)_y − max_{c≠y} f(x)_c`` (the
  correct-class logit minus the largest other, as KLoM uses them; ``y`` the split's label).

The reference's outputs are computed once (:func:`split_outputs`) and kept with its metrics, so every request against
it reads them without the reference model. KLoM (Georgiev et al. 2024, ensembles of unlearned and retrained models)
is the benchmark's (``benchmarks/auto.py``): it needs several trainings per side.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_unlearn.batches import unpack_batch

__all__ = ["DISTANCE_SPLITS", "ReferenceMetrics", "margins", "split_outputs", "output_distance"]

#: The splits distances are measured on.
DISTANCE_SPLITS = ("forget", "val", "test")


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits[y] − max_{c ≠ y} logits[c]`` per sample."""
    logits = logits.double()
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -torch.inf).max(1).values
    return own - others


def _loader(datamodule: Any, split: str) -> Any:
    if split == "forget":
        return datamodule.forget_dataloader()
    if split == "val":
        return datamodule.val_dataloader()
    loaders = datamodule.test_dataloader() if callable(getattr(datamodule, "test_dataloader", None)) else None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


@torch.no_grad()
def split_outputs(
    net: nn.Module, datamodule: Any, device: torch.device | str | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (logits, labels)}`` of ``net`` (in eval mode; its modes restored) on :data:`DISTANCE_SPLITS` that
    the data has, on the CPU."""
    device = torch.device(device) if device is not None else next(net.parameters()).device
    modes = {m: m.training for m in net.modules()}
    net.eval()
    out = {}
    try:
        for split in DISTANCE_SPLITS:
            loader = _loader(datamodule, split)
            if loader is None:
                continue
            logits, labels = [], []
            for batch in loader:
                x, y = unpack_batch(batch)
                logits.append(net(x.to(device)).float().cpu())
                labels.append(torch.as_tensor(y).reshape(-1).cpu())
            if logits:
                out[split] = (torch.cat(logits), torch.cat(labels))
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return out


def output_distance(
    model: dict[str, tuple[torch.Tensor, torch.Tensor]], reference: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """``distance/<split>/kl`` and ``distance/<split>/margin_gap`` (see the module docstring) for every split both
    hold with the same samples."""
    out = {}
    for split, (ref_logits, labels) in reference.items():
        if split not in model or model[split][0].shape != ref_logits.shape:
            continue
        logits = model[split][0]
        ref_log_p = torch.log_softmax(ref_logits.double(), 1)
        log_p = torch.log_softmax(logits.double(), 1)
        kl = (ref_log_p.exp() * (ref_log_p - log_p)).sum(1)
        out[f"distance/{split}/kl"] = float(kl.mean())
        gap = margins(logits, labels) - margins(ref_logits, labels)
        out[f"distance/{split}/margin_gap"] = float(gap.abs().mean())
    return out


class ReferenceMetrics(dict):
    """A reference's metrics (a plain ``dict`` of floats, as :func:`~lightning_unlearn.evaluation.suite.
    evaluate_model` returns), carrying its logits on the request's splits (``outputs``,
    :func:`~lightning_unlearn.evaluation.distance.split_outputs`), from which every request against it measures the
    per-sample distance of its outputs (``comparison/distance/…``) without the reference model. A copy through JSON
    keeps the metrics only."""

    outputs: dict[str, Any]
