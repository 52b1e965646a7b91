"""The audit ledger of an unlearned checkpoint: every request that led to it, oldest first.

Each unlearned checkpoint carries ``unlearning_history``, a list with one entry per request of its chain (the
parent's entries copied, this request's appended):

* ``forget``: the forget set as content, ``count``, ``sha256`` (of its sorted sample digests, see
  :mod:`lightning_unlearn.data.identity`) and the per-sample ``samples`` digests (to find a partial repeat);
* ``method``, ``selection``, ``time`` (UTC), ``forced`` (``--force`` repeated a forget set);
* ``parent``: the checkpoint (or run) unlearned and the fingerprint of its weights; ``weights``: the fingerprint of
  the unlearned weights (:func:`~lightning_unlearn.curvature.weights_fingerprint`);
* ``metrics``: the request's key numbers (forget / test accuracy before and after, ToW against a reference).

A request whose forget set was already removed by an earlier step of its chain is refused unless forced
(:func:`check_repeat`), and a reference whose weights are one of the chain's is refused (:func:`chain_weights`).
``lightning-unlearn history CKPT`` prints the chain (:func:`print_history`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from lightning_unlearn.data.identity import overlap_count

__all__ = [
    "HISTORY_KEY",
    "history_of",
    "check_repeat",
    "new_entry",
    "chain_weights",
    "format_history",
    "print_history",
]

HISTORY_KEY = "unlearning_history"
#: The report's numbers every ledger entry keeps (those the report has).
KEY_METRICS = (
    "before/forget/acc",
    "after/forget/acc",
    "before/test/acc",
    "after/test/acc",
    "before/test/acc_attacked",
    "after/test/acc_attacked",
    "before/test/asr",
    "after/test/asr",
    "comparison/tow",
)


def history_of(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chain recorded in a checkpoint's contents: its ``unlearning_history``; for an unlearned checkpoint of an
    older version (``unlearned_from`` only) one entry whose forget set is unknown; ``[]`` for a trained model."""
    history = state.get(HISTORY_KEY)
    if isinstance(history, list):
        return [dict(entry) for entry in history if isinstance(entry, Mapping)]
    parent = state.get("unlearned_from")
    if isinstance(parent, Mapping):
        return [
            {
                "step": 1,
                "method": parent.get("method"),
                "selection": parent.get("selection"),
                "parent": {"checkpoint": parent.get("checkpoint"), "run": parent.get("run")},
                "forget": None,
                "note": "written by an earlier version: its forget set was not recorded",
            }
        ]
    return []


def check_repeat(history: list[dict[str, Any]], digests: list[str], force: bool) -> list[str]:
    """Compare a request's forget set (its sample digests) with every earlier step of the chain.

    Returns:
        Notes for the report: the earlier steps that removed some of these samples, and a repeat that ``force``
        allowed.

    Raises:
        ValueError: If the earlier steps already unlearned every one of these samples and ``force`` is False.
    """
    notes, removed = [], set()
    count = len(digests)
    for entry in history:
        forget = entry.get("forget")
        if not isinstance(forget, Mapping) or not isinstance(forget.get("samples"), list):
            continue
        shared = overlap_count(digests, forget["samples"])
        if shared:
            removed.update(forget["samples"])
            step = f"step {entry.get('step')}"
            where = f"{step} of this checkpoint's history ({entry.get('method')}, {entry.get('time')})"
            notes.append(f"{shared:,} of the {count:,} forget samples were already unlearned by {where}.")
    if count and overlap_count(digests, removed) == count:
        message = (
            f"Every sample of this forget set ({count:,} samples) was already unlearned by earlier requests of this "
            f"checkpoint's chain: {' '.join(notes)}"
        )
        if not force:
            raise ValueError(
                f"{message} Unlearning them again is rarely what you want; pass `force=True` (`--force`) to do it "
                "anyway (`lightning-unlearn history CKPT` prints the chain)."
            )
        notes.append("Every sample was already unlearned earlier; repeated with force.")
    return notes


