"""The generic path of the engine: per-sample squared gradients of *any* differentiable parameter, by ``torch.func``.

The per-layer rules (Linear, convolutions, BatchNorm) build per-sample products from layer inputs and output
gradients. Every other parameter — LayerNorm, attention (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
scaled-dot-product attention), embeddings, positional embeddings and any free ``nn.Parameter``, a parameter shared
between layers, a layer called twice — is handled here: for each sample ``x`` and each of the ``K`` columns ``s`` of
the loss curvature's factor, the vector–Jacobian product ``J(x)ᵀ s`` of the logits w.r.t. those parameters
(``vmap`` over the columns of one ``vjp``, ``vmap`` over the samples), squared and summed. That is the same quantity
the rules compute, ``Σ_samples Σ_columns (Jᵀ s)²``, for the parameters they do not cover; the other parameters are
held constant, so nothing is computed twice. Samples are processed in chunks whose per-sample gradients
(``K × parameters`` floats each) fit the memory budget.

Attention is run with PyTorch's math kernel inside the block (:func:`math_attention`): the fused flash and
memory-efficient kernels have no batching rule under ``vmap`` and no double backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

__all__ = ["math_attention", "generic_squares", "generic_chunk"]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Within the block, ``scaled_dot_product_attention`` runs its math implementation (differentiable twice and
    batchable); the caller's own kernel choice is restored afterwards. A no-op where torch has no ``sdpa_kernel``."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def generic_chunk(num_columns: int, names: list[str], model: nn.Module, budget_bytes: int) -> int:
    """Samples per ``vmap`` call so that their per-sample gradients (and the squares) fit ``budget_bytes``."""
    params = dict(model.named_parameters())
    per_sample = num_columns * sum(params[n].numel() for n in names) * 4 * 3  # gradients, squares, temporaries
    return max(1, int(budget_bytes // max(per_sample, 1)))


def generic_squares(
    model: nn.Module,
    inputs: Any,
    columns: Tensor,
    names: list[str],
    sums: dict[str, Tensor],
    chunk: int,
) -> None:
    """``sums[name] += Σ_samples Σ_columns (J_nameᵀ s)²`` for the parameters ``names`` (see the module docstring).

    Args:
        model: The network (in eval mode; its ``forward`` returns the logits, output transforms included as hooks).
        inputs: A batch of inputs (a tensor, or a dict/tuple of tensors batched on their first dimension).
        columns: (m, K, C) the vectors backpropagated from the logits, one set per sample.
        names: The parameters to compute (the model's own names).
        sums: The accumulators, by parameter name.
        chunk: Samples per ``vmap`` call.
    """
    if not names:
        return
    params = dict(model.named_parameters())
    chosen = {n: params[n].detach() for n in names}
    constants = {n: p.detach() for n, p in params.items() if n not in chosen}
    buffers = dict(model.named_buffers())

    def squares(x: Any, cols: Tensor) -> dict[str, Tensor]:
        def logits(p: dict[str, Tensor]) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0), x)
            return functional_call(model, ({**constants, **p}, buffers), (one,)).squeeze(0)

        _, pullback = vjp(logits, chosen)
        grads = vmap(pullback)(cols.to(dtype=next(iter(chosen.values())).dtype))[0]
        return {n: g.square().sum(0) for n, g in grads.items()}

    total = columns.shape[0]
    with math_attention():
        for start in range(0, total, chunk):
            stop = min(total, start + chunk)
            part = tree_map(lambda t, a=start, b=stop: t[a:b], inputs)
            out = vmap(squares)(part, columns[start:stop])
            for n, value in out.items():
                sums[n] += value.sum(0).to(sums[n].dtype)
