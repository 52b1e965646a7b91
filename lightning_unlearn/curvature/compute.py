"""The profiling loop: sums of a Hessian-diagonal estimate over a dataloader, and the Trainer-free ``profile_model``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_unlearn.curvature.estimators import get_estimator, init_sums, make_generator
from lightning_unlearn.curvature.profile import SharpnessProfile

BatchTransform = Callable[[Any], tuple[Tensor, Tensor]]


def default_batch_transform(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a batch given as ``(x, y, ...)`` or a dict with ``x``/``y``, ``image``/``label`` or
    ``input``/``target`` keys."""
    if isinstance(batch, dict):
        for x_key, y_key in (("x", "y"), ("image", "label"), ("input", "target")):
            if x_key in batch and y_key in batch:
                return batch[x_key], batch[y_key]
        raise ValueError(f"cannot find inputs and targets in a batch with keys {sorted(batch)}; pass batch_transform")
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"cannot unpack a batch of type {type(batch).__name__}; pass batch_transform")


def estimator_options(estimator: str, num_draws: int = 1, strict: bool = True, loss_fn: Any = None) -> dict[str, Any]:
    """The options each estimator takes, from the profiler's uniform arguments."""
    if estimator == "exact":
        return {"strict": strict}
    if estimator == "mc":
        return {"num_draws": num_draws}
    if estimator == "hutchinson":
        return {"num_probes": num_draws, "loss_fn": loss_fn}
    return {}


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
    est = get_estimator(
        estimator,
        **{k: v for k, v in estimator_options(estimator, num_draws, strict, loss_fn).items() if v is not None},
    )
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
        with torch.inference_mode(False), torch.enable_grad():
            for batch in batches:
                x, y = transform(batch)
                if max_samples is not None and count + len(x) > max_samples:
                    x, y = x[: max_samples - count], y[: max_samples - count]
                if x.is_inference():
                    x = x.clone()
                if isinstance(y, Tensor) and y.is_inference():
                    y = y.clone()
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True) if isinstance(y, Tensor) else y
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


def reduce_diagonal_sums(
    sums: dict[str, Tensor], count: int, reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[dict[str, Tensor], int]:
    """Per-parameter means from :func:`accumulate_diagonal`'s sums, summed first over ranks.

    Args:
        sums: Per-parameter sums of one process (one rank's shard).
        count: Samples behind ``sums``.
        reduce: A sum all-reduce of one flat tensor (``lambda t: strategy.reduce(t, reduce_op="sum")``); None with
            one process. Sums and count travel in one float64 tensor, so one collective gives exactly the result of
            one process over the union of the shards.

    Returns:
        ``(diagonals, total)``: CPU tensors by parameter name (in the sums' dtype), and the total sample count.

    Raises:
        ValueError: If no rank saw any sample.
    """
    names = list(sums)
    flat = torch.cat([sums[name].reshape(-1).double() for name in names])
    flat = torch.cat([flat, torch.tensor([float(count)], dtype=flat.dtype, device=flat.device)])
    if reduce is not None:
        flat = reduce(flat)
    total = int(round(flat[-1].item()))
    if total == 0:
        raise ValueError("The profiling data yielded no samples.")
    diagonals, offset = {}, 0
    for name in names:
        n = sums[name].numel()
        diagonals[name] = (flat[offset : offset + n] / total).reshape(sums[name].shape).to("cpu", sums[name].dtype)
        offset += n
    return diagonals, total


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
        reduce: Under DDP, the sum all-reduce of :func:`reduce_diagonal_sums` (``dataloader`` is then this rank's
            shard); None with one process.
        world_size: Processes taking part (recorded in the metadata).

    Other keyword arguments are those of :func:`accumulate_diagonal`.
    """
    start = time.perf_counter()
    sums, count = accumulate_diagonal(model, dataloader, estimator, **kwargs)
    diagonals, count = reduce_diagonal_sums(sums, count, reduce)
    options = estimator_options(estimator, kwargs.get("num_draws", 1), kwargs.get("strict", True))
    metadata = {
        "seconds": time.perf_counter() - start,
        "seed": kwargs.get("seed", 0),
        "world_size": world_size,
        "options": {k: v for k, v in options.items() if isinstance(v, (int, float, bool, str))},
    }
    return SharpnessProfile.from_model(model, diagonals, estimator, count, dataset=dataset, metadata=metadata)
