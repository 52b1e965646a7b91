"""Fast repeated validation while only a few parameters change: activations of the frozen part are computed once.

A one-step method's step-size search evaluates the validation split once per candidate step, and only the selected
parameters differ between candidates. Everything the network computes *before* it first touches a selected parameter
is the same for every candidate. :class:`FrozenActivationCache` traces the network with ``torch.fx``, marks every
graph node that depends on a selected parameter, runs the network once per validation batch to keep the values of
the frozen nodes those dependent nodes read (the "frontier"), and from then on evaluates only the dependent nodes.
For SA first-order on the MNIST CNN (selected: ``fc1``) that skips both convolutions, ~90 % of the FLOPs.

The result is exactly that of a full forward pass (the same operations on the same inputs). Where the network cannot
be traced symbolically (data-dependent control flow), or the frontier of the whole split would exceed
``max_cache_mb``, the cache is not built and :meth:`evaluate` runs the full network: slower, same numbers.

:class:`ValidationSplits` (mixed into ``UnlearnModule``) is what the searches score: the clean validation split or
the forget set with its corrected labels (:data:`VALIDATION_SPLITS`), optionally weighted per class
(:func:`accuracy_and_loss`), each split served from its own cache (each up to ``validation_cache_mb``) within
``validation_cache``; :meth:`ValidationSplits.read_target` reads the request's forgetting target from the forget set's
and the validation split's logits, served the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from lightning_unlearn.data.protocol import require_corrected_labels
from lightning_unlearn.models.classifier import unpack_batch
from lightning_unlearn.unlearn.request.target import ForgettingTarget, TargetReading, infer_target


class _Recorder(fx.Interpreter):
    """Runs the whole graph and keeps the values of the ``keep`` nodes."""

    def __init__(self, module: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.keep = keep
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.keep:
            self.values[n] = value
        return value


def _trace(net: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.symbolic_trace(net)
    except Exception:  # noqa: BLE001 - any tracing failure means: no cache, full forward passes
        return None


def _dependent_nodes(graph_module: fx.GraphModule, changing: set[int]) -> set[fx.Node]:
    """Nodes whose value depends on a parameter whose ``id`` is in ``changing``."""
    dependent: set[fx.Node] = set()
    for node in graph_module.graph.nodes:
        direct = False
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            direct = any(id(p) in changing for p in module.parameters())
        elif node.op == "get_attr":
            direct = id(_fetch_attr(graph_module, node.target)) in changing
        if direct or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _fetch_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


#: What a step or learning-rate search can score: the clean validation split, the forget set with its trained-on
#: labels (the forgetting target, :mod:`~lightning_unlearn.unlearn.request.target`) and with its corrected labels
#: (``OneStepMethod(forget_weight=...)``).
VALIDATION_SPLITS = ("val", "forget", "corrected_forget")


def accuracy_and_loss(
    outputs: Iterable[tuple[torch.Tensor, torch.Tensor]], class_weights: torch.Tensor | None = None
) -> tuple[float, float]:
    """Accuracy (%) and mean cross-entropy over ``(logits, labels)`` batches; a non-finite loss is reported as inf.

    With ``class_weights`` (one weight per label) both are weighted means: each sample counts ``class_weights[y]``
    (e.g. ``p_retain(y) / p_val(y)``: the validation split read as if its classes had the retain set's frequencies).
    """
    correct, loss, total = 0.0, 0.0, 0.0
    for logits, y in outputs:
        hits = (logits.argmax(-1) == y).double()
        losses = F.cross_entropy(logits, y, reduction="none").double()
        weight = torch.ones_like(losses) if class_weights is None else class_weights.to(losses.device, losses.dtype)[y]
        correct += float((weight * hits).sum())
        loss += float(torch.where(weight > 0, weight * losses, 0.0).sum())  # weight 0 ignores even an infinite loss
        total += float(weight.sum())
    if total == 0:
        raise ValueError("The validation loader yielded no samples (or only samples of weight 0).")
    mean_loss = loss / total
    return 100.0 * correct / total, mean_loss if math.isfinite(mean_loss) else math.inf


class FrozenActivationCache:
    """Validation accuracy and loss of ``net`` on ``loader``, recomputing only what depends on ``changing``.

    Build it after the frozen parameters have their final values and while the network is in eval mode; the
    parameters in ``changing`` may then be modified in place between calls to :meth:`evaluate`.

    Args:
        net: The network (traced with ``torch.fx``; the traced graph shares its modules and parameters).
        changing: The parameters that will change between evaluations.
        loader: Validation batches ``(x, y, ...)``; read once here (the frontier values are kept on ``device``).
        device: Where to evaluate.
        max_cache_mb: Largest frontier to keep; beyond it (or when tracing fails) every call runs the full network.

    Attributes:
        cached: Whether the frozen activations are cached (False: full forward passes).
        cache_mb: Size of the cached frontier.
    """

    def __init__(
        self,
        net: nn.Module,
        changing: Iterable[nn.Parameter],
        loader: Iterable[Any],
        device: torch.device | str,
        max_cache_mb: float = 1024.0,
    ) -> None:
        self.net, self.loader, self.device = net, loader, torch.device(device)
        self.cached, self.cache_mb = False, 0.0
        self._batches: list[tuple[dict[fx.Node, Any], torch.Tensor]] = []
        graph_module = _trace(net)
        if graph_module is None:
            return
        dependent = _dependent_nodes(graph_module, {id(p) for p in changing})
        output = next(n for n in graph_module.graph.nodes if n.op == "output")
        frontier = {arg for n in dependent for arg in n.all_input_nodes if arg not in dependent}
        if output not in dependent:  # nothing selected is used: the output itself is frozen
            frontier = set(output.all_input_nodes)
        frozen = [n for n in graph_module.graph.nodes if n not in dependent and n not in frontier and n is not output]
        limit, total = max_cache_mb * 2**20, 0
        with torch.no_grad():
            for batch in loader:
                x, y = unpack_batch(batch)
                recorder = _Recorder(graph_module, frontier)
                recorder.run(x.to(self.device))
                env = dict(recorder.values) | dict.fromkeys(frozen)
                total += sum(_nbytes(v) for v in recorder.values.values())
                if total > limit:
                    self._batches = []
                    return
                self._batches.append((env, y.to(self.device)))
        self._graph_module = graph_module
        self.cached, self.cache_mb = True, total / 2**20

    @torch.no_grad()
    def logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's logits on the whole split and its labels, in the loader's order (current parameters)."""
        outputs = list(self._outputs())
        return torch.cat([o for o, _ in outputs]), torch.cat([y for _, y in outputs])

    @torch.no_grad()
    def evaluate(self, class_weights: torch.Tensor | None = None) -> tuple[float, float]:
        """Accuracy (%) and mean cross-entropy of the network with its current parameters (weighted per class with
        ``class_weights``, see :func:`accuracy_and_loss`)."""
        return accuracy_and_loss(self._outputs(), class_weights)

    def _outputs(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if not self.cached:
            for batch in self.loader:
                x, y = unpack_batch(batch)
                yield self.net(x.to(self.device)), y.to(self.device)
            return
        for env, y in self._batches:
            interpreter = fx.Interpreter(self._graph_module, garbage_collect_values=False)
            yield interpreter.run(initial_env=dict(env)), y


class ValidationSplits:
    """What the searches score (a mixin of ``UnlearnModule``): :meth:`validate` on a split of
    :data:`VALIDATION_SPLITS`, served from frozen-activation caches within :meth:`validation_cache`."""

    # provided by UnlearnModule
    net: nn.Module
    datamodule: Any
    guard: Any
    validation_cache_mb: float
    _requested_target: str | None
    _target: ForgettingTarget | None

    @property
    def _validation(self) -> dict[str, FrozenActivationCache] | None:
        """Within :meth:`validation_cache`: the cache of each split evaluated so far (None outside the block)."""
        return self.__dict__.get("_validation_caches")

    @contextlib.contextmanager
    def validation_cache(self, trainable: list[nn.Parameter] | None = None) -> Iterator[FrozenActivationCache | None]:
        """Within this block :meth:`validate` evaluates only what depends on ``trainable`` (default: the selection's
        parameters; the frozen part's activations are computed once per split, the validation split's on entry, the
        corrected forget set's when first asked); nothing else may change inside it. Yields the validation cache."""
        if self.validation_cache_mb == 0:
            yield None
            return
        self.net.eval()
        if trainable is None:
            trainable = list(self.guard.trainable.values()) if self.guard is not None else list(self.net.parameters())
        self.__dict__["_validation_caches"], self.__dict__["_validation_trainable"] = {}, trainable
        try:
            yield self._cache_of("val")
        finally:
            self.__dict__["_validation_caches"], self.__dict__["_validation_trainable"] = None, []

    def _cache_of(self, split: str) -> FrozenActivationCache:
        caches = self._validation
        assert caches is not None
        if split not in caches:  # the frozen part is fixed within the block: a split's cache is built when needed
            trainable = self.__dict__["_validation_trainable"]
            loader = self._validation_loader(split)
            device = self.device  # type: ignore[attr-defined]
            caches[split] = FrozenActivationCache(self.net, trainable, loader, device, self.validation_cache_mb)
        return caches[split]

    def _validation_loader(self, split: str) -> Any:
        if split not in VALIDATION_SPLITS:
            raise ValueError(f"`split` must be one of {VALIDATION_SPLITS}, got {split!r}.")
        if split == "val":
            return self.datamodule.val_dataloader()
        if split == "forget":
            return self.datamodule.forget_dataloader()
        require_corrected_labels(self.datamodule, "Scoring the corrected forget set (`forget_weight` > 0)")
        return self.datamodule.corrected_forget_dataloader()

    @property
    def forgetting_target(self) -> ForgettingTarget:
        """The request's forgetting target (:mod:`~lightning_unlearn.unlearn.request.target`): the one asked for
        (``forgetting_target=``), the data's own, or inferred from the poison record; built on first use from the
        forget set's and the validation split's labels."""
        if self._target is None:
            data = self.datamodule
            data.setup("fit")
            name = infer_target(data, self._requested_target)
            labels = lambda loader: torch.cat([unpack_batch(b)[1].reshape(-1) for b in loader])  # noqa: E731
            corrected = None
            if name in ("corrected", "unseen") and getattr(data, "has_corrected_labels", False):
                corrected = labels(data.corrected_forget_dataloader())
            kind = getattr(getattr(data, "spec", None), "kind", None)
            random = name == "unseen" and kind in ("targeted", "untargeted")  # labels drawn wrong at random
            forget = labels(data.forget_dataloader())
            self._target = ForgettingTarget(name, forget, labels(data.val_dataloader()), corrected, random)
        return self._target

    def target_reading(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """The model's reading of its forgetting target now (full passes over the forget set and the validation
        split on ``device``), as the report shows it."""
        home = self.device
        if device is not None:
            self.to(device)
        try:
            reading, _ = self.read_target()
        finally:
            self.to(home)
        target = self.forgetting_target
        return {"target": target.target, "statistic": target.statistic, **reading.to_dict()}

    @torch.no_grad()
    def split_logits(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's logits and the labels on a split of :data:`VALIDATION_SPLITS` (served from its cache
        within :meth:`validation_cache`); every rank sees all of it."""
        self.net.eval()
        if self._validation is not None:
            return self._cache_of(split).logits()
        device = self.device  # type: ignore[attr-defined]
        outputs = [(self.net(x.to(device)), y.to(device)) for x, y in map(unpack_batch, self._validation_loader(split))]
        return torch.cat([o for o, _ in outputs]), torch.cat([y for _, y in outputs])

    @torch.no_grad()
    def read_target(self) -> tuple[TargetReading, dict[str, torch.Tensor]]:
        """The model's reading of the request's forgetting target and the criterion's score (see
        :mod:`~lightning_unlearn.unlearn.request.target`), with its per-sample parts."""
        target = self.forgetting_target  # type: ignore[attr-defined]
        forget, _ = self.split_logits("forget")
        val, _ = self.split_logits("val")
        parts = target.per_sample(forget, val)
        return target.reading(parts), parts

    @torch.no_grad()
    def validate(self, class_weights: torch.Tensor | None = None, split: str = "val") -> tuple[float, float]:
        """Accuracy (%) and mean cross-entropy on the clean validation split (``split="val"``) or on the forget set
        with its corrected labels (``"corrected_forget"``); every rank sees all of it. With ``class_weights`` (one
        per label) weighted means, see :func:`accuracy_and_loss`."""
        self.net.eval()
        if self._validation is not None:
            return self._cache_of(split).evaluate(class_weights)
        device = self.device  # type: ignore[attr-defined]
        batches = (unpack_batch(batch) for batch in self._validation_loader(split))
        return accuracy_and_loss(((self.net(x.to(device)), y.to(device)) for x, y in batches), class_weights)


__all__ = ["VALIDATION_SPLITS", "FrozenActivationCache", "ValidationSplits", "accuracy_and_loss"]
