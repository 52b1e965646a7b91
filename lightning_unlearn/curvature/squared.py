"""``SquaredGradientEstimator``: the base of ``exact``, ``mc`` and ``fisher`` (sums of squared per-sample gradients).

The three differ only in the ``K`` vectors per sample they backpropagate from the logits (a factor of the loss
curvature); everything else is the private engine (:mod:`lightning_unlearn.curvature._engine`): one forward pass with
hooks that keep the input and output of every Linear/Conv/BatchNorm layer, then backpropagation of the ``K`` vectors
from the logits to the layer *outputs* only (never to the parameters), and per-layer sums of squared per-sample
gradients built from layer inputs and output gradients by one rule per layer kind (rank-one products for Linear
layers, unfolded patches and batched matrix products for convolutions, normalised inputs for BatchNorm). A first
convolution followed only by a ReLU and a max-pooling takes its products at the pooled positions instead, from the
pooling output's gradient, so that the backward passes stop there. To bound memory, the backward passes run in
segments separated by tensors that all gradients flow through (block inputs), and batches are split into chunks of
samples that fit a memory budget, by default one training step's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_unlearn.curvature._engine.backward import backpropagate
from lightning_unlearn.curvature._engine.base import CONV_MODES, SEGMENT_MODES, Settings
from lightning_unlearn.curvature._engine.buffers import Buffers
from lightning_unlearn.curvature._engine.capture import capture_forward, partition
from lightning_unlearn.curvature._engine.generic import generic_chunk, generic_squares
from lightning_unlearn.curvature._engine.planner import Plan, chunking, measure, segments
from lightning_unlearn.curvature._support import init_sums, make_generator
from lightning_unlearn.curvature.base import CurvatureEstimator

__all__ = ["SquaredGradientEstimator"]


class SquaredGradientEstimator(CurvatureEstimator):
    """Shared machinery of ``exact``, ``mc`` and ``fisher``: sums of squared per-sample gradients.

    For every sample the subclass provides ``K`` vectors ``s`` in logit space (the columns of a factor of the
    per-sample loss curvature); the estimator adds ``Σ_samples Σ_columns (Jᵀ s)²`` for every parameter, where ``J`` is
    the Jacobian of the logits w.r.t. the parameters. Only cross-entropy (mean reduction) is supported.

    Memory: the layer states that collect the ``K`` output gradients of every layer would take ``K`` times the
    activations if they all lived at once. The backward passes are therefore run in *segments*: where a tensor
    separates the layers below it from the logits (the input of a ResNet block, of a classifier head, ...), the ``K``
    columns are backpropagated down to it, the layers above finish and their states and graph are freed, and the
    ``K`` gradients of that tensor are backpropagated further down. Segments are chosen to minimise the largest need
    (graph still alive + states + boundary gradients). Then batches are split into chunks of samples so that one
    chunk's need fits the memory budget. None of this changes the results beyond floating-point rounding; the options
    after ``max_memory_mb`` choose other splits and algorithms (for tests, and to compare them).

    Args:
        max_memory_mb: Memory budget in MiB for what one ``accumulate`` call keeps besides the model, its inputs and
            the accumulators: autograd graph, layer states, boundary gradients and product temporaries. ``None``
            (default): one training step's memory on the same batch, i.e. the activations autograd saves for the
            batch plus one gradient per parameter (measured once per model and input shape with a 1-sample forward
            pass), so that the estimator's peak stays near that of a training step. A bound, not an exact figure: a
            chunk holds at least one sample, and allocator overheads come on top.
        segments: ``"auto"`` (default): backward segments that minimise the largest need; ``"none"``: one backward
            segment (the states of all layers live at once); ``"all"``: a segment boundary at every cut point.
        pooling: Whether a first 2-d convolution followed only by a ReLU and a max-pooling takes its products at the
            pooled positions (default ``True``; ``False``: the general convolution path).
        conv_mode: How convolutions sum their squared per-sample gradients: ``None`` (default: by cost, per layer),
            ``"stream"``, ``"stack"`` or ``"gram"`` (for all convolutions; ``"gram"`` applies to ungrouped ones only,
            grouped ones keep the automatic choice).
        min_auto_budget_mb: Smallest automatic budget (``max_memory_mb=None``), in MiB; default 32. Below it,
            splitting a batch into more chunks costs more time (every chunk pays the fixed cost of ``K`` backward
            passes) than the memory it saves is worth next to a process's fixed overheads. On an accelerator (CUDA,
            ...) the automatic budget is at least 1 GiB and the product temporaries may take up to 256 MiB (32 MiB on
            the CPU), so that the work comes in few large kernels rather than thousands of small ones.
        products: ``False`` skips the per-sample products: only the forward pass and the backward passes to the layer
            outputs run, and the sums stay zero (a timing diagnostic). Default ``True``.

    Attributes:
        last_chunk_size: Samples per chunk of the last :meth:`accumulate` call.
        last_segments: The layer names of every backward segment (from the top down) of every chunk of the last
            :meth:`accumulate` call.
        last_pooled: The layers that took pooled products in the last :meth:`accumulate` call.
    """

    def __init__(
        self,
        *,
        max_memory_mb: float | None = None,
        segments: str = "auto",
        pooling: bool = True,
        conv_mode: str | None = None,
        min_auto_budget_mb: float = 32,
        products: bool = True,
    ) -> None:
        if max_memory_mb is not None and not max_memory_mb > 0:
            raise ValueError(f"`max_memory_mb` must be positive or None, got {max_memory_mb}.")
        if segments not in SEGMENT_MODES:
            raise ValueError(f"`segments` must be one of {SEGMENT_MODES}, got {segments!r}.")
        if conv_mode is not None and conv_mode not in CONV_MODES:
            raise ValueError(f"`conv_mode` must be None or one of {CONV_MODES}, got {conv_mode!r}.")
        if not min_auto_budget_mb >= 0:
            raise ValueError(f"`min_auto_budget_mb` must be >= 0, got {min_auto_budget_mb}.")
        self.max_memory_mb = None if max_memory_mb is None else float(max_memory_mb)
        self.min_auto_budget_mb = float(min_auto_budget_mb)
        self.settings = Settings(
            segments=segments,
            pooling=bool(pooling),
            conv_mode=conv_mode,
            min_auto_budget=int(self.min_auto_budget_mb * 2**20),
            products=bool(products),
        )
        self._plans: dict[tuple, Plan] = {}
        self._partitions: dict[tuple, tuple[list[tuple[str, nn.Module]], list[str]]] = {}
        self._buffers: Buffers | None = None
        self._clone_layers: dict[int, set[str]] = {}
        self.last_chunk_size = 0
        self.last_segments: list[list[list[str]]] = []
        self.last_pooled: set[str] = set()
        self.last_generic: list[str] = []

    def release_buffers(self) -> None:
        """Free the scratch buffers kept between batches (they are reused to avoid re-allocating large arrays)."""
        self._plans.clear()
        self._partitions.clear()
        self._buffers = None
        self._clone_layers.clear()

    def options(self) -> dict[str, Any]:
        s = self.settings
        return {
            "max_memory_mb": self.max_memory_mb,
            "segments": s.segments,
            "pooling": s.pooling,
            "conv_mode": s.conv_mode,
            "min_auto_budget_mb": self.min_auto_budget_mb,
            "products": s.products,
        }

    # --- subclass interface -------------------------------------------------------------------------------------------
    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor | None:
        """Random numbers for ``n`` samples, drawn once per batch (so chunking does not change results)."""
        return None

    def _num_columns(self, num_classes: int) -> int:
        raise NotImplementedError

    def _columns(self, logits: Tensor, targets: Tensor, draws: Tensor | None) -> Tensor:
        """The (m, K, C) backpropagated vectors, computed in float64 from the detached logits."""
        raise NotImplementedError

    def _check_model(self, model: nn.Module) -> None:
        """Hook for model-level checks (``exact`` verifies piecewise linearity)."""

    # --- machinery ----------------------------------------------------------------------------------------------------
    def accumulate(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sums: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
    ) -> int:
        self._check_model(model)
        init_sums(model, sums)
        n = int(inputs.shape[0])
        if n == 0:
            return 0
        if targets.shape[0] != n:
            raise ValueError(f"{n} inputs but {targets.shape[0]} targets")
        if generator is None:
            generator = make_generator(0)
        layers, generic = self._partition(model, inputs)
        self.last_generic = list(generic)
        plan = self._plan(model, layers, inputs) if layers else None
        num_classes = plan.num_classes if plan is not None else self._num_classes(model, inputs)
        if num_classes < 2:
            raise ValueError(
                f"the '{self.name}' estimator needs logits of shape (batch, classes) with at least 2 classes "
                "(cross-entropy); use estimator='hutchinson' with a custom loss_fn otherwise."
            )
        if plan is not None:
            step, chunk_elements = chunking(n, plan, model, self.max_memory_mb, self.settings, inputs.device)
            if self._buffers is None or self._buffers.chunk_elements != chunk_elements:
                self._buffers = Buffers(chunk_elements)
        else:
            step = n
        budget = int((self.max_memory_mb or max(self.min_auto_budget_mb, 256.0)) * 2**20)
        generic_chunk_size = generic_chunk(self._num_columns(num_classes), generic, model, budget)
        self.last_chunk_size = step
        self.last_segments = []
        self.last_pooled = set()
        draws = self._draw(n, generator)
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk_draws = None if draws is None else draws[start:stop]
            args = (model, layers, inputs[start:stop], targets[start:stop], chunk_draws, sums, plan)
            self._accumulate_chunk(*args, generic=generic, generic_chunk_size=generic_chunk_size)
        return n

    def _partition(self, model: nn.Module, inputs: Tensor) -> tuple[list[tuple[str, nn.Module]], list[str]]:
        """Rule layers and generic parameters of ``model`` (:func:`~lightning_unlearn.curvature._engine.capture.
        partition`), found once per model and input shape."""
        key = (id(model), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key not in self._partitions:
            self._partitions[key] = partition(model, self.name, inputs[:1])
        return self._partitions[key]

    @staticmethod
    def _num_classes(model: nn.Module, inputs: Tensor) -> int:
        with torch.no_grad():
            logits = model(inputs[:1])
        return int(logits.shape[-1]) if isinstance(logits, Tensor) and logits.dim() == 2 else 0

    def _plan(self, model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor) -> Plan:
        """The plan of ``model`` for inputs shaped like ``inputs`` (measured once, then cached)."""
        key = (id(model), tuple(name for name, _ in layers), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key not in self._plans:
            clone = self._clone_layers.setdefault(id(model), set())
            self._plans[key] = measure(model, layers, inputs, clone, self._num_columns, self.settings, self.name)
        return self._plans[key]

    def _accumulate_chunk(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        inputs: Tensor,
        targets: Tensor,
        draws: Tensor | None,
        sums: dict[str, Tensor],
        plan: Plan | None,
        *,
        generic: list[str] = (),  # type: ignore[assignment]
        generic_chunk_size: int = 1,
    ) -> None:
        clone = self._clone_layers.setdefault(id(model), set())
        if layers:
            order, logits = capture_forward(model, layers, inputs, [], clone, self.name)
        else:
            order = []
            with torch.no_grad():
                logits = model(inputs)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(f"the '{self.name}' estimator needs logits of shape (batch, classes)")
        columns = self._columns(logits.detach(), targets, draws).to(logits.dtype)  # (m, K, C)
        if generic and self.settings.products:  # the parameters no layer rule covers: torch.func, same columns
            generic_squares(model, inputs, columns, list(generic), sums, generic_chunk_size)
        if not layers:
            return
        k = columns.shape[1]
        live = [c for c in order if c.output_fn is not None]
        del order
        if not live:  # no layer with parameters took part in this forward pass
            return
        buffers = self._buffers
        assert buffers is not None
        parts, _ = segments(live, logits, k, plan.element_size, plan.graph_before, self.settings)
        self.last_segments.append([[c.name for c in part.layers] for part in parts])
        self.last_pooled.update(c.name for c in live if c.pool is not None)
        del live
        backpropagate(parts, logits, columns, sums, buffers, self.settings)
