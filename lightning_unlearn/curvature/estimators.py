"""Estimators of the Hessian diagonal of the mean training loss, one small object each.

Every estimator adds per-parameter *sums* over samples into a dict keyed by parameter name and returns how many
samples it saw; dividing by the total count gives the estimate (see :func:`lightning_unlearn.curvature.compute`). A
distributed caller can therefore all-reduce sums and counts and divide once.

=============  ==============================================  =========================================
name           estimates                                       how
=============  ==============================================  =========================================
``exact``      diag of the generalised Gauss-Newton (GGN);     backprop of a ``C-1`` column factor of the
               equals diag(H) for piecewise-linear networks    cross-entropy Hessian, per-sample squares
``mc``         diag(GGN), unbiased, non-negative               ``k`` sampled labels per input
``hutchinson`` diag(H) for any twice-differentiable network    ``E[v * Hv]``, Rademacher ``v``
``fisher``     diag of the empirical Fisher                    per-sample squared gradients, true labels
=============  ==============================================  =========================================

Why ``exact`` is the Hessian diagonal: the Hessian of ``loss(f(x; w))`` is ``JᵀH_f J + Σ_c ∂loss/∂f_c ∇²f_c``. For a
network made of Linear/Conv layers, BatchNorm in eval mode and piecewise-linear operations (ReLU, max/avg pooling,
residual additions, ...), the output is piecewise linear in every *single* weight, so ``∂²f_c/∂w²`` is zero and the
second term has a zero diagonal: ``diag(H) = diag(GGN)`` exactly (almost everywhere). :func:`check_exact` verifies
the modules of a model against that whitelist.

The ``exact``, ``mc`` and ``fisher`` estimators share one machinery: one forward pass with hooks that keep the input
and output of every Linear/Conv/BatchNorm layer, then backpropagation of a few vectors per sample from the logits to
the layer *outputs* only (never to the parameters), and finally per-layer sums of squared per-sample gradients built
from layer inputs and output gradients (rank-one products for Linear layers, unfolded patches and batched matrix
products for convolutions, normalised inputs for BatchNorm).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "ESTIMATORS",
    "PIECEWISE_LINEAR_MODULES",
    "SUPPORTED_LAYERS",
    "CurvatureEstimator",
    "EmpiricalFisher",
    "ExactDiagonal",
    "HutchinsonDiagonal",
    "MonteCarloGGN",
    "SquaredGradientEstimator",
    "check_exact",
    "find_inexact_modules",
    "get_estimator",
    "init_sums",
    "make_generator",
]

#: Parameter-holding layers whose per-sample squared gradients the ``exact``/``mc``/``fisher`` estimators compute.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)

#: Parameter-free modules that are piecewise linear (in eval mode), so they keep ``diag(H) = diag(GGN)``.
PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
try:  # a LightningModule's torchmetrics objects hold state, not parameters, and never run in `forward`
    from torchmetrics import Metric, MetricCollection

    _NOT_IN_FORWARD: tuple[type, ...] = (nn.ModuleList, nn.ModuleDict, Metric, MetricCollection)
except ImportError:  # pragma: no cover - torchmetrics is a dependency
    _NOT_IN_FORWARD = (nn.ModuleList, nn.ModuleDict)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _display(name: str) -> str:
    return repr(name) if name else "<root module>"


def make_generator(seed: int, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, rank)``, so that every process draws different numbers.

    Args:
        seed: The user-facing seed.
        rank: The process rank (0 without distribution).
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(rank) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mixed)
    return generator


def init_sums(model: nn.Module, sums: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Zero accumulators, one per parameter of ``model`` (all of them, whatever their ``requires_grad``).

    Accumulators live on the parameter's device with at least float32 precision. Existing entries are kept.

    Args:
        model: The network.
        sums: An existing dict to complete in place, or ``None`` for a new one.
    """
    sums = {} if sums is None else sums
    for name, param in model.named_parameters():
        if name not in sums:
            dtype = torch.promote_types(param.dtype, torch.float32)
            sums[name] = torch.zeros(param.shape, dtype=dtype, device=param.device)
    return sums


