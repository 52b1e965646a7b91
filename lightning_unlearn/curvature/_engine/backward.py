"""The engine's backward passes: the ``K`` columns of every sample, from the logits down, segment by segment."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from lightning_unlearn.curvature._engine.base import LayerRule, NoProducts, Settings
from lightning_unlearn.curvature._engine.buffers import Buffers
from lightning_unlearn.curvature._engine.capture import Capture, first_layers
from lightning_unlearn.curvature._engine.planner import Segment


def backpropagate(
    segments: list[Segment],
    logits: Tensor,
    columns: Tensor,
    sums: dict[str, Tensor],
    buffers: Buffers,
    settings: Settings,
) -> None:
    """Backpropagate ``columns`` (m, K, C) from ``logits`` through ``segments`` (from the top down), adding every
    layer's sums of squared per-sample gradients into ``sums``.

    The ``K`` gradients of each segment's boundary tensor are handed down to the next segment; the layer states of a
    segment live in the arena of ``buffers`` (reserved by the caller), rewound between segments.
    """
    m, k = columns.shape[:2]
    arena = max(sum(c.rule.elements(c, k, settings) for c in s.layers) for s in segments)
    buffers.reserve(m * arena, segments[0].layers[-1].input)
    source: Tensor = logits
    grads_in = columns
    for index, segment in enumerate(segments):
        bottom = segment.layers[0].input_tensor if segment.cut else None
        grads_out = None
        if bottom is not None:
            grads_out = buffers.get(f"boundary{index % 2}", (m, k, *bottom.shape[1:]), bottom)
        backward_segment(segment.layers, source, bottom, grads_in, grads_out, sums, buffers, settings)
        for capture in segment.layers:
            capture.input = capture.input_tensor = capture.sink = capture.pool = None
        if bottom is None:
            break
        source, grads_in = bottom, grads_out
        del bottom
        buffers.rewind()


def backward_segment(
    captures: list[Capture],
    source: Tensor,
    bottom: Tensor | None,
    grads_in: Tensor,
    grads_out: Tensor | None,
    sums: dict[str, Tensor],
    buffers: Buffers,
    settings: Settings,
) -> None:
    """Backpropagate the ``K`` columns ``grads_in`` from ``source`` through one segment.

    The layer states of ``captures`` consume their output gradients and add their sums into ``sums``; the gradients
    reaching ``bottom`` (the boundary with the segment below) are written into ``grads_out`` (m, K, ...).
    """
    k = grads_in.shape[1]
    states: list[LayerRule | None] = []
    for c in captures:
        prefix = f"{c.name}." if c.name else ""
        direct = {pname: sums[prefix + pname] for pname, _ in c.module.named_parameters(recurse=False)}
        rule = c.rule if settings.products else NoProducts
        states.append(rule(c.name, c.module, c.input, c.output_shape, k, buffers, settings, direct, c.pool))
    # The output hooks (registered during the forward pass) hand every layer-output gradient to its layer's state as
    # soon as the backward pass has computed it; nothing is kept, so it is freed right away.
    fired = [False] * len(captures)
    column = [0]

    def make_sink(i: int) -> Callable[[Tensor], None]:
        def sink(grad: Tensor) -> None:
            states[i].consume(column[0], grad)
            fired[i] = True

        return sink

    for i, capture in enumerate(captures):
        capture.sink = None if capture.pool is not None else make_sink(i)
    # Backpropagate only as far as the boundary and the first layers: every other layer lies between them. Layers
    # with a pooling link take the gradient of their pooling output instead, returned as an extra target.
    pooled = [i for i, c in enumerate(captures) if c.pool is not None]
    targets = ([] if bottom is None else [bottom]) + [c.output_edge for c in first_layers(captures) if c.pool is None]
    first_pooled = len(targets)
    targets += [captures[i].pool.edge for i in pooled]
    # A segment below a cut at a pooling output, holding only that pooling's first layer, needs no backward pass:
    # the gradient it asks for is the one handed down, ``grads_in`` (the MNIST CNN's conv1 segment).
    own = bottom is None and source.grad_fn is not None and bool(targets)
    source_edge = get_gradient_edge(source) if own else None
    if own:
        own = all(target == source_edge for target in targets)
    # with no backward pass (``own``), the layers whose output is the source itself (a model whose only layer makes
    # the logits) get the handed-down gradient directly: their output hooks never fire
    direct = [i for i, c in enumerate(captures) if own and c.pool is None and c.output_edge == source_edge]
    try:
        for j in range(k):
            column[0] = j
            if own:
                grads: tuple[Tensor | None, ...] = (grads_in[:, j],) * len(targets)
                for i in direct:
                    states[i].consume(j, grads_in[:, j])
                    fired[i] = True
            else:
                grads = torch.autograd.grad(
                    source, targets, grad_outputs=grads_in[:, j], retain_graph=j < k - 1, allow_unused=True
                )
            for i, grad in zip(pooled, grads[first_pooled:], strict=True):
                if grad is not None:
                    states[i].consume(j, grad)
                    fired[i] = True
            if grads_out is not None:
                if grads[0] is None:
                    grads_out[:, j].zero_()
                else:
                    grads_out[:, j].copy_(grads[0])
            del grads
    finally:
        for capture in captures:
            capture.sink = None
    del targets
    for i, capture in enumerate(captures):
        state = states[i]
        states[i] = None
        if fired[i] and state is not None:  # otherwise the layer does not influence the logits
            for pname, value in state.finish().items():
                qual = f"{capture.name}.{pname}" if capture.name else pname
                sums[qual] += value.to(sums[qual].dtype)
