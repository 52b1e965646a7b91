"""Cost of a block of code: wall time and peak memory.

``with measure() as cost: ...`` fills ``cost`` (a :class:`Cost`) when the block ends, also when it raises.

* **CUDA**: the device is synchronised before and after the block; ``torch.cuda.reset_peak_memory_stats`` on entry and
  ``torch.cuda.max_memory_allocated`` on exit give the exact peak of memory *allocated by tensors* during the block
  (absolute: it includes tensors that already existed, e.g. the model; ``baseline_bytes`` is what was allocated on
  entry). The caching allocator's reserved-but-free memory is not counted.
* **CPU**: the peak *increase* of the process's resident-set size over its size on entry. A background thread reads
  ``/proc/self/statm`` every ``interval`` seconds (and once more on exit), so this is **approximate**: a short-lived
  allocation between two samples can be missed, and other threads' allocations are counted. Free heap memory is
  returned to the system on entry (glibc ``malloc_trim``), so memory the allocator reuses is counted too. Where
  ``/proc`` is missing (macOS, Windows), ``resource.getrusage`` is used instead: the increase of the process's
  lifetime maximum RSS, which is only non-zero when the block sets a new process-wide high-water mark (a lower
  bound). ``Cost.method`` says which was used.

Timings of work queued on an accelerator need the device synchronised before the clock is read (CUDA kernels run
asynchronously: without it a timer measures kernel launches): :func:`synchronize` and :func:`device_clock`.

Under ``ddp_spawn`` / ``ddp_fork`` the ranks are other processes than the one that calls ``trainer.fit``, so a block
measured around ``fit`` in the main process sees none of their memory: ``UnlearnModule`` therefore measures its fit in
every rank (``timings["fit_peak_bytes"]``, the largest over ranks) and :func:`main_process_device` says where the main
process may work without breaking a fork.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

_STATM = "/proc/self/statm"
METHODS = ("cuda_max_memory_allocated", "proc_statm_sampled", "getrusage_maxrss")


@dataclass
class Cost:
    """What a :func:`measure` block cost; filled when the block ends.

    Attributes:
        seconds: Wall-clock time of the block.
        peak_bytes: Peak memory of the block in bytes (see the module docstring: absolute allocated peak on CUDA,
            peak RSS increase on CPU); never negative.
        device: The device measured (``"cpu"``, ``"cuda:0"``, ...).
        method: How memory was measured, one of :data:`METHODS`.
        baseline_bytes: Memory on entry (CUDA: allocated bytes; CPU: RSS, or lifetime max RSS for getrusage).
    """

    seconds: float = 0.0
    peak_bytes: int = 0
    device: str = "cpu"
    method: str = ""
    baseline_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for logging or JSON)."""
        return asdict(self)


def _rss_bytes() -> int:
    with open(_STATM, "rb") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes on macOS, KiB on Linux


def _trim_heap() -> None:
    """``malloc_trim(0)`` where the C library is glibc: return free heap pages to the system (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssSampler(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(name="lightning-unlearn-rss-sampler", daemon=True)
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak = _rss_bytes()

    def sample(self) -> None:
        try:
            self.peak = max(self.peak, _rss_bytes())
        except Exception:  # noqa: BLE001 - at interpreter exit a measurement never finished finalises here, when even
            pass  # builtins may be gone ("name 'open' is not defined"): the peak measured so far stands

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()


def _resolve(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def measure(device: str | torch.device | None = None, interval: float = 0.002) -> Iterator[Cost]:
    """Measure wall time and peak memory of the enclosed block.

    Args:
        device: Which memory to measure: a CUDA device, or ``"cpu"`` for host memory (any non-CUDA device is measured
            as host memory). Default: the current CUDA device if CUDA is available, else the CPU.
        interval: Seconds between RSS samples on CPU (ignored on CUDA), > 0.

    Yields:
        A :class:`Cost` whose fields are filled when the block exits.

    Raises:
        ValueError: If ``interval`` is not positive.
    """
    if not interval > 0:
        raise ValueError(f"`interval` must be > 0 seconds, got {interval!r}.")
    dev = _resolve(device)
    cost = Cost(device=str(dev))
    sampler: _RssSampler | None = None
    if dev.type == "cuda":
        cost.method = METHODS[0]
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        cost.baseline_bytes = torch.cuda.memory_allocated(dev)
    elif os.path.exists(_STATM):
        cost.method = METHODS[1]
        # Start from a heap without free resident memory: collect earlier work's garbage and hand the free pages back
        # to the system, so that what the block allocates shows as an increase even where the allocator reuses
        # freed memory (a long test session's fragmented heap served a 128 MiB tensor without any RSS increase).
        gc.collect()
        _trim_heap()
        sampler = _RssSampler(interval)
        cost.baseline_bytes = sampler.peak
        sampler.start()
    else:
        cost.method = METHODS[2]
        cost.baseline_bytes = _maxrss_bytes()
    start = time.perf_counter()
    try:
        yield cost
    finally:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            cost.seconds = time.perf_counter() - start
            cost.peak_bytes = int(torch.cuda.max_memory_allocated(dev))
        elif sampler is not None:
            cost.seconds = time.perf_counter() - start
            sampler.stop_event.set()
            sampler.join()
            sampler.sample()
            cost.peak_bytes = max(0, sampler.peak - cost.baseline_bytes)
        else:
            cost.seconds = time.perf_counter() - start
            cost.peak_bytes = max(0, _maxrss_bytes() - cost.baseline_bytes)


def synchronize(device: str | torch.device | None) -> None:
    """Wait until the work queued on ``device`` is done (CUDA, XPU, MPS); a no-op on the CPU and other devices.

    Args:
        device: The device whose queue to wait for (``None``: nothing to wait for).
    """
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()


def device_clock(device: str | torch.device | None) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (see :func:`synchronize`).

    Differences of two readings time what ran on the device between them, not only the launches of its kernels.
    """
    synchronize(device)
    return time.perf_counter()


