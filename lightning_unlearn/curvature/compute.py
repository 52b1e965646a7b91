"""The profiling loop: sums of a Hessian-diagonal estimate over a dataloader, and the Trainer-free ``profile_model``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_unlearn.batches import unpack_batch
from lightning_unlearn.curvature._support import init_sums, make_generator, reduce_diagonal_sums
from lightning_unlearn.curvature.base import CurvatureEstimator
from lightning_unlearn.curvature.precision import float32_inputs, full_precision
from lightning_unlearn.curvature.profile import SharpnessProfile
from lightning_unlearn.curvature.registry import estimator_class

BatchTransform = Callable[[Any], tuple[Tensor, Tensor]]

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
        with torch.inference_mode(False), torch.enable_grad(), full_precision(model, device) as promoted:
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
    reduce: Callable[[Tensor], Tensor] | None = None,
    world_size: int = 1,
    **kwargs: Any,
) -> SharpnessProfile:
    """Profile ``model`` on ``dataloader`` without a Trainer: :func:`accumulate_diagonal` divided by the count.

    Args:
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
    return SharpnessProfile.from_model(model, diagonals, estimator, count, dataset=dataset, metadata=metadata)
