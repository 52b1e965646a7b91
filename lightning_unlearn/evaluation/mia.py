"""Membership-inference attacks (MIA) on an unlearned model: the SVC attacks of OPTML's code and a loss-threshold AUC.

*SVC form* (compatible with the OPTML unlearning code base): an RBF support-vector classifier is fitted on a single
feature, the softmax probability the model gives a sample's label, to separate *members* (the first ``|test|`` samples
of the retain set, label 1) from *non-members* (the test set, label 0). The score is the share of **forget** samples it
calls non-members, in % ("MIA-efficacy"): high = the forget set looks unseen, as it would for a retrained model.

*SalUn form* (:func:`salun_scores`, :func:`mia_salun`; anchor: OPTML-Group/Unlearn-Saliency,
``Classification/evaluation/SVC_MIA.py`` as ``main_forget.py`` calls it for ``SVC_MIA_forget_efficacy``): the same
attack on five features, each with its own ``SVC(C=3, gamma="auto", kernel="rbf")`` fitted on members (shadow-train:
the first ``|test|`` retain samples, label 1) against non-members (shadow-test: the test set, label 0) and applied to
the forget set (target, no target members). Each score is the % of forget samples called non-members (SalUn's number,
a fraction, × 100). With ``p = softmax(z)`` of a sample's logits ``z`` over ``C`` classes and ``y`` its label:

* ``correctness`` = 1[argmax_j p_j = y] (0 or 1);
* ``confidence`` = p_y, the **headline** (SalUn's "MIA-Efficacy"; the same feature as the OPTML SVC score above);
* ``entropy`` = −Σ_j p_j log p_j (0 · log 0 = 0);
* ``m_entropy_song_mittal``: the modified entropy of Song & Mittal (:func:`m_entropy_song_mittal`). SalUn's code has
  a feature it calls ``m_entropy`` but computes something else: it indexes ``[:, labels]`` (for every sample, every
  class that is the label of *any* sample of the set) and takes ``log p`` where ``log(1 − p)`` belongs, so for a set
  that holds every class it is −Σ_j (1 − p_j) log p_j, independent of the label. The published formula is computed
  here, under its authors' name;
* ``prob`` = the whole vector p (a C-dimensional feature, ``gamma = 1/C``).

*Which samples.* By default (``max_samples=None``) the SVCs are fitted on SalUn's exact sets, all ``n = min(|retain|,
|test|)`` members and all ``n`` non-members; ``confidence`` then equals the OPTML SVC score. This is the robust
default: a trained model puts nearly every sample, member or not, at p_y ≈ 1 (correct, near-zero entropy), so the
SVC's call on those samples, and with it most of the forget set, is a vote between the members and the non-members
that sit there. A subsample of a few thousand changes the vote's outcome with its seed: a retrained MNIST model
scored 0.20 % (confidence) and 0.44 % (correctness) on one 2,000-sample subsample, 99.36 % and 99.56 % on the full
sets (as SalUn's own code), and ``entropy`` moved by 80 points between subsample seeds.

*Cost.* MNIST's 10,000 + 10,000 take 40–80 s per model for the five features on a shared 2-core CPU (measured: 42 s
for an MNIST CNN trained 3 epochs on 24,000 images, 44–81 s for others); the test suite's debug run (3,800 + 3,800)
5 s. The cheaper alternative, ``max_samples=k``: ``subsample_repeats`` seeded random subsamples of ``k`` members and
``k`` non-members, each attacked, the scores averaged and their sample standard deviation reported as
``<feature>_std``; roughly ``subsample_repeats · (k / n)²`` of the full cost (the MNIST CNN above: 2 s for one
2,000-sample subsample, 11 s for five). A large ``_std`` says the score is decided by the subsample, not by the model.
A retain set shorter than the test set cuts the test set to its length (SalUn's code would fail there).

*Loss threshold*: the ROC-AUC of ``-loss`` as a score separating members (1) from non-members (0). 0.5 = the sets are
indistinguishable, 1 = every member has a lower loss than every non-member. Run it on retain-vs-test (how much the
model overfits) and on forget-vs-test (does the forget set still look like training data).

scikit-learn is needed for the attacks (``pip install lightning-unlearn[eval]``); it is imported when they are called.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lightning_unlearn.evaluation.metrics import evaluating, iter_logits, predictions

SVC_PARAMS: dict[str, Any] = {"C": 3, "gamma": "auto", "kernel": "rbf"}
#: The SalUn attack's features, in their code's order (its ``m_entropy`` replaced by Song & Mittal's published
#: formula, under their name); ``confidence`` is the headline.
SALUN_FEATURES = ("correctness", "confidence", "entropy", "m_entropy_song_mittal", "prob")
#: Default cap on the SalUn attack's members and on its non-members: None, SalUn's full sets (module docstring: a
#: subsample of a few thousand decides the near-binary scores by its seed).
SALUN_MAX_SAMPLES: int | None = None
#: Default number of seeded subsamples averaged when a cap is set (their spread is reported as ``<feature>_std``).
SALUN_SUBSAMPLE_REPEATS = 5
_LOG_FLOOR = 1e-30  # Song & Mittal's `small_value`: log of anything smaller is log(1e-30)


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
    for name, values in (("members", members), ("nonmembers", nonmembers), ("forget", forget)):
        _require(values, name)
    return svc_nonmember_share(members.reshape(-1, 1), nonmembers.reshape(-1, 1), forget.reshape(-1, 1))


def svc_nonmember_share(members: torch.Tensor, nonmembers: torch.Tensor, targets: torch.Tensor) -> float:
    """Fit ``SVC(**SVC_PARAMS)`` on feature rows ``members`` (label 1) vs ``nonmembers`` (label 0), both ``(n, d)``;
    return the % of ``targets`` rows (``(m, d)``) it predicts to be non-members."""
    import numpy as np
    from sklearn.svm import SVC

    features = torch.cat([members, nonmembers]).double().numpy()
    targets_np = torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))]).double().numpy()
    # A confident model gives many samples the same feature (probability 1.0 in float32): each distinct (feature,
    # label) row is fitted once with its count as sample weight, which is the same SVM problem (a weight scales that
    # point's C, as repeating it does) at a fraction of the kernel's size (MNIST: 20,000 points -> ~10,000, ~3x faster)
    rows, counts = np.unique(np.column_stack([features, targets_np]), axis=0, return_counts=True)
    clf = SVC(**SVC_PARAMS).fit(rows[:, :-1], rows[:, -1], sample_weight=counts.astype(np.float64))
    predicted_member = clf.predict(targets.double().numpy().reshape(len(targets), -1))
    return float(100.0 * (1.0 - predicted_member.mean()))


def m_entropy_song_mittal(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Modified entropy of each sample (Song & Mittal, "Systematic Evaluation of Privacy Risks of Machine Learning
    Models", USENIX Security 2021, eq. 6; their code: inspire-group/membership-inference-evaluation, ``_m_entr_comp``).

    ``Mentr(p, y) = −(1 − p_y) log p_y − Σ_{j≠y} p_j log(1 − p_j)``: low for a confident, correct prediction, high for
    a confident wrong one (unlike the entropy, it uses the label). Logarithms of arguments below 1e-30 are taken at
    1e-30, as in their code. Not SalUn's ``m_entropy`` (module docstring), which computes another quantity.

    Args:
        probs: ``(n, C)`` probabilities (rows summing to 1).
        labels: ``(n,)`` labels.

    Returns:
        ``(n,)`` values, in the dtype of ``probs``.
    """
    y = labels.long().unsqueeze(1)
    floor = torch.tensor(_LOG_FLOOR, dtype=probs.dtype)
    log_p = torch.log(torch.maximum(probs, floor))
    log_not_p = torch.log(torch.maximum(1.0 - probs, floor))
    is_label = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, y, True)
    return -torch.where(is_label, (1.0 - probs) * log_p, probs * log_not_p).sum(dim=1)