def main_process_device(trainer: Any) -> torch.device:
    """Where the process that calls ``trainer.fit`` may compute before and after the fit (a profile, evaluations).

    The strategy's root device, except when the Trainer will *fork* its ranks onto CUDA devices (``ddp_fork``,
    ``ddp_notebook``): a process that has initialised CUDA cannot fork CUDA ranks ("Cannot re-initialize CUDA in
    forked subprocess"), so that process stays on the CPU and only the ranks use the GPUs. (Refusing ``ddp_fork``
    with CUDA would be the other choice; keeping the main process on the CPU lets it work, at the price of CPU time
    for what that process computes itself.)

    Args:
        trainer: A Lightning ``Trainer``.
    """
    strategy = trainer.strategy
    device = strategy.root_device
    if device.type == "cuda" and _forks_ranks(getattr(strategy, "launcher", None)):
        return torch.device("cpu")
    return device


def _forks_ranks(launcher: Any) -> bool:
    """Whether ``launcher`` starts its ranks by forking the calling process (Lightning then refuses an initialised
    CUDA context: ``fork`` and ``forkserver`` start methods)."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if not isinstance(launcher, _MultiProcessingLauncher):
        return False
    method = getattr(launcher, "_start_method", "fork" if launcher.is_interactive_compatible else "spawn")
    return method in ("fork", "forkserver")


def fit_memory(timings: dict[str, Any], cost: Cost) -> dict[str, Any]:
    """The peak memory of a fit for a report: what the ranks measured themselves when they did
    (``UnlearnModule.timings``: ``fit_peak_bytes``, the largest over ranks, with its method and device), else
    ``cost``, the measurement around ``fit`` in the calling process (right only when that process is the rank).

    Returns:
        ``{"peak_mib", "memory_method", "memory_device"}``.
    """
    if timings.get("fit_peak_bytes") is not None:
        return {
            "peak_mib": timings["fit_peak_bytes"] / 2**20,
            "memory_method": timings.get("fit_memory_method"),
            "memory_device": timings.get("fit_memory_device"),
        }
    return {"peak_mib": cost.peak_bytes / 2**20, "memory_method": cost.method, "memory_device": cost.device}


def accelerator_device(accelerator: str = "auto") -> torch.device:
    """The device a Trainer with ``accelerator`` (and the default ``devices``) computes on in its first process, for
    work done outside the Trainer that must run where the Trainer runs (evaluations compared with a request's)."""
    name = str(accelerator).lower()
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name in ("gpu", "cuda"):
        return torch.device("cuda", 0)
    if name == "mps":
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"`accelerator` must be one of 'auto', 'cpu', 'gpu', 'cuda', 'mps', got {accelerator!r}.")


def device_label(device: str | torch.device) -> str:
    """What to call ``device`` in a results file: ``"cuda:0 (NVIDIA H200)"``, ``"cpu (x86_64, 2 threads)"``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = torch.cuda.current_device() if dev.index is None else dev.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if dev.type == "cpu":
        import platform

        return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return str(dev)


class FitMeter:
    """:func:`measure` started and stopped by two hooks instead of a ``with`` block: a rank's fit from ``setup`` to
    ``on_train_end``. Under ``ddp_spawn`` and ``ddp_fork`` the ranks are not the process that calls ``fit``, so a
    measurement around ``fit`` there never sees their memory; each rank measures itself with this."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self._cost: Cost | None = None

    def start(self, device: torch.device) -> None:
        """Start measuring on ``device`` (a measurement still running is stopped first)."""
        self.stop()
        self._stack = ExitStack()
        self._cost = self._stack.enter_context(measure(device))

    @property
    def running(self) -> bool:
        """Whether a measurement is running (its sampler thread, on the CPU)."""
        return self._stack is not None

    def stop(self) -> Cost | None:
        """Stop measuring; the measurement, or None if none was running."""
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        stack.close()
        return self._cost


__all__ = [
    "FitMeter",
    "Cost",
    "METHODS",
    "accelerator_device",
    "device_clock",
    "device_label",
    "fit_memory",
    "main_process_device",
    "measure",
    "synchronize",
]
