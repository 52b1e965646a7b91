"""The engine's planner: backward segments and their cut points, pool links, and the memory budget.

Everything here is decided from the autograd graph of a forward pass and the layer rules' per-sample element counts;
nothing changes the results beyond floating-point rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from lightning_unlearn.curvature._engine.base import Settings
from lightning_unlearn.curvature._engine.capture import Capture, PoolLink, capture_forward, first_layers, forward


@dataclass
class Plan:
    """How the engine splits its work for one model and input shape (measured by :func:`measure`).

    All sizes are per sample, in bytes.

    Attributes:
        num_classes: Number of logits.
        graph_bytes: Activations the autograd graph saves (what one training step keeps for its backward pass).
        graph_before: ``graph_before[i]``: the part of ``graph_bytes`` saved before the ``i``-th layer (in execution
            order) returned, ``i = 0..L``, the last entry being ``graph_bytes``; the part above a segment is freed once
            the segment's backward passes are done.
        peak_bytes: The estimator's own largest need at any time: the graph still alive, plus the layer states and
            the boundary gradients of the worst backward segment.
        element_size: Bytes per element of the layer outputs.
    """

    num_classes: int
    graph_bytes: int
    graph_before: list[int]
    peak_bytes: int
    element_size: int


@dataclass
class Segment:
    """Consecutive layers (in execution order) whose columns are backpropagated together.

    ``bottom`` is the first layer of the segment; its input tensor is the boundary with the segment below (``cut``
    true: every path from the layers below to the logits goes through it) or the segment is the lowest one.
    """

    layers: list[Capture]
    cut: bool


def single_output(node: Any) -> bool:
    metadata = getattr(node, "_input_metadata", None)
    return metadata is not None and len(metadata) == 1


def separates(root: Any, block: Any, below: set[Any]) -> bool:
    """Whether every path in the autograd graph from ``root`` to a node of ``below`` passes through ``block``."""
    seen = {block}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in below:
            return False
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return True


def cut_positions(live: list[Capture], logits: Tensor) -> list[int]:
    """Indices ``i`` into ``live`` (execution order) whose layer input separates layers ``< i`` from the logits.

    A valid cut is a tensor, input of layer ``i``, through which all the gradient flows that reaches layers
    ``0..i-1``: backpropagating the columns down to it, then from it further down, gives the same layer-output
    gradients as one backward pass (tensors rewritten in place afterwards, or made by multi-output operations, are
    never cuts).
    """
    outputs = {c.output_fn for c in live}
    cuts: list[int] = []
    seen: set[Any] = set()
    for i, capture in enumerate(live):
        tensor = capture.input_tensor
        if i == 0 or tensor is None:
            continue
        node = tensor.grad_fn
        if node is None or node in seen or node is not capture.input_fn or tensor._version != capture.input_version:
            continue
        seen.add(node)
        if node in outputs or not single_output(node):
            continue
        if separates(logits.grad_fn, node, {c.output_fn for c in live[:i]}):
            cuts.append(i)
    return cuts


INDEX_NAMES = ("_saved_result1", "_saved_indices")  # where autograd keeps max-pooling indices (torch versions)


def consumers(root: Any) -> dict[Any, list[Any]]:
    """For every node of the autograd graph below ``root``: the nodes that take one of its outputs (with repeats)."""
    users: dict[Any, list[Any]] = {}
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for fn, _ in node.next_functions:
            if fn is None:
                continue
            users.setdefault(fn, []).append(node)
            if fn not in seen:
                seen.add(fn)
                stack.append(fn)
    return users


def link_pools(live: list[Capture], logits: Tensor, pooling: bool = True) -> None:
    """Set ``pool`` on every first 2-d convolution whose output flows only through a ReLU, then only a max-pooling.

    Only first layers (nothing with parameters below them) are linked: for them the backward passes then stop at
    the pooling output, and the products shrink with the pooling. Layers in the middle need their dense output
    gradient anyway to pass it further down, and there the gathered patches cost more than the smaller products
    save (measured on the MNIST CNN's second convolution). The chain is checked on the autograd graph, so it holds
    however ``forward`` is written (modules or functional calls): the convolution output (or the copy handed on in
    its place) has exactly one user, a ReLU, whose output has exactly one user, a max-pooling with indices. Anything
    else (a skip connection, another activation, a BatchNorm in between) keeps the layer on the general path. Which
    layers may be linked is their rule's :meth:`~lightning_unlearn.curvature._engine.base.LayerRule.can_pool`.
    ``pooling=False`` links nothing.
    """
    for capture in live:
        capture.pool = None
    if not pooling:
        return
    candidates = [c for c in first_layers(live) if c.rule.can_pool(c.module)]
    if not candidates or logits.grad_fn is None:
        return
    users = consumers(logits.grad_fn)

    def only_user(node: Any) -> Any:
        found = users.get(node, [])
        return found[0] if len(found) == 1 else None

    for capture in candidates:
        relu = only_user(capture.output_fn)
        if relu is not None and type(relu).__name__ == "CloneBackward0":  # the copy made for an in-place ReLU
            relu = only_user(relu)
        if relu is None or type(relu).__name__ != "ReluBackward0":
            continue
        pool = only_user(relu)
        if pool is None or type(pool).__name__ != "MaxPool2DWithIndicesBackward0":
            continue
        indices = next((getattr(pool, name) for name in INDEX_NAMES if hasattr(pool, name)), None)
        if indices is None:  # pragma: no cover - another torch version's naming
            continue
        capture.pool = PoolLink(GradientEdge(pool, 0), indices, relu._saved_result)


def choose_segments(
    states: list[int],
    boundaries: dict[int, int],
    k: int,
    element_size: int,
    graph_before: list[int],
    every_cut: bool = False,
) -> tuple[list[tuple[int, int]], int]:
    """Split layers ``0..L-1`` at some of the allowed cut indices so that the largest segment need is smallest.

    The need of segment ``[a, b)`` is the graph still alive (``graph_before[b]``: what layers ``0..b-1`` and the
    operations up to layer ``b`` saved; all of it for the top segment), the states of its layers and the ``k``
    gradients of its lower and upper boundary tensors. Ties go to fewer segments (fewer, larger backward calls).

    Args:
        states: Elements per sample of every layer's state.
        boundaries: Cut index -> elements per sample of its tensor.
        k: Columns per sample.
        element_size: Bytes per element.
        graph_before: See :class:`Plan`.
        every_cut: Split at every allowed cut instead (the largest need is then that of this split).

    Returns:
        The segments as ``(a, b)`` index ranges from the top (logits) down, and the largest need in bytes per sample.
    """
    count = len(states)
    prefix = [0]
    for value in states:
        prefix.append(prefix[-1] + value)
    points = [0, *sorted(boundaries), count]
    size = {0: 0, count: 0, **boundaries}

    def need(a: int, b: int) -> int:
        return graph_before[b] + element_size * (prefix[b] - prefix[a] + k * (size[a] + size[b]))

    if every_cut:
        pairs = list(zip(points[:-1], points[1:], strict=True))
        return pairs[::-1], max(need(a, b) for a, b in pairs)
    best: dict[int, tuple[int, int, int]] = {0: (0, 0, -1)}  # point -> (largest need, segments, previous point)
    for b in points[1:]:
        options = [(max(best[a][0], need(a, b)), best[a][1] + 1, a) for a in points if a < b and a in best]
        best[b] = min(options)
    ranges = []
    b = count
    while b > 0:
        a = best[b][2]
        ranges.append((a, b))
        b = a
    return ranges, best[count][0]


def segments(
    live: list[Capture], logits: Tensor, k: int, element_size: int, graph_before: list[int], settings: Settings
) -> tuple[list[Segment], int]:
    """The backward segments (from the logits down) and their largest need in bytes per sample.

    Also sets the pool links of ``live`` (:func:`link_pools`). ``settings.segments``: ``"auto"`` minimises the
    largest need (:func:`choose_segments`), ``"none"`` keeps one segment, ``"all"`` splits at every cut point.
    """
    link_pools(live, logits, settings.pooling)
    cuts = cut_positions(live, logits) if settings.segments != "none" else []
    states = [c.rule.elements(c, k, settings) for c in live]
    boundaries = {i: live[i].input_tensor[0].numel() for i in cuts}
    if len(graph_before) != len(live) + 1:  # another graph than the planned one: no graph term
        graph_before = [0] * (len(live) + 1)
    every_cut = settings.segments == "all"
    ranges, peak = choose_segments(states, boundaries, k, element_size, graph_before, every_cut)
    return [Segment(live[a:b], a > 0) for a, b in ranges], peak


def measure(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    inputs: Tensor,
    clone: set[str],
    num_columns: Callable[[int], int],
    settings: Settings,
    estimator: str,
) -> Plan:
    """Measure the graph and choose the segments with a 1-sample forward pass.

    Args:
        model: The network.
        layers: Its layers with a rule (:func:`~lightning_unlearn.curvature._engine.capture.partition`).
        inputs: A batch; only its first sample is used.
        clone: The model's set of layers whose outputs are handed on as copies (completed here).
        num_columns: Columns per sample for a number of classes.
        settings: The engine's settings.
        estimator: The estimator's name, for messages.
    """
    held = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[tuple[int, int], int] = {}  # (address, bytes) -> layers called before it was saved
    order: list[Capture] = []

    def pack(tensor: Tensor) -> Tensor:
        if tensor.layout == torch.strided and tensor.untyped_storage().data_ptr() not in held:
            saved.setdefault((tensor.data_ptr(), tensor.numel() * tensor.element_size()), len(order))
        return tensor

    with torch.enable_grad():
        capture_forward(model, layers, inputs[:1], [], clone, estimator)  # learns which outputs need copies
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits = forward(model, layers, inputs[:1], clone, order, estimator)
    num_classes = int(logits.shape[-1]) if isinstance(logits, Tensor) and logits.dim() == 2 else 0
    live = [c for c in order if c.output_fn is not None]
    per_layer = [0] * (len(live) + 1)
    for (_, nbytes), position in saved.items():
        per_layer[min(position, len(live))] += nbytes
    graph_before = list(itertools.accumulate(per_layer))
    element_size = live[-1].input.element_size() if live else inputs.element_size()
    peak = graph_before[-1]
    if live and num_classes >= 2:
        _, peak = segments(live, logits, num_columns(num_classes), element_size, graph_before, settings)
    order.clear()
    del live, logits
    return Plan(num_classes, graph_before[-1], graph_before, max(1, peak), element_size)


#: The workspace cap and the smallest automatic budget on the CPU (bytes): the CPU's caches favour small temporaries.
CPU_WORKSPACE = 2**25
#: The same on an accelerator (CUDA, XPU, MPS, ...): every piece of work is a kernel launch, so pieces must be large
#: (with the CPU's 32 MiB a ResNet-18 profile ran as thousands of tiny kernels); its memory is rarely that tight.
ACCELERATOR_WORKSPACE = 2**28
ACCELERATOR_MIN_BUDGET = 2**30


def is_accelerator(device: torch.device | str | None) -> bool:
    """Whether ``device`` is an accelerator with its own kernel queue (not the CPU, not ``meta``)."""
    return device is not None and torch.device(device).type not in ("cpu", "meta")


def chunking(
    n: int,
    plan: Plan,
    model: nn.Module,
    max_memory_mb: float | None,
    settings: Settings,
    device: torch.device | str | None = None,
) -> tuple[int, int]:
    """Samples per chunk of a batch of ``n``, and the target size of the product temporaries (``chunk_elements``).

    The budget is ``max_memory_mb``, or by default one training step on the batch: its saved activations and a
    gradient per parameter, at least ``settings.min_auto_budget`` (on an accelerator at least
    :data:`ACCELERATOR_MIN_BUDGET`). An eighth of it (at most :data:`CPU_WORKSPACE`, on an accelerator
    :data:`ACCELERATOR_WORKSPACE`) goes to the temporaries of the per-sample products, which come in up to three
    pieces of ``chunk_elements`` (products, unfolded patches, copies); the rest to chunks of samples, of equal size.
    ``device`` is where the work runs (default: the CPU's settings).
    """
    accelerator = is_accelerator(device)
    if max_memory_mb is not None:
        budget = max_memory_mb * 2**20
    else:  # one training step: the batch's saved activations and a gradient per parameter
        step_bytes = n * plan.graph_bytes + sum(p.numel() * p.element_size() for p in model.parameters())
        floor = max(settings.min_auto_budget, ACCELERATOR_MIN_BUDGET) if accelerator else settings.min_auto_budget
        budget = max(step_bytes, floor)
    workspace = min(budget / 8, ACCELERATOR_WORKSPACE if accelerator else CPU_WORKSPACE)
    step = int(max(1, min(n, (budget - workspace) // plan.peak_bytes)))
    step = -(-n // -(-n // step))  # equal chunks
    chunk_elements = max(1 << 12, int(workspace // (3 * plan.element_size)))
    return step, chunk_elements
