"""The statistics of the likelihood-ratio attack (LiRA; Carlini et al., "Membership Inference Attacks From First
Principles", IEEE S&P 2022), online form; ``benchmarks/lira.py`` trains the shadow models and runs it.

Anchor: the authors' code, tensorflow/privacy ``research/mi_lira_2021`` (``train.py``: which shadow holds which
example; ``score.py``: the logit-scaled confidence; ``plot.py``: ``generate_ours``, the online attack, with and without
``fix_variance``, and ``sweep``, the ROC curve).

* :func:`logit_confidence`: ``φ = log(p_y / (1 − p_y))`` of a model's softmax ``p`` at label ``y``, computed as
  ``z_y − logsumexp_{j≠y} z_j`` from the logits ``z`` (exact, no clipping; ``score.py`` clips both terms at 1e-45).
* :func:`balanced_keep`: which shadow model trains on which candidate: every candidate in exactly ``⌊N/2⌋`` of ``N``
  shadows, at random (``train.py``: ``keep = argsort(uniform(N, P), 0) < N/2``).
* :func:`lira_scores`: per candidate, the ``φ`` of the shadows that trained on it (IN) and of those that did not (OUT)
  give ``μ_in, σ_in, μ_out, σ_out``; a target model's ``φ`` scores
  ``log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²)`` (high = member). ``μ`` is the *median* of the values and ``σ``
  their standard deviation (ddof 0) + 1e-30, as in ``plot.py`` (the paper writes the mean). With ``fixed_variance``
  ``σ_in`` is the standard deviation of all IN values of all candidates pooled, ``σ_out`` that of all OUT values
  (``plot.py`` takes the IN values for both, which reads as a slip; the paper's global variance is per side). Unlike
  ``plot.py``, every candidate uses all its IN and OUT values (``plot.py`` cuts each to the smallest count over the
  candidates to stack them; with :func:`balanced_keep` the counts are equal anyway).
* :func:`roc_summary`: the ROC-AUC and the TPR at a false-positive rate of at most ``fpr`` (default 1 %) of scores of
  members against non-members (``plot.py`` reports TPR at FPR < 0.1 %; 1 % suits a few thousand non-members).

scikit-learn (``roc_curve``) is imported when :func:`roc_summary` is called.
"""

from __future__ import annotations

import math

import torch


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``φ = log(p_y / (1 − p_y))`` per sample, in float64, from ``(n, C)`` logits and ``(n,)`` labels."""
    z = logits.double()
    y = labels.long().unsqueeze(1)
    others = z.scatter(1, y, -math.inf)
    return z.gather(1, y).squeeze(1) - torch.logsumexp(others, dim=1)


def balanced_keep(num_shadows: int, pool_size: int, seed: int) -> torch.Tensor:
    """``(num_shadows, pool_size)`` booleans: shadow ``k`` trains on candidate ``i`` iff ``keep[k, i]``; each candidate
    is kept by exactly ``num_shadows // 2`` shadows chosen at random (seeded).

    Raises:
        ValueError: If ``num_shadows`` < 2 (a candidate would lack an IN or an OUT model) or ``pool_size`` < 1.
    """
    if int(num_shadows) != num_shadows or num_shadows < 2:
        raise ValueError(f"`num_shadows` must be an integer >= 2, got {num_shadows!r}.")
    if int(pool_size) != pool_size or pool_size < 1:
        raise ValueError(f"`pool_size` must be an integer >= 1, got {pool_size!r}.")
    draws = torch.rand(num_shadows, pool_size, generator=torch.Generator().manual_seed(int(seed)))
    ranks = draws.argsort(dim=0).argsort(dim=0)
    return ranks < num_shadows // 2


def _gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _masked_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per column, the median of the entries where ``mask`` holds (the mean of the two middle ones for an even count,
    as ``numpy.median``)."""
    filled = torch.where(mask, values, torch.full_like(values, math.inf)).sort(dim=0).values
    count = mask.sum(dim=0)
    low = filled.gather(0, ((count - 1) // 2).unsqueeze(0)).squeeze(0)
    high = filled.gather(0, (count // 2).unsqueeze(0)).squeeze(0)
    return (low + high) / 2


def _masked_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum(dim=0)
    mean = torch.where(mask, values, 0.0).sum(dim=0) / count
    return (torch.where(mask, (values - mean) ** 2, 0.0).sum(dim=0) / count).sqrt()


def lira_scores(
    shadow_phi: torch.Tensor, keep: torch.Tensor, target_phi: torch.Tensor, fixed_variance: bool = False
) -> torch.Tensor:
    """Online LiRA scores of a target model's ``φ`` per candidate (formula: the module docstring); high = member.

    Args:
        shadow_phi: ``(N, P)``: ``φ`` of shadow ``k`` on candidate ``i``.
        keep: ``(N, P)`` booleans: shadow ``k`` trained on candidate ``i``.
        target_phi: ``(P,)``: the target model's ``φ`` on each candidate.
        fixed_variance: One ``σ_in`` and one ``σ_out`` for all candidates (pooled) instead of one per candidate.

    Returns:
        ``(P,)`` float64 log-likelihood ratios.

    Raises:
        ValueError: If the shapes disagree or a candidate has no IN or no OUT shadow.
    """
    phi, keep, target = shadow_phi.double(), keep.bool(), target_phi.double()
    if phi.shape != keep.shape or phi.dim() != 2 or target.shape != phi.shape[1:]:
        raise ValueError(
            f"`shadow_phi` and `keep` must both be (shadows, candidates) and `target_phi` (candidates,); got "
            f"{tuple(phi.shape)}, {tuple(keep.shape)}, {tuple(target.shape)}."
        )
    for side, mask in (("IN", keep), ("OUT", ~keep)):
        if not bool(mask.any(dim=0).all()):
            raise ValueError(f"Every candidate needs at least one {side} shadow model; some have none (`keep`).")
    mean_in, mean_out = _masked_median(phi, keep), _masked_median(phi, ~keep)
    if fixed_variance:
        std_in = phi[keep].std(unbiased=False).expand_as(mean_in)
        std_out = phi[~keep].std(unbiased=False).expand_as(mean_out)
    else:
        std_in, std_out = _masked_std(phi, keep), _masked_std(phi, ~keep)
    return _gaussian_logpdf(target, mean_in, std_in + 1e-30) - _gaussian_logpdf(target, mean_out, std_out + 1e-30)


def roc_summary(members: torch.Tensor, nonmembers: torch.Tensor, fpr: float = 0.01) -> dict[str, float]:
    """ROC-AUC of ``members`` (positives) against ``nonmembers`` by score (high = member), and the highest TPR at a
    false-positive rate ``≤ fpr``.

    Returns:
        ``{"auc": ..., "tpr_at_fpr": ..., "fpr": fpr}`` (rates in [0, 1]).

    Raises:
        ValueError: If either set is empty or ``fpr`` is outside [0, 1].
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    if not len(members) or not len(nonmembers):
        raise ValueError("`members` and `nonmembers` must both be non-empty.")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"`fpr` must lie in [0, 1], got {fpr!r}.")
    scores = torch.cat([members.double(), nonmembers.double()]).numpy()
    truth = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    rates, tprs, _ = roc_curve(truth, scores)
    return {"auc": float(roc_auc_score(truth, scores)), "tpr_at_fpr": float(tprs[rates <= fpr].max()), "fpr": fpr}


__all__ = ["balanced_keep", "lira_scores", "logit_confidence", "roc_summary"]
