"""Plumbing shared by the estimators and the profiling loop (not public API): accumulators, per-rank random
streams, the reduction of per-rank sums to means, and how modules are named in messages."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_unlearn.distributed import all_reduce_flat

#: Key of the sample count in the flat all-reduce of :func:`reduce_diagonal_sums` (never a parameter name).
_COUNT = ""


def display(name: str) -> str:
    """A module's qualified name as messages show it (the root module has the empty name)."""
    return repr(name) if name else "<root module>"


def make_generator(seed: int, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, rank)``, so that every process draws different numbers.

    Args:
        seed: The user-facing seed.
        rank: The process rank (0 without distribution).
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(rank) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mixed)
    return generator


def init_sums(model: nn.Module, sums: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Zero accumulators, one per parameter of ``model`` (all of them, whatever their ``requires_grad``).

    Accumulators live on the parameter's device with at least float32 precision. Existing entries are kept.

    Args:
        model: The network.
        sums: An existing dict to complete in place, or ``None`` for a new one.
    """
    sums = {} if sums is None else sums
    for name, param in model.named_parameters():
        if name not in sums:
            dtype = torch.promote_types(param.dtype, torch.float32)
            sums[name] = torch.zeros(param.shape, dtype=dtype, device=param.device)
    return sums


def reduce_diagonal_sums(
    sums: dict[str, Tensor], count: int, reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[dict[str, Tensor], int]:
    """Per-parameter means from :func:`~lightning_unlearn.curvature.accumulate_diagonal`'s sums, summed over ranks.

    Args:
        sums: Per-parameter sums of one process (one rank's shard).
        count: Samples behind ``sums``.
        reduce: A sum all-reduce of one flat tensor (``lambda t: strategy.reduce(t, reduce_op="sum")``); None with
            one process. Sums and count travel in one float64 tensor (:func:`~lightning_unlearn.distributed.
            all_reduce_flat`), so one collective gives exactly the result of one process over the union of the shards.

    Returns:
        ``(diagonals, total)``: CPU tensors by parameter name (in the sums' dtype), and the total sample count.

    Raises:
        ValueError: If no rank saw any sample.
    """
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    counted = {**sums, _COUNT: torch.tensor(float(count), dtype=torch.float64, device=device)}
    reduced = all_reduce_flat(counted, reduce, dtype=torch.float64)
    total = int(round(reduced.pop(_COUNT).item()))
    if total == 0:
        raise ValueError("The profiling data yielded no samples.")
    return {name: (reduced[name] / total).to("cpu", sums[name].dtype) for name in sums}, total
