"""Iterative solvers of ``(H + λI) x = b`` from Hessian-vector products: conjugate gradients and LiSSA.

Both take ``hvp(v) -> H v`` on flat vectors, never form ``H``, and stop with a clear status instead of returning
garbage: CG stops at non-positive curvature (``H + λI`` not positive definite along a search direction), LiSSA stops
when its iterate stops being finite or grows beyond ``guard`` times ``‖b‖ / scale · depth``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

HVP = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SolveInfo:
    """What an iterative solve did.

    Attributes:
        iterations: Iterations run.
        residual: Final relative residual ``‖(H + λI) x − b‖ / ‖b‖`` (computed with one extra HVP).
        status: ``"converged"``, ``"max_iter"``, ``"negative_curvature"`` or ``"diverged"``.
    """

    iterations: int
    residual: float
    status: str


def _residual(hvp: HVP, x: torch.Tensor, b: torch.Tensor, damping: float) -> float:
    bnorm = b.norm().clamp_min(torch.finfo(b.dtype).tiny)
    return float(((hvp(x) + damping * x - b).norm() / bnorm).item())


def conjugate_gradient(
    hvp: HVP, b: torch.Tensor, damping: float = 0.0, max_iter: int = 100, tol: float = 1e-6
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``(H + damping·I) x = b`` by conjugate gradients (``H`` symmetric; positive definite after damping).

    Args:
        hvp: Hessian-vector product on flat vectors.
        b: Right-hand side.
        damping: λ ≥ 0 added to the diagonal.
        max_iter: Iteration cap.
        tol: Stop when ``‖r‖ ≤ tol · ‖b‖``.
    """
    if damping < 0 or max_iter < 1 or tol <= 0:
        raise ValueError(f"need `damping` >= 0, `max_iter` >= 1, `tol` > 0; got {damping}, {max_iter}, {tol}.")
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r.dot(r)
    threshold = (tol * b.norm()) ** 2
    it = 0
    status = "converged" if rr <= threshold else "max_iter"
    while status == "max_iter" and it < max_iter:
        ap = hvp(p) + damping * p
        curvature = p.dot(ap)
        if not torch.isfinite(curvature) or curvature <= 0:
            status = "negative_curvature"
            break
        it += 1
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r.dot(r)
        if rr_new <= threshold:
            status = "converged"
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, SolveInfo(it, _residual(hvp, x, b, damping), status)


def lissa(
    hvp: HVP,
    b: torch.Tensor,
    damping: float = 0.0,
    scale: float = 10.0,
    depth: int = 200,
    tol: float = 1e-6,
    guard: float = 1e3,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``(H + damping·I) x = b`` with LiSSA (Agarwal et al. 2017), i.e. the truncated Neumann series.

    Iterates ``y ← b + y − (H + λI) y / scale`` and returns ``x = y / scale``. Converges when ``scale`` exceeds the
    largest eigenvalue of ``H + λI`` and that matrix is positive definite; otherwise the guard stops it.

    Args:
        hvp: Hessian-vector product on flat vectors (the same operator each call for a deterministic solve).
        b: Right-hand side.
        damping: λ ≥ 0.
        scale: Must exceed the largest eigenvalue of ``H + λI``.
        depth: Iterations.
        tol: Stop when the update's norm falls below ``tol · ‖y‖``.
        guard: Stop as ``"diverged"`` when ``‖y‖`` exceeds ``guard · depth · ‖b‖``.
    """
    if damping < 0 or scale <= 0 or depth < 1:
        raise ValueError(f"need `damping` >= 0, `scale` > 0, `depth` >= 1; got {damping}, {scale}, {depth}.")
    y = b.clone()
    limit = guard * depth * float(b.norm())
    status, it = "max_iter", 0
    for it in range(1, depth + 1):  # noqa: B007 - `it` is reported after the loop
        y_new = b + y - (hvp(y) + damping * y) / scale
        delta = (y_new - y).norm()
        y = y_new
        if not torch.isfinite(y).all() or float(y.norm()) > limit:
            status = "diverged"
            break
        if delta <= tol * y.norm():
            status = "converged"
            break
    x = y / scale
    return x, SolveInfo(it, _residual(hvp, x, b, damping), status)


def dataset_hvp(
    net: nn.Module,
    params: list[nn.Parameter],
    dataset: Dataset,
    num_samples: int,
    device: torch.device,
    scale: float = 1.0,
) -> HVP:
    """``v ↦ scale · H v`` on flat vectors, ``H`` the Hessian of the mean cross-entropy of ``net`` (in eval mode) over
    the first ``num_samples`` items ``(x, y, ...)`` of ``dataset``, restricted to ``params`` (the batches are loaded
    once, so the operator is deterministic)."""
    subset = Subset(dataset, range(min(num_samples, len(dataset))))  # type: ignore[arg-type]
    batches = [(b[0].to(device), b[1].to(device)) for b in DataLoader(subset, batch_size=512)]
    total = sum(len(y) for _, y in batches)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        net.eval()
        out = torch.zeros_like(v)
        parts, offset = [], 0
        for p in params:
            parts.append(v[offset : offset + p.numel()].reshape(p.shape).to(p.dtype))
            offset += p.numel()
        with torch.enable_grad():
            for x, y in batches:
                loss = F.cross_entropy(net(x), y, reduction="sum") / total
                grads = torch.autograd.grad(loss, params, create_graph=True)
                dot = sum((g * u).sum() for g, u in zip(grads, parts, strict=True))
                hv = torch.autograd.grad(dot, params)
                out += torch.cat([h.reshape(-1) for h in hv]).to(v.dtype)
        return scale * out

    return hvp
