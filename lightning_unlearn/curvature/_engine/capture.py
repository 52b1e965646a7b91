"""The forward pass of the engine: which layers take part, and what it records of each (:class:`Capture`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call

from lightning_unlearn.curvature._engine.base import LayerRule
from lightning_unlearn.curvature._engine.registry import rule_for
from lightning_unlearn.curvature._support import display


@dataclass
class PoolLink:
    """A convolution whose output only flows through a ReLU and then a max-pooling (found by
    :func:`~lightning_unlearn.curvature._engine.planner.link_pools`).

    The gradient of the convolution output is then zero except at the positions the pooling picked, where it is the
    pooled output's gradient masked by the ReLU. The layer's per-sample gradients are computed from the (smaller)
    gradient at the pooling output, which autograd hands over at ``edge``, and the saved pooling indices and ReLU
    output.

    Attributes:
        edge: Gradient edge of the pooling output.
        indices: (m, Cout, *pooled) positions in the flattened spatial grid of the convolution output.
        relu_output: The ReLU's output (the pooling input), same shape as the convolution output.
    """

    edge: Any
    indices: Tensor
    relu_output: Tensor


@dataclass
class Capture:
    """What the forward pass records of one layer.

    The output tensor itself is dropped after the forward pass (``output``), so that outputs the graph does not save
    are freed; its gradient reaches ``sink`` through a hook registered during the forward pass, and backward passes
    stop at it through its gradient edge (``output_edge``).
    """

    name: str
    module: nn.Module
    rule: type[LayerRule]
    calls: int = 0
    input: Tensor | None = None
    output: Tensor | None = None
    version: int = 0
    input_fn: Any = None
    input_tensor: Tensor | None = None
    input_version: int = 0
    output_fn: Any = None
    output_shape: torch.Size | None = None
    output_edge: Any = None
    sink: Callable[[Tensor], None] | None = None
    pool: PoolLink | None = None

    def receive(self, grad: Tensor) -> None:
        if self.sink is not None:
            self.sink(grad)


def partition(model: nn.Module, estimator: str, inputs: Any) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Which parameters the per-layer rules compute and which the generic path does
    (:mod:`~lightning_unlearn.curvature._engine.generic`): a layer goes to the rules when it has one, its rule accepts
    it, it owns its parameters alone and one forward pass on ``inputs`` calls it exactly once (an attention module's
    projections are applied as functions, a shared layer is called twice: those go to the generic path, as do
    parameter-holding modules without a rule and free parameters).

    Raises:
        ValueError: For a layer whose rule refuses it (e.g. a BatchNorm without running statistics: per-sample
            gradients are not defined where a sample's output depends on its batch).
    """
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        rule = rule_for(module)
        if rule is not None:
            rule.check(name, module, estimator)
        if own and rule is not None and all(owners[id(p)] == 1 for p in own):
            candidates.append((name, module))
    calls = {name: 0 for name, _ in candidates}

    def count(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            calls[name] += 1

        return hook

    handles = [module.register_forward_hook(count(name)) for name, module in candidates]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    layers = [(name, module) for name, module in candidates if calls[name] == 1]
    covered = {id(p) for _, module in layers for p in module.parameters(recurse=False)}
    generic = [name for name, p in model.named_parameters() if id(p) not in covered]
    return layers, generic


def forward(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    inputs: Tensor,
    clone: set[str],
    order: list[Capture],
    estimator: str,
) -> Tensor:
    """Forward pass appending every layer's capture (input and output) to ``order`` as the layer runs.

    Outputs of the layers named in ``clone`` are handed on as copies. Returns the logits.
    """
    captures = [Capture(name, module, rule_for(module)) for name, module in layers]

    def make_hook(capture: Capture) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
            capture.calls += 1
            if capture.calls > 1:
                raise RuntimeError(
                    f"layer {display(capture.name)} ({type(module).__name__}) is called more than once per "
                    f"forward pass; the '{estimator}' estimator needs one call per layer. Use "
                    "estimator='hutchinson'."
                )
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                raise RuntimeError(f"layer {display(capture.name)} was not called with a tensor argument")
            capture.input = args[0].detach()
            capture.input_fn = args[0].grad_fn
            if args[0].requires_grad:
                capture.input_tensor = args[0]
                capture.input_version = args[0]._version
            capture.output = output
            capture.version = output._version
            capture.output_shape = output.shape
            if output.requires_grad:
                capture.output_fn = output.grad_fn
                capture.output_edge = get_gradient_edge(output)
                output.register_hook(capture.receive)
            order.append(capture)
            return output.clone() if capture.name in clone else None

        return hook

    # Fresh leaves: the graph exists whatever the parameters' requires_grad, and nothing touches their .grad.
    params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
    handles = [c.module.register_forward_hook(make_hook(c)) for c in captures]
    try:
        logits = functional_call(model, params, (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    return logits


def capture_forward(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    inputs: Tensor,
    order: list[Capture],
    clone: set[str],
    estimator: str,
) -> tuple[list[Capture], Tensor]:
    """:func:`forward`, run again with copies where an in-place operation rewrote a needed layer output.

    ``clone`` (the names of layers whose outputs are handed on as copies) is kept by the caller per model and grows
    here when an in-place rewrite is found.
    """
    logits = forward(model, layers, inputs, clone, order, estimator)
    modified = {c.name for c in order if c.output is not None and c.output._version != c.version}
    if modified:
        # A downstream in-place operation (``ReLU(inplace=True)``, ``out += identity``) rewrote a layer output
        # whose gradient we need: run again, handing the rest of the network a copy of those outputs.
        clone |= modified
        order.clear()
        del logits
        logits = forward(model, layers, inputs, clone, order, estimator)
    for capture in order:
        capture.output = None
    return order, logits


def first_layers(captures: list[Capture]) -> list[Capture]:
    """The captures whose input does not depend on any other capture's output (found by walking the autograd graph)."""
    targets = {c.output_fn for c in captures}
    memo: dict[Any, bool] = {}  # node -> whether some captured output lies below it

    def depends(root: Any) -> bool:
        if root is None:
            return False
        if root in targets:
            return True
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            nexts = [fn for fn, _ in node.next_functions if fn is not None]
            if expanded:
                memo[node] = any(fn in targets or memo[fn] for fn in nexts)
            else:
                stack.append((node, True))
                stack.extend((fn, False) for fn in nexts if fn not in targets and fn not in memo)
        return memo[root]

    return [c for c in captures if not depends(c.input_fn)]
