"""Collectives shared by the profiling loop and the unlearning module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["all_reduce_flat", "all_reduce_tensor"]


def all_reduce_flat(
    tensors: dict[str, Tensor],
    reduce: Callable[[Tensor], Tensor] | None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Reduce a dict of tensors over all processes with one collective: flatten → ``reduce`` → unflatten.

    The tensors travel in one float64 buffer on the device of the first one (float64 counts are exact up to 2**53), so
    one collective replaces one per tensor.

    Args:
        tensors: The tensors of this process, by name.
        reduce: The all-reduce of one flat tensor (e.g. ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``).
            ``None`` (one process): nothing is flattened, each tensor is only cast to ``dtype``.
        dtype: The dtype of the results; ``None``: each tensor's own dtype.

    Returns:
        The reduced tensors by name, in the input's order and shapes (on the buffer's device when ``reduce`` is given).
    """
    if not tensors:
        return {}
    if reduce is None:
        return {name: value if dtype is None else value.to(dtype) for name, value in tensors.items()}
    names = list(tensors)
    device = tensors[names[0]].device
    flat = torch.cat([tensors[name].reshape(-1).to(device, torch.float64) for name in names])
    flat = reduce(flat)
    out, offset = {}, 0
    for name in names:
        n = tensors[name].numel()
        value = flat[offset : offset + n].reshape(tensors[name].shape)
        out[name] = value.to(tensors[name].dtype if dtype is None else dtype)
        offset += n
    return out


def all_reduce_tensor(strategy: Any, flat: Tensor, op: str = "sum") -> Tensor:
    """All-reduce one tensor (in place) over all ranks with ``op`` (``"sum"`` or ``"max"``): one collective.

    ``strategy.reduce`` puts a barrier before every all-reduce (a second collective, and a host synchronisation on
    NCCL); the ranks of a step run in lockstep anyway, so the all-reduce is called directly when a default process
    group exists (DDP's), through the Lightning ``strategy`` otherwise.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return flat
    return strategy.reduce(flat, reduce_op=op)
