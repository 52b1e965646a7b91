"""The profiling loop: sums of a Hessian-diagonal estimate over a dataloader, and the Trainer-free ``profile_model``."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_unlearn.batches import unpack_batch
from lightning_unlearn.curvature._engine.generic import math_attention
from lightning_unlearn.curvature._engine.registry import rule_for
from lightning_unlearn.curvature._support import init_sums, make_generator, reduce_diagonal_sums
from lightning_unlearn.curvature.base import CurvatureEstimator
from lightning_unlearn.curvature.checks import check_exact, find_inexact_modules
from lightning_unlearn.curvature.exact import ExactDiagonal
from lightning_unlearn.curvature.precision import float32_inputs, full_precision
from lightning_unlearn.curvature.profile import SharpnessProfile
from lightning_unlearn.curvature.registry import estimator_class
from lightning_unlearn.curvature.squared import SquaredGradientEstimator

BatchTransform = Callable[[Any], tuple[Tensor, Tensor]]
#: Maps a model's ``forward`` output to its logits (``lambda out: out[0]`` for ``(logits, features)``).
OutputTransform = Callable[[Any], Tensor]

#: The default batch transform: :func:`lightning_unlearn.batches.unpack_batch` (``(x, y, ...)`` or a dict with
#: ``x``/``y``, ``image``/``label`` or ``input``/``target`` keys).
default_batch_transform: BatchTransform = unpack_batch


def _build_estimator(
    estimator: str | CurvatureEstimator, num_draws: int, strict: bool, loss_fn: Any
) -> CurvatureEstimator:
    """The estimator named ``estimator``, with the options the loop's uniform arguments stand for (instances as is)."""
    if isinstance(estimator, CurvatureEstimator):
        return estimator
    cls = estimator_class(estimator)
    return cls(**cls.options_for(num_draws=num_draws, strict=strict, loss_fn=loss_fn))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``; asynchronously only from pinned memory (from pageable memory a "non-blocking" copy to
    a GPU is a synchronous one anyway, and a non-blocking copy *to* the host could be read before it lands)."""
    return tensor.to(device, non_blocking=tensor.device.type == "cpu" and device.type == "cuda" and tensor.is_pinned())


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in ``eval()`` mode, then give every submodule its own mode back."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


@contextlib.contextmanager
def selected_output(model: nn.Module, output_transform: OutputTransform | None) -> Iterator[None]:
    """Within the block, calling ``model`` returns ``output_transform(model's output)`` (a forward hook on the root
    module, removed on exit): the estimators see logits while parameter names and fingerprints stay the model's own."""
    if output_transform is None:
        yield
        return
    handle = model.register_forward_hook(lambda module, args, output: output_transform(output))
    try:
        yield
    finally:
        handle.remove()