def find_inexact_modules(model: nn.Module) -> list[str]:
    """Describe every module that breaks ``diag(H) = diag(GGN)`` under cross-entropy (empty list: exact).

    See :func:`check_exact` for the rules.

    Args:
        model: The network.
    """
    problems: list[str] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if any(name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(module, _NOT_IN_FORWARD):  # metrics and bare containers are never called by `forward`
            skipped.append(name)
            continue
        has_own_params = any(True for _ in module.parameters(recurse=False))
        is_leaf = not any(True for _ in module.children())
        if isinstance(module, _BATCHNORMS):
            if module.training:
                problems.append(f"{_display(name)} ({kind}) is in training mode (batch statistics)")
            elif module.running_mean is None:
                problems.append(f"{_display(name)} ({kind}) has no running statistics (track_running_stats=False)")
        elif isinstance(module, SUPPORTED_LAYERS):
            continue
        elif has_own_params:
            problems.append(f"{_display(name)} ({kind}) holds parameters but is not a Linear/Conv/BatchNorm layer")
        elif is_leaf and not isinstance(module, PIECEWISE_LINEAR_MODULES):
            problems.append(f"{_display(name)} ({kind}) is not known to be piecewise linear")
        elif isinstance(module, _DROPOUTS) and module.training:
            problems.append(f"{_display(name)} ({kind}) is in training mode")
    return problems


def check_exact(model: nn.Module, *, strict: bool = True) -> list[str]:
    """Check that the GGN diagonal of ``model`` under cross-entropy is its Hessian diagonal.

    Walks all modules. The check passes when every leaf module is a Linear/Conv1d/2d/3d layer, a BatchNorm in eval mode
    with running statistics, or a piecewise-linear parameter-free module (ReLU, LeakyReLU, ReLU6, Hardtanh, max/avg
    and adaptive pooling, Flatten/Unflatten, Identity, zero/constant padding, Dropout in eval mode). Container modules
    (``nn.Sequential``, ResNet blocks, ...) are fine as long as they hold no parameters themselves; additions such as
    residual connections inside their ``forward`` keep exactness.

    Functional operations called inside a ``forward`` (``F.gelu``, ``torch.tanh``, ``F.layer_norm``, a softmax, ...)
    cannot be detected by walking modules: a model that uses them passes this check although its GGN diagonal is not
    its Hessian diagonal. Use the ``hutchinson`` estimator for such models.

    Args:
        model: The network (in the mode it will be evaluated in; the profiling loop puts it in eval mode first).
        strict: ``True``: raise when the check fails. ``False``: only warn that the result is then the GGN diagonal,
            not the Hessian's.

    Returns:
        The list of problems found (empty when the diagonal is exact).

    Raises:
        ValueError: With ``strict=True``, naming every offending module (qualified name and type).
    """
    problems = find_inexact_modules(model)
    if problems:
        listing = "; ".join(problems)
        if strict:
            raise ValueError(
                f"diag(Hessian) = diag(GGN) does not hold for this {type(model).__name__}: {listing}. Use "
                "estimator='hutchinson' for the true Hessian diagonal, or the exact estimator with strict=False for "
                "the GGN diagonal."
            )
        warnings.warn(
            f"{type(model).__name__} is not piecewise linear ({listing}): the 'exact' estimator computes the GGN "
            "diagonal, which is then not the Hessian diagonal.",
            stacklevel=2,
        )
    return problems


class CurvatureEstimator:
    """Base class: accumulates per-parameter sums of a Hessian-diagonal estimate over batches.

    Attributes:
        name: Registry name (``exact``, ``mc``, ``hutchinson``, ``fisher``).
        target: What the estimate converges to: ``"hessian"``, ``"ggn"`` or ``"empirical_fisher"`` diagonal.
        deterministic: Whether the result is free of random draws.
    """

    name: ClassVar[str] = ""
    target: ClassVar[str] = ""
    deterministic: ClassVar[bool] = True

    def exact_for_model(self, model: nn.Module) -> bool:
        """Whether this estimator returns exactly the Hessian diagonal of the mean loss for ``model`` (no randomness).

        Args:
            model: The network, in the mode it will be profiled in (eval).
        """
        return False

    def options(self) -> dict[str, Any]:
        """The estimator's settings, recorded in a profile's metadata."""
        return {}

    def accumulate(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sums: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
    ) -> int:
        """Add this batch's per-parameter sums over samples into ``sums`` (in place) and return the batch size.

        Args:
            model: The network (put it in eval mode first; it is not modified).
            inputs: A batch of inputs on the model's device.
            targets: Class indices (``exact``/``mc``/``fisher``) or whatever ``loss_fn`` takes (``hutchinson``).
            sums: Accumulators keyed by parameter name; missing entries are created (see :func:`init_sums`).
            generator: CPU random generator for the stochastic estimators (a fixed default when ``None``).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


# ----------------------------------------------------------------------------------------------------------------------
# Per-sample squared gradients from layer inputs and output gradients.
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _Capture:
    name: str
    module: nn.Module
    calls: int = 0
    input: Tensor | None = None
    output: Tensor | None = None
    version: int = 0
    input_fn: Any = None


def _sumsq(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return t.square().sum(dims)


class _Workspace:
    """A reusable scratch buffer: large temporaries are carved out of it instead of freshly allocated each time."""

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def get(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        buf = self._buffer
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._buffer = buf
        return buf[:numel].view(shape)


def _conv_padding(conv: nn.modules.conv._ConvNd, spatial: int) -> list[int]:
    """``F.pad`` argument (last dimension first) equivalent to the convolution's own padding."""
    pads: list[int] = []
    for dim in reversed(range(spatial)):
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                left = right = 0
            else:  # "same"
                total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
                left, right = total // 2, total - total // 2
        else:
            left = right = conv.padding[dim]
        pads += [left, right]
    return pads


def _unfold(x: Tensor, conv: nn.modules.conv._ConvNd, workspace: _Workspace | None = None) -> Tensor:
    """Patches of ``x`` (m, Cin, *spatial) as (m, Cin·prod(kernel), L), ordered like ``weight.flatten(1)``.

    Args:
        x: Layer input.
        conv: The convolution (kernel size, stride, dilation, padding and padding mode are honoured).
        workspace: Optional scratch buffer to write the patches into.
    """
    spatial = x.dim() - 2
    pads = _conv_padding(conv, spatial)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    m, cin = x.shape[:2]
    for dim in range(spatial):
        span = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        x = x.unfold(2 + dim, span, conv.stride[dim])
        if conv.dilation[dim] > 1:
            x = x[..., :: conv.dilation[dim]]
    # (m, Cin, *out_spatial, *kernel) -> (m, Cin, *kernel, *out_spatial)
    order = [0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial)]
    x = x.permute(order)
    if workspace is None:
        return x.reshape(m, cin * math.prod(conv.kernel_size), -1)
    out = workspace.get(tuple(x.shape), x)
    out.copy_(x)
    return out.view(m, cin * math.prod(conv.kernel_size), -1)


