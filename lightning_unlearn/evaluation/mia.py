"""Membership-inference attacks (MIA) on an unlearned model: the SVC attack of OPTML's code and a loss-threshold AUC.

*SVC form* (compatible with the OPTML unlearning code base): an RBF support-vector classifier is fitted on a single
feature, the softmax probability the model gives a sample's label, to separate *members* (the first ``|test|`` samples
of the retain set, label 1) from *non-members* (the test set, label 0). The score is the share of **forget** samples it
calls non-members, in % ("MIA-efficacy"): high = the forget set looks unseen, as it would for a retrained model.

*Loss threshold*: the ROC-AUC of ``-loss`` as a score separating members (1) from non-members (0). 0.5 = the sets are
indistinguishable, 1 = every member has a lower loss than every non-member. Run it on retain-vs-test (how much the
model overfits) and on forget-vs-test (does the forget set still look like training data).

scikit-learn is needed for the attacks (``pip install lightning-unlearn[eval]``); it is imported when they are called.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lightning_unlearn.evaluation.metrics import evaluating, iter_logits

SVC_PARAMS: dict[str, Any] = {"C": 3, "gamma": "auto", "kernel": "rbf"}


def _per_sample(
    model: nn.Module, loader: Iterable[Any], device: str | torch.device | None, kind: str, limit: int | None = None
) -> torch.Tensor:
    values = []
    with evaluating(model, device) as dev:
        for logits, y in iter_logits(model, loader, dev, limit=limit):
            logits = logits.float()
            if kind == "prob":
                values.append(F.softmax(logits, dim=-1).gather(1, y.long().unsqueeze(1)).squeeze(1).cpu())
            else:
                values.append(F.cross_entropy(logits, y.long(), reduction="none").cpu())
    return torch.cat(values) if values else torch.empty(0)


def label_probabilities(
    model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None, limit: int | None = None
) -> torch.Tensor:
    """Softmax probability the model gives each sample's label, in loader order.

    Args:
        model: A classifier returning logits (run in eval mode without gradients; its state is restored).
        loader: Batches ``(x, y, ...)`` or dicts (see ``unpack_batch``); the label is the one the loader yields.
        device: Where to run; default: the model's device.
        limit: Use only the first ``limit`` samples.

    Returns:
        A float32 CPU tensor of shape ``(n,)`` with values in [0, 1].
    """
    return _per_sample(model, loader, device, "prob", limit)


def losses(
    model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None, limit: int | None = None
) -> torch.Tensor:
    """Per-sample cross-entropy loss of the loader's labels, in loader order.

    Args:
        model: A classifier returning logits (run in eval mode without gradients; its state is restored).
        loader: Batches ``(x, y, ...)`` or dicts (see ``unpack_batch``).
        device: Where to run; default: the model's device.
        limit: Use only the first ``limit`` samples.

    Returns:
        A float32 CPU tensor of shape ``(n,)``.
    """
    return _per_sample(model, loader, device, "loss", limit)


def _require(values: torch.Tensor, name: str) -> torch.Tensor:
    if len(values) == 0:
        raise ValueError(f"`{name}` yielded no samples; expected a non-empty loader.")
    return values


def mia_svc(
    model: nn.Module,
    retain_loader: Iterable[Any],
    test_loader: Iterable[Any],
    forget_loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
) -> float:
    """SVC membership-inference score of the forget set (OPTML-compatible "MIA-efficacy"), in %.

    Members are the first ``n`` samples of ``retain_loader`` (label 1) and non-members the first ``n`` of
    ``test_loader`` (label 0), with ``n = min(|test|, |retain|)`` so the classes are balanced; the feature is the
    softmax probability of the sample's label. ``sklearn.svm.SVC(C=3, gamma="auto", kernel="rbf")`` is fitted on them
    and applied to every forget sample.

    Args:
        model: The (unlearned) classifier.
        retain_loader: Retain set D_r, in a fixed order (not shuffled, or the members change between calls).
        test_loader: Test set (non-members).
        forget_loader: Forget set D_f; for poisoning, use the labels the model was trained with (poisoned), as OPTML
            does with its forget set.
        device: Where to run; default: the model's device.

    Returns:
        The percentage of forget samples predicted to be non-members (100 = the forget set looks unseen).

    Raises:
        ValueError: If a loader is empty.
    """
    test = _require(label_probabilities(model, test_loader, device), "test_loader")
    members = _require(label_probabilities(model, retain_loader, device, limit=len(test)), "retain_loader")
    n = min(len(members), len(test))
    members, test = members[:n], test[:n]
    forget = _require(label_probabilities(model, forget_loader, device), "forget_loader")
    return svc_score(members, test, forget)


def svc_score(members: torch.Tensor, nonmembers: torch.Tensor, forget: torch.Tensor) -> float:
    """The SVC attack on precomputed label probabilities (see :func:`mia_svc`): fit
    ``SVC(**SVC_PARAMS)`` on ``members`` (1) vs ``nonmembers`` (0), return the % of ``forget`` called non-members."""
    from sklearn.svm import SVC

    for name, values in (("members", members), ("nonmembers", nonmembers), ("forget", forget)):
        _require(values, name)
    import numpy as np

    features = torch.cat([members, nonmembers]).double().numpy()
    targets = torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))]).double().numpy()
    # A confident model gives many samples the same probability (1.0 in float32): each distinct (feature, label) pair
    # is fitted once with its count as sample weight, which is the same SVM problem (a weight scales that point's C,
    # as repeating it does) at a fraction of the kernel's size (MNIST: 20,000 points -> ~10,000, ~3x faster)
    pairs, counts = np.unique(np.stack([features, targets], axis=1), axis=0, return_counts=True)
    clf = SVC(**SVC_PARAMS).fit(pairs[:, :1], pairs[:, 1], sample_weight=counts.astype(np.float64))
    predicted_member = clf.predict(forget.double().numpy().reshape(-1, 1))
    return float(100.0 * (1.0 - predicted_member.mean()))


def mia_loss_auc(
    model: nn.Module,
    member_loader: Iterable[Any],
    nonmember_loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
) -> float:
    """Loss-threshold membership inference: ROC-AUC of ``-loss`` for members (1) against non-members (0).

    AUC does not depend on the class balance, so the loaders are used whole. Typical calls:
    ``mia_loss_auc(model, retain, test)`` and ``mia_loss_auc(model, forget, test)``.

    Args:
        model: The classifier.
        member_loader: Samples treated as members (retain or forget set).
        nonmember_loader: Samples treated as non-members (test set).
        device: Where to run; default: the model's device.

    Returns:
        The AUC in [0, 1]: 0.5 = indistinguishable, 1 = every member has a lower loss than every non-member.

    Raises:
        ValueError: If a loader is empty.
    """
    member = _require(losses(model, member_loader, device), "member_loader")
    nonmember = _require(losses(model, nonmember_loader, device), "nonmember_loader")
    return loss_auc(member, nonmember)


def loss_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """ROC-AUC of ``-loss`` separating members (1) from non-members (0), on precomputed per-sample losses."""
    from sklearn.metrics import roc_auc_score

    member = _require(member_losses, "member_losses")
    nonmember = _require(nonmember_losses, "nonmember_losses")
    scores = torch.cat([-member, -nonmember]).double().numpy()
    targets = torch.cat([torch.ones(len(member)), torch.zeros(len(nonmember))]).numpy()
    return float(roc_auc_score(targets, scores))


def mia_summary(
    model: nn.Module,
    retain_loader: Iterable[Any],
    test_loader: Iterable[Any],
    forget_loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """All MIA numbers of one model.

    Returns:
        ``{"mia_svc": mia_svc(...), "mia_loss_auc_retain": AUC retain-vs-test, "mia_loss_auc_forget":
        AUC forget-vs-test}``.
    """
    return {
        "mia_svc": mia_svc(model, retain_loader, test_loader, forget_loader, device=device),
        "mia_loss_auc_retain": mia_loss_auc(model, retain_loader, test_loader, device=device),
        "mia_loss_auc_forget": mia_loss_auc(model, forget_loader, test_loader, device=device),
    }


__all__ = [
    "SVC_PARAMS",
    "label_probabilities",
    "loss_auc",
    "losses",
    "mia_loss_auc",
    "mia_summary",
    "mia_svc",
    "svc_score",
]
