"""Float32 arithmetic where a number is promised exact: the profiling block and the one-step gradients.

On a GPU three things quietly lower the precision of float32 work: TF32 (cuDNN convolutions use it by default, and
matrix products do once a user follows Lightning's ``torch.set_float32_matmul_precision("high")`` hint: ~1e-3
relative error), autocast (``precision="16-mixed"``/``"bf16-mixed"`` runs ``training_step`` in half precision) and
half-precision weights (``precision="16-true"``/``"bf16-true"``, where squares of per-sample gradients overflow
float16). On the CPU oneDNN may likewise run float32 matrix products in bfloat16
(``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). The context managers here switch each of them off for a
block and restore the caller's settings exactly on exit.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["float32_weights", "full_precision", "no_autocast", "no_tf32"]

#: (backend, operation) pairs of PyTorch's per-operation float32 precision settings.
_FP32_KEYS = (
    ("cuda", "matmul"),
    ("cuda", "conv"),
    ("cuda", "rnn"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)
_HALF = (torch.float16, torch.bfloat16)


def _read(getter: object, *args: str) -> tuple[bool, object]:
    try:
        return True, getter(*args)  # type: ignore[operator]
    except (RuntimeError, AttributeError):  # a mix of the legacy and new APIs can make a getter raise
        return False, None


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Run the block with IEEE float32 matrix products and convolutions: no TF32 on CUDA, no bfloat16 in oneDNN.

    Both of PyTorch's interfaces are set, consistently: the legacy one (``torch.set_float32_matmul_precision``,
    ``torch.backends.cudnn.allow_tf32``) and, where it exists (torch >= 2.9), the per-operation one
    (``torch.backends.{cuda.matmul,cudnn.conv,mkldnn}.fp32_precision = "ieee"``); on exit every setting read on entry
    is written back, so the caller's state (whichever interface it used) is restored exactly. The settings are
    process-wide: other threads see them while the block runs.
    """
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    setter = getattr(torch._C, "_set_fp32_precision_setter", None)
    has_matmul, matmul = _read(torch.get_float32_matmul_precision)
    has_cudnn, cudnn = _read(lambda: torch.backends.cudnn.allow_tf32)
    saved: dict[tuple[str, str], object] = {}
    if getter is not None and setter is not None:
        for key in _FP32_KEYS:
            ok, value = _read(getter, *key)
            if ok:
                saved[key] = value
    try:
        if has_matmul:
            torch.set_float32_matmul_precision("highest")
        if has_cudnn:
            torch.backends.cudnn.allow_tf32 = False
        for key in saved:
            setter(*key, "ieee")  # type: ignore[misc]
        yield
    finally:
        if has_matmul:
            torch.set_float32_matmul_precision(matmul)  # type: ignore[arg-type]
        if has_cudnn:
            torch.backends.cudnn.allow_tf32 = bool(cudnn)
        for key, value in saved.items():
            setter(*key, value)  # type: ignore[misc]


def _autocast_available(device_type: str) -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)
    return check(device_type) if check is not None else device_type in ("cpu", "cuda")


@contextlib.contextmanager
def no_autocast(*device_types: str) -> Iterator[None]:
    """Run the block with autocast switched off for ``device_types`` (e.g. inside Lightning's ``16-mixed``
    ``training_step``); device types without autocast (``meta``) are ignored."""
    with contextlib.ExitStack() as stack:
        for device_type in dict.fromkeys(device_types):
            if _autocast_available(device_type):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


@contextlib.contextmanager
def float32_weights(model: nn.Module) -> Iterator[bool]:
    """Run the block with ``model``'s float16/bfloat16 parameters and buffers in float32; yields whether any were.

    The tensors keep their identity (``.data`` is swapped, as ``nn.Module.half()`` does), and on exit they get their
    own dtype back; float16 → float32 → float16 (and bfloat16) is exact, so the model leaves the block bit-identical.
    A float32 model is not touched.
    """
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.dtype in _HALF]
    if not tensors:
        yield False
        return
    dtypes = [t.dtype for t in tensors]
    with torch.no_grad():
        for t in tensors:
            t.data = t.data.float()
    try:
        yield True
    finally:
        with torch.no_grad():
            for t, dtype in zip(tensors, dtypes, strict=True):
                t.data = t.data.to(dtype)


@contextlib.contextmanager
def full_precision(model: nn.Module, device: torch.device | str) -> Iterator[bool]:
    """:func:`no_tf32`, :func:`no_autocast` on ``device`` and :func:`float32_weights` of ``model`` together (the
    profiling block); yields whether the weights were promoted (then half-precision inputs must be cast too)."""
    with no_tf32(), no_autocast(torch.device(device).type), float32_weights(model) as promoted:
        yield promoted


def float32_inputs(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is float16/bfloat16 (inputs of a model promoted by :func:`float32_weights`)."""
    return x.float() if x.dtype in _HALF else x