def new_entry(
    history: list[dict[str, Any]],
    *,
    digests: list[str],
    fingerprint: str,
    method: str,
    selection: str | None,
    parent: dict[str, Any],
    weights: str,
    report: Mapping[str, Any] | None,
    forced: bool,
) -> list[dict[str, Any]]:
    """``history`` with this request's entry appended (a new list)."""
    metrics: dict[str, float] = {}
    for key in KEY_METRICS:
        section, _, name = key.partition("/")
        value = (report or {}).get(section, {}).get(name) if isinstance((report or {}).get(section), Mapping) else None
        if isinstance(value, (int, float)):
            metrics[key] = float(value)
    entry = {
        "step": len(history) + 1,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "forget": {"count": len(digests), "sha256": fingerprint, "samples": list(digests)},
        "method": method,
        "selection": selection,
        "parent": parent,
        "weights": weights,
        "metrics": metrics,
        "forced": forced,
    }
    return [*history, entry]


def chain_weights(history: list[dict[str, Any]]) -> dict[str, str]:
    """Weights fingerprint → which model of the chain it is (every step's parent and result)."""
    known = {}
    for entry in history:
        parent = entry.get("parent") or {}
        if isinstance(parent.get("weights"), str):
            label = "the original model" if entry.get("step") == 1 else f"the model before step {entry.get('step')}"
            known.setdefault(parent["weights"], f"{label} ({parent.get('checkpoint') or parent.get('run')})")
        if isinstance(entry.get("weights"), str):
            known.setdefault(entry["weights"], f"the result of step {entry.get('step')}")
    return known


def _short(value: Any, digits: int = 16) -> str:
    return str(value)[:digits] if value else "?"


def format_history(history: list[dict[str, Any]], where: str) -> str:
    """The chain as a table, one line per step (forget-set hash, method, selection, weights, key metrics)."""
    if not history:
        return f"{where}: no unlearning history (a trained model, not an unlearned one)."
    lines = [f"{where}: {len(history)} unlearning request{'s' if len(history) > 1 else ''}, oldest first", ""]
    header = (
        f"{'step':>4}  {'time (UTC)':<25} {'method':<20} {'selection':<24} {'forget':>8}  {'forget sha256':<16}  "
        f"{'weights before -> after':<35} metrics"
    )
    lines.append(header)
    for entry in history:
        forget = entry.get("forget") or {}
        parent = entry.get("parent") or {}
        metrics = entry.get("metrics") or {}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "forget" in k or k == "comparison/tow")
        count = forget.get("count")
        lines.append(
            f"{entry.get('step', '?'):>4}  {str(entry.get('time') or '?'):<25} {str(entry.get('method')):<20} "
            f"{str(entry.get('selection')):<24} {(f'{count:,}' if isinstance(count, int) else '?'):>8}  "
            f"{_short(forget.get('sha256')):<16}  "
            f"{_short(parent.get('weights')) + ' -> ' + _short(entry.get('weights')):<35} "
            f"{shown}{' (forced)' if entry.get('forced') else ''}{' ' + entry['note'] if entry.get('note') else ''}"
        )
    for entry in history:
        parent = entry.get("parent") or {}
        lines.append(f"  step {entry.get('step')}: unlearned {parent.get('checkpoint') or parent.get('run')}")
    return "\n".join(lines)


def print_history(checkpoint: str, as_json: bool = False) -> list[dict[str, Any]]:
    """Print every unlearning request recorded in an unlearned checkpoint (read weights-only), oldest first.

    Args:
        checkpoint: An ``unlearned.ckpt`` written by an unlearning request.
        as_json: Print the history as JSON (the per-sample digests left out) instead of a table.

    Returns:
        The history (:func:`history_of`).

    Raises:
        ValueError: If the file is missing, unreadable, or holds pickled objects.
    """
    from lightning_unlearn.checkpoints import read_checkpoint

    history = history_of(read_checkpoint(checkpoint, "checkpoint", "checkpoint"))
    if as_json:
        slim = [
            {**e, "forget": {k: v for k, v in (e.get("forget") or {}).items() if k != "samples"} or None}
            for e in history
        ]
        print(json.dumps(slim, indent=1))
    else:
        print(format_history(history, checkpoint))
    return history