def salun_features(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """SalUn's five attack features of each sample, in float64 (formulas: the module docstring).

    Args:
        logits: ``(n, C)`` logits.
        labels: ``(n,)`` labels (the ones the model is asked about: for a forget set, those it was trained with).

    Returns:
        ``{name: tensor}`` for :data:`SALUN_FEATURES`: ``(n,)`` tensors, ``prob`` ``(n, C)``.
    """
    z = logits.double()
    p = torch.softmax(z, dim=-1)
    return {
        "correctness": (z.argmax(dim=1) == labels.long()).double(),
        "confidence": p.gather(1, labels.long().unsqueeze(1)).squeeze(1),
        "entropy": -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(dim=1),
        "m_entropy_song_mittal": m_entropy_song_mittal(p, labels),
        "prob": p,
    }


def _subsample(count: int, max_samples: int | None, generator: torch.Generator) -> torch.Tensor:
    """Positions ``0..count-1``, or a random ``max_samples`` of them in increasing order."""
    if max_samples is None or count <= max_samples:
        return torch.arange(count)
    return torch.randperm(count, generator=generator)[:max_samples].sort().values


def _sample_std(values: list[float]) -> float:
    """Sample standard deviation of ``values``; NaN for fewer than two."""
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _check_positive(value: int | None, name: str, none_ok: bool) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1 (or None, where ``none_ok``)."""
    if value is None and none_ok:
        return
    if value is None or isinstance(value, bool) or int(value) != value or value < 1:
        allowed = "an integer >= 1 or None" if none_ok else "an integer >= 1"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def salun_scores(
    members: tuple[torch.Tensor, torch.Tensor],
    nonmembers: tuple[torch.Tensor, torch.Tensor],
    forget: tuple[torch.Tensor, torch.Tensor],
    *,
    max_samples: int | None = SALUN_MAX_SAMPLES,
    subsample_repeats: int = SALUN_SUBSAMPLE_REPEATS,
    seed: int = 0,
) -> dict[str, float]:
    """SalUn's SVC attack (forget efficacy) on precomputed outputs: one SVC per feature, % of forget samples called
    non-members (module docstring).

    The default fits on SalUn's full sets (MNIST, 10,000 + 10,000: 40–80 s per call on a 2-core CPU); a subsample of
    a few thousand decides the near-binary scores of a well-trained model by its seed (module docstring), so a cap
    is only the cheaper estimate, averaged over ``subsample_repeats`` subsamples with its spread reported.

    Args:
        members: ``(logits, labels)`` of the retain set in its fixed order; its first ``n = min(|retain|, |test|)``
            are SalUn's shadow-train set.
        nonmembers: ``(logits, labels)`` of the test set (shadow-test: its first ``n``, all of it when the retain
            set is the longer, as in SalUn).
        forget: ``(logits, labels)`` of the forget set (the target), with the labels the model was trained with.
        max_samples: None (default): all ``n`` members and non-members, SalUn's exact sets, one fit per feature.
            An integer ``k < n``: ``subsample_repeats`` seeded random subsamples of ``k`` members and ``k``
            non-members, one fit per feature on each.
        subsample_repeats: How many subsamples a cap averages over (ignored without one).
        seed: Seed of the subsamples (one generator draws them all, members then non-members of each repeat).

    Returns:
        ``{feature: %}`` for :data:`SALUN_FEATURES` (the mean over the subsamples), ``{feature}_std`` (their sample
        standard deviation, points: 0.0 for the full sets, which have no subsample to vary; NaN for a single
        subsample, whose spread is not measured), and the sizes used: ``members``, ``nonmembers`` (per fit),
        ``forget`` and ``repeats`` (fits per feature).

    Raises:
        ValueError: If a set is empty, ``max_samples`` is not a positive integer or None, or ``subsample_repeats``
            is not a positive integer.
    """
    _check_positive(max_samples, "max_samples", none_ok=True)
    _check_positive(subsample_repeats, "subsample_repeats", none_ok=False)
    for name, (logits, _) in (("members", members), ("nonmembers", nonmembers), ("forget", forget)):
        _require(logits, name)
    # SalUn: the first |test| retain samples are the members, the test set the non-members; a retain set shorter than
    # the test set cuts the test set to its size, as the OPTML SVC score does (balanced classes)
    count = min(len(members[0]), len(nonmembers[0]))
    full = max_samples is None or count <= max_samples
    repeats = 1 if full else int(subsample_repeats)
    inside = salun_features(members[0][:count], members[1][:count])
    outside = salun_features(nonmembers[0][:count], nonmembers[1][:count])
    target = salun_features(*forget)
    generator = torch.Generator().manual_seed(int(seed))
    runs: dict[str, list[float]] = {name: [] for name in SALUN_FEATURES}
    for _ in range(repeats):
        keep_in = _subsample(count, max_samples, generator)
        keep_out = _subsample(count, max_samples, generator)
        for name in SALUN_FEATURES:
            runs[name].append(
                svc_nonmember_share(
                    inside[name][keep_in].reshape(len(keep_in), -1),
                    outside[name][keep_out].reshape(len(keep_out), -1),
                    target[name].reshape(len(forget[0]), -1),
                )
            )
    scores = {name: sum(values) / len(values) for name, values in runs.items()}
    # sample standard deviation over the subsamples (NaN for a single one); the full sets have nothing to vary
    spread = {f"{name}_std": 0.0 if full else _sample_std(values) for name, values in runs.items()}
    size = len(keep_in)
    return scores | spread | {"members": size, "nonmembers": size, "forget": len(forget[0]), "repeats": repeats}


def mia_salun(
    model: nn.Module,
    retain_loader: Iterable[Any],
    test_loader: Iterable[Any],
    forget_loader: Iterable[Any],
    *,
    max_samples: int | None = SALUN_MAX_SAMPLES,
    subsample_repeats: int = SALUN_SUBSAMPLE_REPEATS,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """SalUn's SVC attack of ``model`` (:func:`salun_scores`) from loaders.

    Args:
        model: The (unlearned) classifier.
        retain_loader: Retain set D_r, in a fixed order (its first |test| samples are the members).
        test_loader: Test set (non-members).
        forget_loader: Forget set D_f, with the labels the model was trained with.
        max_samples: None (default): SalUn's full sets; an integer: the size of each subsample (see
            :func:`salun_scores`).
        subsample_repeats: How many subsamples a cap averages over.
        seed: Seed of the subsamples.
        device: Where to run; default: the model's device.

    Returns:
        As :func:`salun_scores`.
    """
    with evaluating(model, device) as dev:
        test = predictions(model, test_loader, dev)
        retain = predictions(model, retain_loader, dev, limit=len(test[1]))
        forget = predictions(model, forget_loader, dev)
    return salun_scores(retain, test, forget, max_samples=max_samples, subsample_repeats=subsample_repeats, seed=seed)


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
    "SALUN_FEATURES",
    "SALUN_MAX_SAMPLES",
    "SALUN_SUBSAMPLE_REPEATS",
    "SVC_PARAMS",
    "label_probabilities",
    "loss_auc",
    "losses",
    "m_entropy_song_mittal",
    "mia_loss_auc",
    "mia_salun",
    "mia_summary",
    "mia_svc",
    "salun_features",
    "salun_scores",
    "svc_nonmember_share",
    "svc_score",
]