def _add_row_squares(acc: Tensor, rows: Tensor) -> None:
    """``acc += Σ_r rows[r]²`` for ``rows`` (R, P); ``rows`` is scratch and may be overwritten."""
    if rows.shape[1] >= 16384:
        for row in rows:  # memory-bound: one pass per row, no temporary
            acc.addcmul_(row, row)
    else:
        squares = rows.square_()
        acc.addmv_(squares.t(), torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device))


class _LayerRules:
    """Sums over samples and backpropagated columns of squared per-sample parameter gradients, per layer type.

    ``g`` always has shape (m, K, *output_shape[1:]): output gradients of m samples for K backpropagated columns. For
    convolutions (and Linear layers applied to sequences) per-sample gradients ``g_{n,c} Uₙᵀ`` (``U`` = unfolded input
    patches) are formed chunk by chunk in a reused buffer and their squares accumulated. When the number of output
    positions ``L`` is small compared with ``K`` the Gram form ``Σ_{l,l'} (Σ_c g_l g_l') (u_l u_l')`` is used
    instead: one large matrix product whose contraction runs over samples and position pairs.

    Args:
        chunk_elements: Size of the scratch buffer, in elements.
    """

    def __init__(self, chunk_elements: int) -> None:
        self.chunk_elements = max(1 << 16, int(chunk_elements))
        self.workspace = _Workspace()
        self.patch_workspace = _Workspace()

    def __call__(self, module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        if isinstance(module, nn.Linear):
            return self.linear(module, x, g)
        if isinstance(module, _CONVS):
            return self.conv(module, x, g)
        if isinstance(module, _BATCHNORMS):
            return self.batchnorm(module, x, g)
        raise TypeError(f"unsupported layer type {type(module).__name__}")  # guarded earlier

    def linear(self, module: nn.Linear, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        m, k = g.shape[:2]
        if x.dim() == 2:
            # per-sample gradients are rank one: sum_c (g_c x^T)^2 = (sum_c g_c^2) (x^2)^T
            g2 = g.square().sum(1)  # (m, out)
            out["weight"] = g2.t() @ x.square()
            if module.bias is not None:
                out["bias"] = g2.sum(0)
            return out
        xt = x.reshape(m, -1, x.shape[-1])  # (m, T, in)
        gt = g.reshape(m, k, -1, g.shape[-1]).transpose(2, 3)  # (m, k, out, T)
        if module.bias is not None:
            out["bias"] = _sumsq(gt.sum(3), (0, 1))
        length = xt.shape[1]
        weight = self._products(gt, lambda a, b: xt[a:b].transpose(1, 2), 1, length, module.weight.shape[1])
        out["weight"] = weight.view(module.weight.shape)
        return out

    def conv(self, module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        m, k, cout = g.shape[:3]
        gl = g.reshape(m, k, cout, -1)  # (m, k, Cout, L)
        if module.bias is not None:
            out["bias"] = _sumsq(gl.sum(3), (0, 1))
        length = gl.shape[-1]
        fan_in = module.weight[0].numel()
        weight = self._products(gl, lambda a, b: _unfold(x[a:b], module, self.patch_workspace), module.groups, length, fan_in)
        out["weight"] = weight.view(module.weight.shape)
        return out

    def batchnorm(self, module: nn.modules.batchnorm._BatchNorm, x: Tensor, g: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        m, k, ch = g.shape[:3]
        gl = g.reshape(m, k, ch, -1)
        if module.weight is not None:
            shape = (1, ch, 1)
            mean = module.running_mean.to(x.dtype).view(shape)
            inv_std = torch.rsqrt(module.running_var.to(x.dtype).view(shape) + module.eps)
            xhat = (x.reshape(m, ch, -1) - mean) * inv_std  # (m, ch, S)
            per_sample = torch.empty(m, k, ch, dtype=gl.dtype, device=gl.device)
            scratch = self.workspace.get(tuple(xhat.shape), xhat)
            for j in range(k):  # one column at a time: no temporary as large as the gradients
                torch.sum(torch.mul(gl[:, j], xhat, out=scratch), -1, out=per_sample[:, j])
            out["weight"] = _sumsq(per_sample, (0, 1))
        if module.bias is not None:
            out["bias"] = _sumsq(gl.sum(3), (0, 1))
        return out

    def _products(
        self,
        gl: Tensor,
        patches: Callable[[int, int], Tensor],
        groups: int,
        length: int,
        fan_in: int,
    ) -> Tensor:
        """``Σ_{n,c} (g_{n,c} Uₙᵀ)²`` per group, flattened like the weight (Cout·fan_in).

        Args:
            gl: Output gradients (m, K, Cout, L).
            patches: ``patches(start, stop)`` → inputs of those samples as (s, groups·fan_in, L).
            groups: Convolution groups (1 for Linear).
            length: ``L``, the number of output positions.
            fan_in: Input elements per output channel (``weight[0].numel()``).
        """
        m, k, cout = gl.shape[:3]
        acc = torch.zeros(cout * fan_in, dtype=gl.dtype, device=gl.device)
        if groups == 1 and length > 1:
            # Cost per sample in multiply-adds, memory passes weighted as 4: direct products vs the Gram form.
            pairs = length * (length + 1) // 2
            direct = k * cout * fan_in * (length + 4)
            gram = cout * fan_in * pairs + cout * length * length * k + 4 * pairs * fan_in
            if gram < direct:
                return self._gram(acc, gl, patches, length, fan_in)
        cout_g = cout // groups
        per_class = cout * fan_in  # one per-sample weight gradient
        if per_class * k <= self.chunk_elements:
            class_step = k
            sample_step = max(1, min(m, self.chunk_elements // (per_class * k)))
        else:
            class_step = max(1, self.chunk_elements // per_class)
            sample_step = 1
        for start in range(0, m, sample_step):
            stop = min(m, start + sample_step)
            s = stop - start
            u = patches(start, stop)  # (s, G·fan_in, L)
            b = u.view(s * groups, fan_in, length).transpose(1, 2)  # (s·G, L, fan_in)
            for c0 in range(0, k, class_step):
                c1 = min(k, c0 + class_step)
                kc = c1 - c0
                a = gl[start:stop, c0:c1]  # (s, kc, Cout, L)
                if groups > 1:
                    a = a.reshape(s, kc, groups, cout_g, length).transpose(1, 2)
                a = a.reshape(s * groups, kc * cout_g, length)
                prod = self.workspace.get((s * groups, kc * cout_g, fan_in), a)
                torch.bmm(a, b, out=prod)
                if groups == 1:
                    _add_row_squares(acc, prod.view(s * kc, per_class))
                else:
                    acc += prod.square_().view(s, groups, kc, cout_g * fan_in).sum((0, 2)).view(-1)
        return acc

    def _gram(self, acc: Tensor, gl: Tensor, patches: Callable[[int, int], Tensor], length: int, fan_in: int) -> Tensor:
        """``Σ_n Σ_{l≤l'} w_{ll'} (Σ_c g_{c,l} g_{c,l'}) ⊗ (u_l u_l')``: one product contracting samples and pairs."""
        m, k, cout = gl.shape[:3]
        rows, cols = torch.triu_indices(length, length, device=gl.device)
        pairs = rows.numel()
        flat = rows * length + cols
        twice = torch.where(rows == cols, 1.0, 2.0).to(gl.dtype)
        step = max(1, min(m, self.chunk_elements // (pairs * fan_in)))
        acc2 = acc.view(cout, fan_in)
        for start in range(0, m, step):
            stop = min(m, start + step)
            s = stop - start
            ut = patches(start, stop).transpose(1, 2).contiguous()  # (s, L, fan_in)
            b = self.workspace.get((s, pairs, fan_in), ut)
            offset = 0
            for row in range(length):  # b[:, (row, col)] = u_row * u_col for col >= row
                width = length - row
                torch.mul(ut[:, row : row + 1], ut[:, row:], out=b[:, offset : offset + width])
                offset += width
            g = gl[start:stop].transpose(1, 2).reshape(s * cout, k, length)
            gram = torch.bmm(g.transpose(1, 2), g).view(s, cout, length * length)  # (s, Cout, L·L)
            a = (gram[:, :, flat] * twice).transpose(0, 1).reshape(cout, s * pairs)
            acc2.addmm_(a, b.view(s * pairs, fan_in))
        return acc


def _param_layers(model: nn.Module, estimator: str) -> list[tuple[str, nn.Module]]:
    """The modules that own parameters, checked against :data:`SUPPORTED_LAYERS`; raises for anything else."""
    owners: dict[int, str] = {}
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if isinstance(module, _BATCHNORMS):
            if module.training:
                raise ValueError(
                    f"BatchNorm {_display(name)} ({type(module).__name__}) is in training mode: put the model in eval "
                    "mode (profile_model/accumulate_diagonal do this) before the '{estimator}' estimator runs."
                )
            if own and module.running_mean is None:
                raise ValueError(
                    f"BatchNorm {_display(name)} ({type(module).__name__}) has no running statistics "
                    f"(track_running_stats=False), so samples interact; the '{estimator}' estimator needs per-sample "
                    "gradients. Use estimator='hutchinson'."
                )
        if not own:
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            names = ", ".join(p for p, _ in own)
            raise ValueError(
                f"module {_display(name)} of type {type(module).__name__} holds parameters ({names}), but the "
                f"'{estimator}' estimator only computes per-sample gradients of Linear, Conv1d/2d/3d and "
                "BatchNorm1d/2d/3d layers. Use estimator='hutchinson', which works for any differentiable network."
            )
        for pname, param in own:
            qual = f"{name}.{pname}" if name else pname
            if id(param) in owners:
                raise ValueError(
                    f"parameter {qual!r} is shared with {owners[id(param)]!r}; the '{estimator}' estimator needs each "
                    "parameter to belong to one layer. Use estimator='hutchinson'."
                )
            owners[id(param)] = qual
        layers.append((name, module))
    return layers


class SquaredGradientEstimator(CurvatureEstimator):
    """Shared machinery of ``exact``, ``mc`` and ``fisher``: sums of squared per-sample gradients.

    For every sample the subclass provides ``K`` vectors ``s`` in logit space (the columns of a factor of the
    per-sample loss curvature); the estimator adds ``Σ_samples Σ_columns (Jᵀ s)²`` for every parameter, where ``J`` is
    the Jacobian of the logits w.r.t. the parameters. Only cross-entropy (mean reduction) is supported.

    Args:
        max_memory_mb: Rough bound on the extra memory used for output gradients and convolution patches; batches are
            processed in chunks of samples so as to stay near it (the results do not depend on it).
    """

    def __init__(self, *, max_memory_mb: float = 1024.0) -> None:
        if max_memory_mb <= 0:
            raise ValueError(f"`max_memory_mb` must be positive, got {max_memory_mb}.")
        self.max_memory_mb = float(max_memory_mb)
        self._size_cache: dict[tuple, tuple[int, int]] = {}
        self._rules: _LayerRules | None = None
        self._grad_buffers: dict[str, _Workspace] = {}
        self._clone_layers: dict[int, set[str]] = {}

    def release_buffers(self) -> None:
        """Free the scratch buffers kept between batches (they are reused to avoid re-allocating large arrays)."""
        self._size_cache.clear()
        self._rules = None
        self._grad_buffers.clear()
        self._clone_layers.clear()

    def options(self) -> dict[str, Any]:
        return {"max_memory_mb": self.max_memory_mb}

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
    def _sizes(self, model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor) -> tuple[int, int]:
        """(bytes of layer outputs per sample, number of classes), from a one-sample forward pass (cached)."""
        key = (id(model), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key in self._size_cache:
            return self._size_cache[key]
        total = [0]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            total[0] += output.numel() * output.element_size()

        handles = [module.register_forward_hook(hook) for _, module in layers]
        try:
            with torch.no_grad():
                logits = model(inputs[:1])
        finally:
            for handle in handles:
                handle.remove()
        result = (max(1, total[0]), int(logits.shape[-1]) if logits.dim() == 2 else 0)
        self._size_cache[key] = result
        return result

    def accumulate(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sums: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
    ) -> int:
        layers = _param_layers(model, self.name)
        self._check_model(model)
        init_sums(model, sums)
        n = int(inputs.shape[0])
        if n == 0:
            return 0
        if targets.shape[0] != n:
            raise ValueError(f"{n} inputs but {targets.shape[0]} targets")
        if generator is None:
            generator = make_generator(0)
        per_sample_bytes, num_classes = self._sizes(model, layers, inputs)
        if num_classes < 2:
            raise ValueError(
                f"the '{self.name}' estimator needs logits of shape (batch, classes) with at least 2 classes "
                "(cross-entropy); use estimator='hutchinson' with a custom loss_fn otherwise."
            )
        k = self._num_columns(num_classes)
        budget = self.max_memory_mb * 2**20
        step = int(max(1, min(n, budget // (per_sample_bytes * (k + 2)))))
        chunk_elements = int(min(budget / 8, 2**25) / max(1, inputs.element_size()))
        if self._rules is None or self._rules.chunk_elements != chunk_elements:
            self._rules = _LayerRules(chunk_elements)
        rules = self._rules
        draws = self._draw(n, generator)
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk_draws = None if draws is None else draws[start:stop]
            self._accumulate_chunk(model, layers, inputs[start:stop], targets[start:stop], chunk_draws, sums, rules)
        return n

    def _forward(
        self, model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor, clone: set[str]
    ) -> tuple[list[_Capture], Tensor]:
        """Forward pass that records every layer's input and output; outputs named in ``clone`` are copied."""
        captures = [_Capture(name, module) for name, module in layers]

        def make_hook(capture: _Capture) -> Callable:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
                capture.calls += 1
                if capture.calls > 1:
                    raise RuntimeError(
                        f"layer {_display(capture.name)} ({type(module).__name__}) is called more than once per "
                        f"forward pass; the '{self.name}' estimator needs one call per layer. Use "
                        "estimator='hutchinson'."
                    )
                if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                    raise RuntimeError(f"layer {_display(capture.name)} was not called with a tensor argument")
                capture.input = args[0].detach()
                capture.input_fn = args[0].grad_fn
                capture.output = output
                capture.version = output._version
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
        return captures, logits

    def _accumulate_chunk(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        inputs: Tensor,
        targets: Tensor,
        draws: Tensor | None,
        sums: dict[str, Tensor],
        rules: _LayerRules,
    ) -> None:
        key = id(model)
        clone = self._clone_layers.setdefault(key, set())
        captures, logits = self._forward(model, layers, inputs, clone)
        modified = {c.name for c in captures if c.output is not None and c.output._version != c.version}
        if modified:
            # A downstream in-place operation (``ReLU(inplace=True)``, ``out += identity``) rewrote a layer output
            # whose gradient we need: run again, handing the rest of the network a copy of those outputs.
            clone |= modified
            del captures, logits
            captures, logits = self._forward(model, layers, inputs, clone)
        if logits.dim() != 2:
            raise ValueError(f"the '{self.name}' estimator needs logits of shape (batch, classes), got {logits.shape}")
        columns = self._columns(logits.detach(), targets, draws).to(logits.dtype)  # (m, K, C)
        live = [c for c in captures if c.output is not None and c.output.requires_grad]
        m, k = columns.shape[:2]
        # Output gradients of all columns, (m, k, *output_shape), in buffers kept between batches. Tensor hooks copy
        # each gradient as soon as the backward pass has computed it, so that it can be freed right away.
        stacked: list[Tensor] = []
        fired = [False] * len(live)
        column = [0]

        def make_hook(i: int) -> Callable[[Tensor], None]:
            def hook(grad: Tensor) -> None:
                stacked[i][:, column[0]].copy_(grad)
                fired[i] = True

            return hook

        handles = []
        for i, capture in enumerate(live):
            out = capture.output
            workspace = self._grad_buffers.setdefault(capture.name, _Workspace())
            stacked.append(workspace.get((m, k, *out.shape[1:]), out))
            handles.append(out.register_hook(make_hook(i)))
        # Backpropagate only as far as the first layers: every other layer lies between them and the logits.
        roots = [c.output for c in _first_layers(live)]
        try:
            for j in range(k):
                column[0] = j
                torch.autograd.grad(
                    logits, roots, grad_outputs=columns[:, j], retain_graph=j < k - 1, allow_unused=True
                )
        finally:
            for handle in handles:
                handle.remove()
        del logits, roots
        for i, capture in enumerate(live):
            capture.output = None
            if fired[i]:  # otherwise the layer does not influence the logits
                for pname, value in rules(capture.module, capture.input, stacked[i]).items():
                    qual = f"{capture.name}.{pname}" if capture.name else pname
                    sums[qual] += value.to(sums[qual].dtype)
            capture.input = None


def _first_layers(captures: list[_Capture]) -> list[_Capture]:
    """The captures whose input does not depend on any other capture's output (found by walking the autograd graph)."""
    targets = {c.output.grad_fn for c in captures}
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


class ExactDiagonal(SquaredGradientEstimator):
    """The exact GGN diagonal, which is the Hessian diagonal for piecewise-linear networks (see :func:`check_exact`).

    The per-sample cross-entropy Hessian w.r.t. the logits, ``diag(p) - p pᵀ``, has rank ``C - 1``; it is factored
    with ``C - 1`` columns (a Householder reflection that maps ``√p`` to a basis vector) which are backpropagated, so
    the cost is about ``C - 1`` backward passes to the layer outputs plus ``C - 1`` per-sample weight gradients.

    Args:
        strict: ``True``: refuse models for which ``diag(GGN) != diag(H)`` (:func:`check_exact` raises). ``False``:
            warn and compute the GGN diagonal anyway.
        max_memory_mb: See :class:`SquaredGradientEstimator`.
    """

    name = "exact"
    target = "ggn"
    deterministic = True

    def __init__(self, *, strict: bool = True, max_memory_mb: float = 1024.0) -> None:
        super().__init__(max_memory_mb=max_memory_mb)
        self.strict = bool(strict)
        self._warned = False

    def options(self) -> dict[str, Any]:
        return {"strict": self.strict, **super().options()}

    def exact_for_model(self, model: nn.Module) -> bool:
        return not find_inexact_modules(model)

    def _check_model(self, model: nn.Module) -> None:
        if self.strict:
            check_exact(model, strict=True)
        elif not self._warned and find_inexact_modules(model):
            self._warned = True
            check_exact(model, strict=False)

    def _num_columns(self, num_classes: int) -> int:
        return num_classes - 1

    def _columns(self, logits: Tensor, targets: Tensor, draws: Tensor | None) -> Tensor:
        return exact_factor(logits)


def exact_factor(logits: Tensor) -> Tensor:
    """Columns ``S`` (m, C-1, C) with ``Σ_j s_j s_jᵀ = diag(p) - p pᵀ``, ``p = softmax(logits)``, in float64.

    ``diag(p) - p pᵀ = D (I - q qᵀ) D`` with ``q = √p``, ``D = diag(q)``. The Householder reflection
    ``H = I - 2 u uᵀ / uᵀu`` with ``u = q + e_k`` (``k`` = most likely class, so ``uᵀu ≥ 2``) maps ``q`` to ``-e_k``;
    hence ``I - q qᵀ = Σ_{j≠k} (H e_j)(H e_j)ᵀ`` and ``s_j = q ⊙ H e_j`` for ``j ≠ k``.

    Args:
        logits: (m, C) logits.
    """
    p = logits.detach().double().softmax(-1)
    m, c = p.shape
    q = p.sqrt()
    top = p.argmax(-1)
    rows = torch.arange(m, device=p.device)
    u = q.clone()
    u[rows, top] += 1.0
    scale = 1.0 / (1.0 + q[rows, top])  # 2 / uᵀu
    eye = torch.eye(c, dtype=p.dtype, device=p.device)
    householder = eye - scale[:, None, None] * u[:, :, None] * u[:, None, :]  # symmetric: columns = rows
    vectors = q[:, None, :] * householder  # row j = q ⊙ H e_j
    keep = torch.arange(c - 1, device=p.device)[None, :]
    keep = keep + (keep >= top[:, None]).long()  # (m, C-1): every j except top
    return vectors.gather(1, keep[:, :, None].expand(m, c - 1, c))


class MonteCarloGGN(SquaredGradientEstimator):
    """Monte-Carlo GGN diagonal: squared per-sample gradients at labels sampled from the model's own predictions.

    For each input, ``num_draws`` labels ``ŷ ~ softmax(logits)`` are drawn and ``(Jᵀ(p - e_ŷ))² / num_draws`` is added.
    Since ``E[(p - e_ŷ)(p - e_ŷ)ᵀ] = diag(p) - p pᵀ``, this is an unbiased, non-negative estimate of the GGN diagonal
    at about the cost of one backward pass per draw.

    Args:
        num_draws: Labels drawn per input (``k``).
        max_memory_mb: See :class:`SquaredGradientEstimator`.
    """

    name = "mc"
    target = "ggn"
    deterministic = False

    def __init__(self, *, num_draws: int = 1, max_memory_mb: float = 1024.0) -> None:
        super().__init__(max_memory_mb=max_memory_mb)
        if int(num_draws) < 1:
            raise ValueError(f"`num_draws` must be >= 1, got {num_draws}.")
        self.num_draws = int(num_draws)

    def options(self) -> dict[str, Any]:
        return {"num_draws": self.num_draws, **super().options()}

    def _num_columns(self, num_classes: int) -> int:
        return self.num_draws

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor | None:
        return torch.rand(n, self.num_draws, generator=generator, dtype=torch.float64)

    def _columns(self, logits: Tensor, targets: Tensor, draws: Tensor | None) -> Tensor:
        p = logits.double().softmax(-1)
        cdf = p.cumsum(-1)
        labels = torch.searchsorted(cdf, draws.to(p.device).contiguous()).clamp_(max=p.shape[-1] - 1)  # (m, k)
        columns = p[:, None, :].repeat(1, self.num_draws, 1)
        columns.scatter_add_(2, labels[:, :, None], torch.full_like(labels[:, :, None], -1.0, dtype=p.dtype))
        return columns / math.sqrt(self.num_draws)


class EmpiricalFisher(SquaredGradientEstimator):
    """Empirical Fisher diagonal: squared per-sample gradients of the cross-entropy at the true labels.

    Args:
        max_memory_mb: See :class:`SquaredGradientEstimator`.
    """

    name = "fisher"
    target = "empirical_fisher"
    deterministic = True

    def _num_columns(self, num_classes: int) -> int:
        return 1

    def _columns(self, logits: Tensor, targets: Tensor, draws: Tensor | None) -> Tensor:
        if targets.dtype.is_floating_point or targets.dim() != 1:
            raise ValueError("the 'fisher' estimator needs integer class targets of shape (batch,)")
        p = logits.double().softmax(-1)
        return (p - F.one_hot(targets.to(p.device).long(), p.shape[-1]).to(p.dtype))[:, None, :]


class HutchinsonDiagonal(CurvatureEstimator):
    """Hutchinson's estimator of the true Hessian diagonal, ``E[v ⊙ Hv]`` with Rademacher ``v``.

    Works for any twice-differentiable network and any loss. Per batch, ``num_probes`` fresh probes are drawn; the
    Hessian-vector product is a double backward pass through the batch's mean loss, and the batch's estimate is
    weighted by its number of samples, so that the final estimate is that of the mean-loss Hessian diagonal. The
    variance of one probe's estimate of ``H_ii`` is ``Σ_{j≠i} H_ij²``.

    Args:
        num_probes: Rademacher probes per batch.
        loss_fn: ``loss_fn(logits, targets)`` with mean reduction (default: cross-entropy).
    """

    name = "hutchinson"
    target = "hessian"
    deterministic = False

    def __init__(self, *, num_probes: int = 1, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        if int(num_probes) < 1:
            raise ValueError(f"`num_probes` must be >= 1, got {num_probes}.")
        self.num_probes = int(num_probes)
        self.loss_fn = F.cross_entropy if loss_fn is None else loss_fn

    def options(self) -> dict[str, Any]:
        loss = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        return {"num_probes": self.num_probes, "loss_fn": loss}

    def accumulate(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        sums: dict[str, Tensor],
        *,
        generator: torch.Generator | None = None,
    ) -> int:
        init_sums(model, sums)
        n = int(inputs.shape[0])
        if n == 0:
            return 0
        if generator is None:
            generator = make_generator(0)
        params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
        names = list(params)
        leaves = [params[name] for name in names]
        loss = self.loss_fn(functional_call(model, params, (inputs,)), targets)
        if loss.dim() != 0:
            raise ValueError("`loss_fn` must return a scalar (mean reduction)")
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:
            return n
        weight = n / self.num_probes
        for probe in range(self.num_probes):
            probes = [
                torch.randint(0, 2, leaves[i].shape, generator=generator, dtype=torch.int8)
                .to(device=leaves[i].device, dtype=leaves[i].dtype)
                .mul_(2)
                .sub_(1)
                for i in live
            ]
            hvps = torch.autograd.grad(
                [grads[i] for i in live],
                [leaves[i] for i in live],
                grad_outputs=probes,
                retain_graph=probe < self.num_probes - 1,
                allow_unused=True,
            )
            for i, v, hv in zip(live, probes, hvps):
                if hv is not None:
                    sums[names[i]] += (v * hv).to(sums[names[i]].dtype) * weight
        return n


#: Estimator classes by registry name.
ESTIMATORS: dict[str, type[CurvatureEstimator]] = {
    "exact": ExactDiagonal,
    "mc": MonteCarloGGN,
    "hutchinson": HutchinsonDiagonal,
    "fisher": EmpiricalFisher,
}


def get_estimator(name: str | CurvatureEstimator, **kwargs: Any) -> CurvatureEstimator:
    """Build an estimator from its registry name (``exact``, ``mc``, ``hutchinson``, ``fisher``).

    Args:
        name: Registry name, or an estimator instance (returned as is; no keyword arguments allowed then).
        **kwargs: Options of the estimator class (e.g. ``strict``, ``num_draws``, ``num_probes``, ``loss_fn``).

    Raises:
        ValueError: For an unknown name (listing the allowed values) or options given with an instance.
    """
    if isinstance(name, CurvatureEstimator):
        if kwargs:
            raise ValueError("options cannot be given together with an estimator instance")
        return name
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {sorted(ESTIMATORS)}, got {name!r}.")
    return ESTIMATORS[name](**kwargs)
