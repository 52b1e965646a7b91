"""Scratch memory of the engine: reusable workspaces and the arena of the layer rules' buffers."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Workspace:
    """A reusable scratch buffer: large temporaries are carved out of it instead of freshly allocated each time."""

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def get(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        buf = self._buffer
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._buffer = buf
        return buf[:numel].view(shape)


class Buffers:
    """Scratch memory reused across layers, segments and batches (fresh large allocations cost page faults).

    Two kinds: named workspaces for short-lived temporaries (``product``, ``patches``, the boundary gradients), and an
    arena from which the layer states of one backward segment take their buffers; the arena is rewound when the next
    segment starts, so the states of consecutive segments share the same memory.

    Args:
        chunk_elements: Target size of the temporaries of one product (per-sample gradients of a chunk of samples).
    """

    def __init__(self, chunk_elements: int) -> None:
        self.chunk_elements = max(1 << 12, int(chunk_elements))
        self._spaces: dict[str, Workspace] = {}
        self._arena: Tensor | None = None
        self._used = 0

    def space(self, key: str) -> Workspace:
        return self._spaces.setdefault(key, Workspace())

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return self.space(key).get(shape, like)

    def rewind(self) -> None:
        """Start a new segment: the arena's memory is handed out again from its beginning."""
        self._used = 0

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer from the arena that stays valid until the next :meth:`rewind` (contents undefined)."""
        numel = math.prod(shape)
        arena = self._arena
        if (
            arena is None
            or arena.dtype != like.dtype
            or arena.device != like.device
            or self._used + numel > arena.numel()
        ):
            return torch.empty(shape, dtype=like.dtype, device=like.device)  # not reserved: a fresh buffer
        out = arena[self._used : self._used + numel].view(shape)
        self._used += numel
        return out

    def reserve(self, numel: int, like: Tensor) -> None:
        """Make the arena hold at least ``numel`` elements of ``like``'s dtype and device (call before taking)."""
        arena = self._arena
        if arena is None or arena.dtype != like.dtype or arena.device != like.device or arena.numel() < numel:
            self._arena = None
            self._arena = torch.empty(max(1, int(numel)), dtype=like.dtype, device=like.device)
        self.rewind()