def accumulate_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    estimator: str = "exact",
    *,
    max_samples: int | None = None,
    batch_transform: BatchTransform | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    seed: int = 0,
    rank: int = 0,
    num_draws: int = 1,
    strict: bool = True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    output_transform: OutputTransform | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Per-parameter sums of the estimate over ``batches`` and the number of samples seen.

    The model is put in ``eval()`` (its previous modes are restored afterwards), run with gradients enabled and
    inference mode off, never modified (parameters and ``.grad`` fields are left as they were). Divide the sums by the
    count for the mean-loss Hessian diagonal; under DDP all-reduce sums and counts first.

    The block runs in IEEE float32 whatever the caller's settings (:func:`~lightning_unlearn.curvature.precision.
    full_precision`): TF32 off (cuDNN convolutions use it by default on Ampere and later GPUs: ~1e-3 relative
    error), autocast off, and float16/bfloat16 weights promoted to float32 for the block (``precision="16-true"``:
    squares of per-sample gradients overflow float16), then restored bit for bit.

    Args:
        model: The network (logits out).
        batches: Any iterable of batches (a DataLoader).
        estimator: ``exact``, ``mc``, ``hutchinson`` or ``fisher``.
        max_samples: Stop after exactly this many samples (the last batch is truncated).
        batch_transform: Batch → ``(inputs, targets)``; default :func:`default_batch_transform`.
        device: Where to compute; default the model's device (inputs are moved there).
        progress: Show a tqdm progress bar.
        seed: Seed of the random draws (``mc``, ``hutchinson``).
        rank: Process rank: each rank draws from its own stream.
        num_draws: Sampled labels per sample (``mc``) or probes per batch (``hutchinson``).
        strict: ``exact`` refuses architectures where it would not equal the Hessian diagonal.
        loss_fn: Loss for ``hutchinson`` (mean reduction; default cross-entropy).
        output_transform: Maps the model's ``forward`` output to logits, for models that return more (``lambda out:
            out[0]`` for ``(logits, features)``); default: the output as is.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"`max_samples` must be >= 1 or None, got {max_samples}.")
    est = _build_estimator(estimator, num_draws, strict, loss_fn)
    transform = batch_transform or default_batch_transform
    device = torch.device(device) if device is not None else _device_of(model)
    generator = make_generator(seed, rank)
    modes = {m: m.training for m in model.modules()}
    with torch.inference_mode(False):  # callers may be inside inference mode: the sums must be normal tensors
        sums = init_sums(model)
    count = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = max_samples
        if total is None and hasattr(batches, "dataset"):
            total = len(batches.dataset)  # type: ignore[attr-defined]
        bar = tqdm(total=total, desc=f"Hessian diagonal ({estimator})", unit="sample", leave=False)
    model.eval()
    try:
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            full_precision(model, device) as promoted,
            selected_output(model, output_transform),
            math_attention(),  # the fused attention kernels have no double backward and no batching rule
        ):
            for batch in batches:
                x, y = transform(batch)
                if max_samples is not None and count + len(x) > max_samples:
                    x, y = x[: max_samples - count], y[: max_samples - count]
                if x.is_inference():
                    x = x.clone()
                if isinstance(y, Tensor) and y.is_inference():
                    y = y.clone()
                x = _to_device(x, device)
                y = _to_device(y, device) if isinstance(y, Tensor) else y
                if promoted:
                    x = float32_inputs(x)
                seen = est.accumulate(model, x, y, sums, generator=generator)
                count += seen
                if bar is not None:
                    bar.update(seen)
                if max_samples is not None and count >= max_samples:
                    break
    finally:
        for module, mode in modes.items():
            module.train(mode)
        if bar is not None:
            bar.close()
    return sums, count


def profile_model(
    model: nn.Module,
    dataloader: Iterable[Any],
    estimator: str = "exact",
    *,
    dataset: str | None = None,
    split: str | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    world_size: int = 1,
    **kwargs: Any,
) -> SharpnessProfile:
    """Profile ``model`` on ``dataloader`` without a Trainer: :func:`accumulate_diagonal` divided by the count.

    Any loader works (the training set, or another split such as the forget set with its trained-on labels).

    Args:
        dataset: Name of the data, recorded in the profile.
        split: Which split of it ``dataloader`` holds (e.g. ``"train"``, ``"forget"``), recorded as
            ``metadata["split"]`` (None: not recorded).
        reduce: Under DDP, a sum all-reduce of one flat tensor (``lambda t: strategy.reduce(t, reduce_op="sum")``;
            ``dataloader`` is then this rank's shard): sums and counts of all ranks travel in one collective, so the
            result is exactly that of one process over the union of the shards. None with one process.
        world_size: Processes taking part (recorded in the metadata).

    Other keyword arguments are those of :func:`accumulate_diagonal`.
    """
    start = time.perf_counter()
    sums, count = accumulate_diagonal(model, dataloader, estimator, **kwargs)
    diagonals, count = reduce_diagonal_sums(sums, count, reduce)
    options = {}
    if not isinstance(estimator, CurvatureEstimator):
        cls = estimator_class(estimator)
        options = cls.options_for(num_draws=kwargs.get("num_draws", 1), strict=kwargs.get("strict", True))
    metadata = {
        "seconds": time.perf_counter() - start,
        "seed": kwargs.get("seed", 0),
        "world_size": world_size,
        "options": {k: v for k, v in options.items() if isinstance(v, (int, float, bool, str))},
    }
    if split is not None:
        metadata["split"] = split
    metadata["diagonal"] = diagonal_kind(model, estimator if isinstance(estimator, str) else estimator.name)
    return SharpnessProfile.from_model(model, diagonals, estimator, count, dataset=dataset, metadata=metadata)


def diagonal_kind(model: nn.Module, estimator: str) -> str:
    """Which diagonal a profile of ``model`` holds: ``"hessian"`` (``exact``/``mc`` on a network whose GGN and Hessian
    diagonals coincide, :func:`~lightning_unlearn.curvature.checks.find_inexact_modules`; ``hutchinson``: an
    estimate), ``"ggn"`` (``exact``/``mc`` on any other network: attention, LayerNorm, GELU, …) or
    ``"empirical_fisher"`` (``fisher``)."""
    if estimator == "fisher":
        return "empirical_fisher"
    if estimator == "hutchinson":
        return "hessian"
    return "ggn" if find_inexact_modules(model) else "hessian"


# ------------------------------------------------------------------------------------------- checks before profiling
def check_model(model: nn.Module, estimator: str | CurvatureEstimator = "exact", *, strict: bool = True) -> None:
    """Refuse, before any data is seen, a model that ``estimator`` cannot profile: what the profiling loop would only
    find out on its first batch.

    Runs on the model in ``eval()`` mode, as the loop does (the modes are restored). ``exact``, ``mc`` and ``fisher``
    compute any differentiable parameter (the per-layer rules where they apply, the generic ``torch.func`` path for
    the rest), but refuse a layer whose rule does (a BatchNorm without running statistics couples the samples of a
    batch); ``exact`` with ``strict=True`` also needs ``diag(GGN) = diag(H)``
    (:func:`~lightning_unlearn.curvature.checks.check_exact`; with ``strict=False`` it warns instead).

    Args:
        model: The network.
        estimator: The estimator's name or instance.
        strict: As in :func:`accumulate_diagonal`.

    Raises:
        ValueError: Naming the offending module and an estimator that does work.
    """
    est = _build_estimator(estimator, 1, strict, None)
    with eval_mode(model):
        if isinstance(est, SquaredGradientEstimator):  # a layer its rule refuses (BatchNorm without statistics)
            for name, module in model.named_modules():
                rule = rule_for(module)
                if rule is not None:
                    rule.check(name, module, est.name)
        if isinstance(est, ExactDiagonal) and est.strict:  # strict=False asks for the GGN diagonal: nothing to check
            check_exact(model, strict=True)


def describe(value: Any) -> str:
    """A short description of a model output or batch item for messages: type, dtype and shape, not the values."""
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} items ({items})"
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


def check_batch(
    model: nn.Module,
    batch: Any,
    estimator: str | CurvatureEstimator = "exact",
    *,
    batch_transform: BatchTransform | None = None,
    output_transform: OutputTransform | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
) -> int:
    """One forward pass on one batch, as the profiling loop runs it, to refuse what it would fail on: inputs that are
    not one tensor, an output that is not ``(batch, classes)`` logits, targets or a loss the estimator cannot use;
    then one real curvature product on two of its samples (an operation without the derivative the estimator needs,
    such as a fused attention kernel's missing double backward, fails there rather than after training).

    The model runs in ``eval()`` mode (modes restored) without gradients, in the loop's precision; it is not modified.
    Random draws of the model's ``forward`` (if any) are the caller's to preserve.

    Args:
        model: The network.
        batch: One batch of the profiling data.
        estimator: The estimator's name or instance.
        batch_transform, output_transform, loss_fn, device: As in :func:`accumulate_diagonal`.

    Returns:
        The number of classes (the logits' second dimension).

    Raises:
        ValueError: Naming the option (``batch_transform``, ``output_transform``, ``loss_fn``) that fixes it.
    """
    name = estimator.name if isinstance(estimator, CurvatureEstimator) else estimator
    loss = "classes" if name != "hutchinson" else "cross_entropy" if loss_fn is None else "custom"
    transform = batch_transform or default_batch_transform
    try:
        x, y = transform(batch)
    except Exception as err:  # noqa: BLE001 - any failure of the user's or the default transform
        raise ValueError(
            f"cannot split a profiling batch ({describe(batch)}) into inputs and targets: {err}. Pass "
            "`batch_transform=`, a callable mapping a batch to `(inputs, targets)`."
        ) from err
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(
            f"the inputs of a profiling batch must be one tensor, batch first; got {describe(x)}. Pass "
            "`batch_transform=`, a callable mapping a batch to `(inputs, targets)`."
        )
    n = int(x.shape[0])
    device = torch.device(device) if device is not None else _device_of(model)
    with eval_mode(model), torch.no_grad(), full_precision(model, device) as promoted:
        x = _to_device(x.clone() if x.is_inference() else x, device)
        output = model(float32_inputs(x) if promoted else x)
        if output_transform is not None:
            try:
                output = output_transform(output)
            except Exception as err:  # noqa: BLE001 - the user's callable
                raise ValueError(
                    f"`output_transform` failed on the model's output ({describe(output)}): {err}. Pass an "
                    "`output_transform=` that maps this output to the logits."
                ) from err
        _check_logits(output, n, name, given=output_transform is not None, loss=loss)
        if name == "hutchinson":
            _check_loss(output, y, loss_fn, device)
    num_classes = int(output.shape[1]) if output.dim() > 1 else 1
    if loss == "classes":
        _check_targets(y, n, num_classes, name)
    # one real curvature product on two samples, as the loop computes it: what only the backward passes would find
    # (an operation without the derivative an estimator needs) fails here, before any training
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the strictness warnings belong to check_model
            accumulate_diagonal(
                model, [(x[:2], y[:2])], estimator if isinstance(estimator, CurvatureEstimator) else name,
                strict=False, output_transform=output_transform, loss_fn=loss_fn, device=device,
            )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - any failure of the product is what this check is for
        raise ValueError(
            f"the '{name}' estimator fails on a profiling batch ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "this would only show after training. Choose another estimator (exact and mc compute any differentiable "
            "network), or fix the model's operation."
        ) from err
    return num_classes


def _check_logits(output: Any, n: int, estimator: str, *, given: bool, loss: str) -> None:
    """``output`` must be a floating tensor of ``n`` rows: ``(n, classes)`` for the squared-gradient estimators
    (``loss="classes"``), ``(n, classes, ...)`` for ``hutchinson``'s cross-entropy, any shape under a custom loss."""
    wanted = {"classes": f"({n}, classes)", "cross_entropy": f"({n}, classes, ...)", "custom": f"({n}, ...)"}[loss]
    ok = isinstance(output, Tensor) and output.is_floating_point() and output.dim() >= 1 and output.shape[0] == n
    if ok and loss != "custom":
        ok = output.dim() == 2 if loss == "classes" else output.dim() >= 2
    if not ok:
        source = "`output_transform` returns" if given else "the model's forward returns"
        raise ValueError(
            f"{source} {describe(output)} on a batch of {n} inputs; the '{estimator}' estimator needs logits, a "
            f"floating tensor of shape {wanted}. Pass `output_transform=`, a callable mapping the model's output to "
            "its logits (`lambda out: out[0]` for a model returning `(logits, features)`)."
        )
    if loss != "custom" and output.shape[1] < 2:
        raise ValueError(
            f"the '{estimator}' estimator needs logits with at least 2 classes (cross-entropy), got shape "
            f"{tuple(output.shape)}; for another loss use estimator='hutchinson' with `loss_fn=`."
        )


def _check_targets(y: Any, n: int, num_classes: int, estimator: str) -> None:
    """Targets the squared-gradient estimators can use: a tensor of ``n`` rows; ``fisher``: class indices."""
    if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n:
        raise ValueError(
            f"the targets of a profiling batch of {n} inputs are {describe(y)}; the '{estimator}' estimator needs a "
            f"tensor of {n} class indices. Pass `batch_transform=`, a callable mapping a batch to `(inputs, targets)`."
        )
    if estimator == "fisher":
        if y.is_floating_point() or y.dim() != 1 or (n and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
            raise ValueError(
                f"the 'fisher' estimator needs integer class indices in [0, {num_classes}) of shape ({n},), got "
                f"{describe(y)}. Pass `batch_transform=`, a callable mapping a batch to `(inputs, targets)`."
            )


def _check_loss(
    output: Tensor, y: Any, loss_fn: Callable[[Tensor, Tensor], Tensor] | None, device: torch.device
) -> None:
    """``hutchinson``'s loss must take ``(logits, targets)`` and return a scalar."""
    which = "`loss_fn`" if loss_fn is not None else "the default loss (cross-entropy)"
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    targets = _to_device(y, device) if isinstance(y, Tensor) else y
    try:
        loss = loss_fn(output, targets)
    except Exception as err:  # noqa: BLE001 - the user's callable or cross-entropy on the user's targets
        raise ValueError(
            f"{which} failed on the logits ({describe(output)}) and targets ({describe(y)}) of a profiling batch: "
            f"{err}. Pass `loss_fn=` (mean reduction) or `batch_transform=`."
        ) from err
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        raise ValueError(f"{which} must return a floating scalar (mean reduction), got {describe(loss)}.")
