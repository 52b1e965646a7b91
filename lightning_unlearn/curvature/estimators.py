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
products for convolutions, normalised inputs for BatchNorm). A first convolution followed only by a ReLU and a
max-pooling takes its products at the pooled positions instead, from the pooling output's gradient, so that the
backward passes stop there (see :func:`_link_pools`). To bound memory, the backward passes run in segments
separated by tensors that all gradients flow through (block inputs), and batches are split into chunks of samples
that fit a memory budget, by default one training step's (see :class:`SquaredGradientEstimator`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
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

    _NOT_IN_FORWARD: tuple[type, ...] = (Metric, MetricCollection)
except ImportError:  # pragma: no cover - torchmetrics is a dependency
    _NOT_IN_FORWARD = ()
# Containers compute nothing themselves (their children are checked one by one), even when empty.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
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
        elif is_leaf and not isinstance(module, (*PIECEWISE_LINEAR_MODULES, *_CONTAINERS)):
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
    """What the forward pass records of one layer.

    The output tensor itself is dropped after the forward pass (``output``), so that outputs the graph does not save
    are freed; its gradient reaches ``sink`` through a hook registered during the forward pass, and backward passes
    stop at it through its gradient edge (``output_edge``).
    """

    name: str
    module: nn.Module
    calls: int = 0
    input: Tensor | None = None
    output: Tensor | None = None
    version: int = 0
    input_fn: Any = None
    input_tensor: Tensor | None = None
    input_version: int = 0
    output_fn: Any = None
    output_shape: torch.Size | None = None
    output_edge: Any = None
    sink: Callable[[Tensor], None] | None = None
    pool: _PoolLink | None = None

    def receive(self, grad: Tensor) -> None:
        if self.sink is not None:
            self.sink(grad)


@dataclass
class _PoolLink:
    """A convolution whose output only flows through a ReLU and then a max-pooling (found by :func:`_link_pools`).

    The gradient of the convolution output is then zero except at the positions the pooling picked, where it is the
    pooled output's gradient masked by the ReLU. The layer's per-sample gradients are computed from the (smaller)
    gradient at the pooling output, which autograd hands over at ``edge``, and the saved pooling indices and ReLU
    output.

    Attributes:
        edge: Gradient edge of the pooling output.
        indices: (m, Cout, *pooled) positions in the flattened spatial grid of the convolution output.
        relu_output: The ReLU's output (the pooling input), same shape as the convolution output.
    """

    edge: Any
    indices: Tensor
    relu_output: Tensor


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


def _unfold(
    x: Tensor, conv: nn.modules.conv._ConvNd, workspace: _Workspace | None = None, out: Tensor | None = None
) -> Tensor:
    """Patches of ``x`` (m, Cin, *spatial) as (m, Cin·prod(kernel), L), ordered like ``weight.flatten(1)``.

    Args:
        x: Layer input.
        conv: The convolution (kernel size, stride, dilation, padding and padding mode are honoured).
        workspace: Optional scratch buffer to write the patches into.
        out: Optional contiguous tensor of the result's size to write the patches into (takes precedence).
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
    if out is None and workspace is None:
        return x.reshape(m, cin * math.prod(conv.kernel_size), -1)
    target = out.view(tuple(x.shape)) if out is not None else workspace.get(tuple(x.shape), x)
    target.copy_(x)
    return target.view(m, cin * math.prod(conv.kernel_size), -1)


def _add_row_squares(acc: Tensor, rows: Tensor) -> None:
    """``acc += Σ_r rows[r]²`` for ``rows`` (R, P); ``rows`` is scratch and may be overwritten."""
    if rows.shape[1] >= 16384:
        for row in rows:  # memory-bound: one pass per row, no temporary
            acc.addcmul_(row, row)
    else:
        squares = rows.square_()
        acc.addmv_(squares.t(), torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device))


class _Buffers:
    """Scratch memory reused across layers, segments and batches (fresh large allocations cost page faults).

    Two kinds: named workspaces for short-lived temporaries (``product``, ``patches``, the boundary gradients), and an
    arena from which the layer states of one backward segment take their buffers; the arena is rewound when the next
    segment starts, so the states of consecutive segments share the same memory.

    Args:
        chunk_elements: Target size of the temporaries of one product (per-sample gradients of a chunk of samples).
    """

    def __init__(self, chunk_elements: int) -> None:
        self.chunk_elements = max(1 << 12, int(chunk_elements))
        self._spaces: dict[str, _Workspace] = {}
        self._arena: Tensor | None = None
        self._used = 0

    def space(self, key: str) -> _Workspace:
        return self._spaces.setdefault(key, _Workspace())

    def get(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return self.space(key).get(shape, like)

    def rewind(self) -> None:
        """Start a new segment: the arena's memory is handed out again from its beginning."""
        self._used = 0

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer from the arena that stays valid until the next :meth:`rewind` (contents undefined)."""
        numel = math.prod(shape)
        arena = self._arena
        if (
            arena is None
            or arena.dtype != like.dtype
            or arena.device != like.device
            or self._used + numel > arena.numel()
        ):
            return torch.empty(shape, dtype=like.dtype, device=like.device)  # not reserved: a fresh buffer
        out = arena[self._used : self._used + numel].view(shape)
        self._used += numel
        return out

    def reserve(self, numel: int, like: Tensor) -> None:
        """Make the arena hold at least ``numel`` elements of ``like``'s dtype and device (call before taking)."""
        arena = self._arena
        if arena is None or arena.dtype != like.dtype or arena.device != like.device or arena.numel() < numel:
            self._arena = None
            self._arena = torch.empty(max(1, int(numel)), dtype=like.dtype, device=like.device)
        self.rewind()


#: What one pass over memory costs in multiply-adds, for :func:`_conv_mode`. 16 on a 2-core x86 CPU: with 4, the
#: direct products were chosen for ResNet-18's 2×2 maps (ImageNet stem, 32×32 images) with one column (``mc``,
#: ``fisher``), where they are memory-bound; the Gram form made ``mc`` 111 -> 93 ms there. No other choice changes
#: on the MNIST CNN or either ResNet-18 stem.
_MEMORY_PASS = 16


def _conv_mode(k: int, cout: int, length: int, fan_in: int, groups: int) -> str:
    """How a convolution's squared per-sample gradients are summed (see :class:`_ConvState`)."""
    if groups == 1:
        # Multiply-adds per sample, a pass over memory counted as _MEMORY_PASS of them: the direct products (which
        # write and square K·Cout·fan_in values per sample) vs the Gram form. With one output position (L = 1) the
        # Gram form is the rank-one rule of Linear layers, (Σ_c g_c²)(u²)ᵀ, one matrix product.
        pairs = length * (length + 1) // 2
        direct = k * cout * fan_in * (length + _MEMORY_PASS)
        gram = cout * fan_in * pairs + cout * length * length * k + _MEMORY_PASS * pairs * fan_in
        if gram < direct:
            return "gram"
    # Stacking the columns first gives one product per sample with K times more rows (faster than K products, and the
    # patches are read once, after the backward passes) at the cost of a copy of the output gradients, which only
    # matters when the products themselves are cheap (small fan-in).
    if k == 1 or fan_in < 64:
        return "stream"
    return "stack"


class _LayerState:
    """Accumulates one layer's sums of squared per-sample gradients while columns are backpropagated.

    ``consume(j, grad)`` is called (from a tensor hook) with the gradient of the layer output for column ``j`` (of the
    pooling output instead, for a convolution with a ``pool`` link);
    ``finish()`` returns the sums over samples and columns that still have to be added to the caller's accumulators,
    keyed by the parameter's local name. Accumulators in ``direct`` (the caller's own, when their dtype matches) are
    added to in place instead, which saves a parameter-sized temporary per layer.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        x: Tensor,
        out_shape: torch.Size,
        k: int,
        buffers: _Buffers,
        direct: dict[str, Tensor] | None = None,
        pool: _PoolLink | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.x = x
        self.m = x.shape[0]
        self.k = k
        self.buffers = buffers
        self.pool = pool
        self.sums: dict[str, Tensor] = {}
        self.direct = {
            pname: acc for pname, acc in (direct or {}).items() if acc.dtype == x.dtype and acc.is_contiguous()
        }
        self._setup(out_shape)

    def _setup(self, out_shape: torch.Size) -> None:
        """Subclass-specific preparation (buffers for the layer's output gradients)."""

    def _acc(self, pname: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if pname in self.direct:
            return self.direct[pname].view(shape)
        if pname not in self.sums:
            self.sums[pname] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.sums[pname]

    def consume(self, j: int, grad: Tensor) -> None:
        raise NotImplementedError

    def finish(self) -> dict[str, Tensor]:
        return self.sums


class _LinearState(_LayerState):
    """Linear layer.

    2-D input: per-sample gradients are rank one, ``Σ_c (g_c xᵀ)² = (Σ_c g_c²)(x²)ᵀ``. Inputs with extra dimensions
    (sequences): per-sample products ``g_cᵀ X`` over positions, squared.
    """

    def _setup(self, out_shape: torch.Size) -> None:
        x = self.x
        self.flat = x.dim() == 2
        if self.flat:
            self.g2 = self.buffers.take((self.m, out_shape[-1]), x).zero_()
        else:
            self.xt = x.reshape(self.m, -1, x.shape[-1])  # (m, T, in)

    def consume(self, j: int, grad: Tensor) -> None:
        module = self.module
        if self.flat:
            self.g2.addcmul_(grad, grad)
            return
        g = grad.reshape(self.m, -1, grad.shape[-1])  # (m, T, out)
        if module.bias is not None:
            self._acc("bias", (g.shape[-1],), g).add_(g.sum(1).square().sum(0))
        acc = self._acc("weight", (module.weight.numel(),), g)
        per_sample = module.weight.numel()
        step = max(1, min(self.m, self.buffers.chunk_elements // per_sample))
        for start in range(0, self.m, step):
            stop = min(self.m, start + step)
            prod = self.buffers.get("product", (stop - start, *module.weight.shape), g)
            torch.bmm(g[start:stop].transpose(1, 2), self.xt[start:stop], out=prod)
            _add_row_squares(acc, prod.view(stop - start, per_sample))

    def finish(self) -> dict[str, Tensor]:
        weight = self.module.weight
        if self.flat:
            self._acc("weight", tuple(weight.shape), self.x).addmm_(self.g2.t(), self.x.square())
            if self.module.bias is not None:
                self._acc("bias", (self.g2.shape[1],), self.x).add_(self.g2.sum(0))
        if "weight" in self.sums:
            self.sums["weight"] = self.sums["weight"].view(weight.shape)
        return self.sums


class _BatchNormState(_LayerState):
    """BatchNorm in eval mode: per-sample gradients ``Σ_spatial g·x̂`` (weight) and ``Σ_spatial g`` (bias)."""

    def _setup(self, out_shape: torch.Size) -> None:
        module, x, buffers = self.module, self.x, self.buffers
        self.ch = out_shape[1]
        if module.weight is not None:
            shape = (1, self.ch, 1)
            mean = module.running_mean.to(x.dtype).view(shape)
            inv_std = torch.rsqrt(module.running_var.to(x.dtype).view(shape) + module.eps)
            xhat = buffers.take((self.m, self.ch, x[0].numel() // self.ch), x)
            torch.mul(torch.sub(x.reshape(self.m, self.ch, -1), mean, out=xhat), inv_std, out=xhat)
            self.xhat = xhat

    def consume(self, j: int, grad: Tensor) -> None:
        g = grad.reshape(self.m, self.ch, -1)
        if self.module.weight is not None:
            scratch = self.buffers.get("product", tuple(self.xhat.shape), g)
            per_sample = torch.mul(g, self.xhat, out=scratch).sum(-1)
            self._acc("weight", (self.ch,), g).add_(per_sample.square().sum(0))
        if self.module.bias is not None:
            self._acc("bias", (self.ch,), g).add_(g.sum(-1).square().sum(0))


class _ConvState(_LayerState):
    """Convolution: per-sample weight gradients ``g_c Uᵀ``, ``U`` = unfolded input patches (Cin·kernel × L).

    Three exact ways to sum their squares, chosen by cost (:func:`_conv_mode`):

    * ``stream``: per column, batched products of every sample's ``g_c`` (Cout × L) with its ``Uᵀ``;
    * ``stack``: the columns are gathered first, then one product per sample with all ``K·Cout`` rows at once;
    * ``gram``: for few output positions ``L``, ``Σ_c (g_c Uᵀ)² = Σ_{l≤l'} w_{ll'} (Σ_c g_{c,l} g_{c,l'}) (u_l u_l')``;
      the ``Σ_c g g`` part is accumulated per column, and a single matrix product contracts samples and position
      pairs at the end.

    A fourth, ``pooled``, is used for a first convolution whose output only flows through a ReLU and a max-pooling
    (``pool`` link, see :func:`_link_pools`): the output gradient is then zero except at the positions the pooling
    picked, so each output channel's per-sample gradient is a product over the pooled positions only,
    ``Σ_p g_{c,o,p} u_{i(o,p)}``, with the patches gathered at the picked positions ``i(o,p)`` (a quarter of them for
    2×2 pooling), and the backward passes stop at the pooling output instead of going through the ReLU and pooling.
    """

    def _setup(self, out_shape: torch.Size) -> None:
        module, x, k, buffers = self.module, self.x, self.k, self.buffers
        self.cout = out_shape[1]
        self.length = math.prod(out_shape[2:])
        self.groups = module.groups
        self.fan_in = module.weight[0].numel()
        self.weight_acc = self._acc("weight", (self.cout * self.fan_in,), x)
        if self.pool is not None:
            self.mode = "pooled"
            index = self.pool.indices.reshape(self.m, self.cout, -1)  # (m, Cout, P)
            self.index = index
            picked = self.pool.relu_output.reshape(self.m, self.cout, -1).gather(2, index)
            self.mask = buffers.take(tuple(index.shape), x)
            self.mask.copy_(picked > 0)  # the ReLU's backward rule: pass where its output is positive
            self.stacked = buffers.take((self.m, self.cout, k, index.shape[2]), x)
            return
        self.mode = _conv_mode(k, self.cout, self.length, self.fan_in, self.groups)
        if self.mode == "gram":
            self.gram = buffers.take((self.m * self.cout, self.length, self.length), x).zero_()
        elif self.mode == "stream":
            patches = _unfold(x, module, out=buffers.take((self.m, self.groups * self.fan_in, self.length), x))
            # (m·G, L, fan_in) view of the patches
            self.patches = patches.view(self.m * self.groups, self.fan_in, self.length).transpose(1, 2)
        else:
            self.stacked = buffers.take((self.m, k, self.cout, self.length), x)

    def consume(self, j: int, grad: Tensor) -> None:
        m, cout, length = self.m, self.cout, self.length
        if self.mode == "pooled":
            column = self.stacked[:, :, j]
            torch.mul(grad.reshape(self.mask.shape), self.mask, out=column)
            if self.module.bias is not None:
                self._acc("bias", (cout,), column).add_(column.sum(2).square().sum(0))
            return
        g = grad.reshape(m, cout, length)
        if self.module.bias is not None:
            self._acc("bias", (cout,), g).add_(g.sum(2).square().sum(0))
        if self.mode == "gram":
            flat = g.reshape(m * cout, length)
            self.gram.addcmul_(flat[:, :, None], flat[:, None, :])
        elif self.mode == "stack":
            self.stacked[:, j].copy_(g)
        else:
            groups, cout_g, fan_in = self.groups, cout // self.groups, self.fan_in
            per_sample = cout * fan_in
            step = max(1, min(m, self.buffers.chunk_elements // per_sample))
            for start in range(0, m, step):
                stop = min(m, start + step)
                s = stop - start
                a = g[start:stop].reshape(s * groups, cout_g, length)
                prod = self.buffers.get("product", (s * groups, cout_g, fan_in), g)
                torch.bmm(a, self.patches[start * groups : stop * groups], out=prod)
                _add_row_squares(self.weight_acc, prod.view(s, per_sample))

    def finish(self) -> dict[str, Tensor]:
        if self.mode == "gram":
            self._finish_gram()
        elif self.mode == "stack":
            self._finish_stack()
        elif self.mode == "pooled":
            self._finish_pooled()
        if "weight" in self.sums:
            self.sums["weight"] = self.weight_acc.view(self.module.weight.shape)
        return self.sums

    def _finish_stack(self) -> None:
        m, k, cout, length, fan_in, groups = self.m, self.k, self.cout, self.length, self.fan_in, self.groups
        cout_g = cout // groups
        per_class = cout * fan_in  # one per-sample weight gradient
        chunk = self.buffers.chunk_elements
        if per_class * k <= chunk:
            class_step, sample_step = k, max(1, min(m, chunk // (per_class * k), chunk // (groups * fan_in * length)))
        else:
            class_step, sample_step = max(1, chunk // per_class), 1
        for start in range(0, m, sample_step):
            stop = min(m, start + sample_step)
            s = stop - start
            u = _unfold(self.x[start:stop], self.module, self.buffers.space("patches"))
            b = u.view(s * groups, fan_in, length).transpose(1, 2)  # (s·G, L, fan_in)
            for c0 in range(0, k, class_step):
                c1 = min(k, c0 + class_step)
                kc = c1 - c0
                a = self.stacked[start:stop, c0:c1]  # (s, kc, Cout, L)
                if groups > 1:
                    a = a.reshape(s, kc, groups, cout_g, length).transpose(1, 2)
                a = a.reshape(s * groups, kc * cout_g, length)
                prod = self.buffers.get("product", (s * groups, kc * cout_g, fan_in), a)
                torch.bmm(a, b, out=prod)
                if groups == 1:
                    _add_row_squares(self.weight_acc, prod.view(s * kc, per_class))
                else:
                    self.weight_acc += prod.square_().view(s, groups, kc, cout_g * fan_in).sum((0, 2)).view(-1)

    def _finish_pooled(self) -> None:
        m, k, cout, length, fan_in = self.m, self.k, self.cout, self.length, self.fan_in
        picked = self.index.shape[2]
        per_sample = max(length * fan_in, cout * fan_in * picked, cout * k * fan_in)
        step = max(1, min(m, self.buffers.chunk_elements // per_sample))
        acc = self.weight_acc.view(cout, fan_in)
        for start in range(0, m, step):
            stop = min(m, start + step)
            s = stop - start
            u = _unfold(self.x[start:stop], self.module, self.buffers.space("patches"))  # (s, fan_in, L)
            # the patches at the picked positions, per output channel: (s, Cout, fan_in, P)
            gathered = self.buffers.get("gathered", (s, cout, fan_in, picked), u)
            where = self.index[start:stop, :, None, :].expand(s, cout, fan_in, picked)
            torch.gather(u[:, None].expand(s, cout, fan_in, length), 3, where, out=gathered)
            prod = self.buffers.get("product", (s * cout, k, fan_in), u)
            columns = self.stacked[start:stop].view(s * cout, k, picked)
            torch.bmm(columns, gathered.view(s * cout, fan_in, picked).transpose(1, 2), out=prod)
            acc += prod.square_().view(s, cout, k, fan_in).sum(2).sum(0)

    def _finish_gram(self) -> None:
        m, cout, length, fan_in = self.m, self.cout, self.length, self.fan_in
        rows, cols = torch.triu_indices(length, length, device=self.x.device)
        pairs = rows.numel()
        flat = rows * length + cols
        twice = torch.where(rows == cols, 1.0, 2.0).to(self.x.dtype)
        gram = self.gram.view(m, cout, length * length)
        chunk = self.buffers.chunk_elements
        step = max(1, min(m, chunk // (pairs * fan_in), chunk // (2 * fan_in * length), chunk // (2 * cout * pairs)))
        acc = self.weight_acc.view(cout, fan_in)
        for start in range(0, m, step):
            stop = min(m, start + step)
            s = stop - start
            u = _unfold(self.x[start:stop], self.module, self.buffers.space("patches"))
            ut = u.transpose(1, 2).contiguous()  # (s, L, fan_in)
            b = self.buffers.get("product", (s, pairs, fan_in), ut)
            offset = 0
            for row in range(length):  # b[:, (row, col)] = u_row * u_col for col >= row
                width = length - row
                torch.mul(ut[:, row : row + 1], ut[:, row:], out=b[:, offset : offset + width])
                offset += width
            a = (gram[start:stop][:, :, flat] * twice).transpose(0, 1).reshape(cout, s * pairs)
            acc.addmm_(a, b.view(s * pairs, fan_in))


def _state_type(module: nn.Module) -> type[_LayerState]:
    if isinstance(module, nn.Linear):
        return _LinearState
    return _ConvState if isinstance(module, _CONVS) else _BatchNormState


def _state_elements(capture: _Capture, k: int) -> int:
    """Elements per sample that a layer's state keeps during the backward passes (for chunking decisions)."""
    module, out_shape = capture.module, capture.output_shape
    out_numel = math.prod(out_shape[1:])
    if capture.pool is not None:  # mask and K columns at the pooled positions
        return (k + 1) * capture.pool.indices[0].numel()
    if isinstance(module, _CONVS):
        cout, length = out_shape[1], math.prod(out_shape[2:])
        fan_in = module.weight[0].numel()
        mode = _conv_mode(k, cout, length, fan_in, module.groups)
        if mode == "gram":
            return cout * length * length
        if mode == "stream":
            return module.groups * fan_in * length
        return k * out_numel
    if isinstance(module, _BATCHNORMS):
        return out_numel
    return out_shape[-1]


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
                    f"mode (profile_model/accumulate_diagonal do this) before the '{estimator}' estimator runs."
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


@dataclass
class _Plan:
    """How :class:`SquaredGradientEstimator` splits its work for one model and input shape (from a 1-sample pass).

    All sizes are per sample, in bytes.

    Attributes:
        num_classes: Number of logits.
        graph_bytes: Activations the autograd graph saves (what one training step keeps for its backward pass).
        graph_before: ``graph_before[i]``: the part of ``graph_bytes`` saved before the ``i``-th layer (in execution
            order) returned, ``i = 0..L``, the last entry being ``graph_bytes``; the part above a segment is freed once
            the segment's backward passes are done.
        peak_bytes: The estimator's own largest need at any time: the graph still alive, plus the layer states and
            the boundary gradients of the worst backward segment.
        element_size: Bytes per element of the layer outputs.
    """

    num_classes: int
    graph_bytes: int
    graph_before: list[int]
    peak_bytes: int
    element_size: int


@dataclass
class _Segment:
    """Consecutive layers (in execution order) whose columns are backpropagated together.

    ``bottom`` is the first layer of the segment; its input tensor is the boundary with the segment below (``cut``
    true: every path from the layers below to the logits goes through it) or the segment is the lowest one.
    """

    layers: list[_Capture]
    cut: bool


def _single_output(node: Any) -> bool:
    metadata = getattr(node, "_input_metadata", None)
    return metadata is not None and len(metadata) == 1


def _separates(root: Any, block: Any, below: set[Any]) -> bool:
    """Whether every path in the autograd graph from ``root`` to a node of ``below`` passes through ``block``."""
    seen = {block}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in below:
            return False
        seen.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    return True


def _cut_positions(live: list[_Capture], logits: Tensor) -> list[int]:
    """Indices ``i`` into ``live`` (execution order) whose layer input separates layers ``< i`` from the logits.

    A valid cut is a tensor, input of layer ``i``, through which all the gradient flows that reaches layers
    ``0..i-1``: backpropagating the columns down to it, then from it further down, gives the same layer-output
    gradients as one backward pass (tensors rewritten in place afterwards, or made by multi-output operations, are
    never cuts).
    """
    outputs = {c.output_fn for c in live}
    cuts: list[int] = []
    seen: set[Any] = set()
    for i, capture in enumerate(live):
        tensor = capture.input_tensor
        if i == 0 or tensor is None:
            continue
        node = tensor.grad_fn
        if node is None or node in seen or node is not capture.input_fn or tensor._version != capture.input_version:
            continue
        seen.add(node)
        if node in outputs or not _single_output(node):
            continue
        if _separates(logits.grad_fn, node, {c.output_fn for c in live[:i]}):
            cuts.append(i)
    return cuts


#: Whether convolutions followed by a ReLU and a max-pooling use the pooled products (tests switch it off).
_POOLING_ENABLED = True
_INDEX_NAMES = ("_saved_result1", "_saved_indices")  # where autograd keeps max-pooling indices (torch versions)


def _consumers(root: Any) -> dict[Any, list[Any]]:
    """For every node of the autograd graph below ``root``: the nodes that take one of its outputs (with repeats)."""
    users: dict[Any, list[Any]] = {}
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        for fn, _ in node.next_functions:
            if fn is None:
                continue
            users.setdefault(fn, []).append(node)
            if fn not in seen:
                seen.add(fn)
                stack.append(fn)
    return users


def _link_pools(live: list[_Capture], logits: Tensor) -> None:
    """Set ``pool`` on every first 2-d convolution whose output flows only through a ReLU, then only a max-pooling.

    Only first layers (nothing with parameters below them) are linked: for them the backward passes then stop at
    the pooling output, and the products shrink with the pooling. Layers in the middle need their dense output
    gradient anyway to pass it further down, and there the gathered patches cost more than the smaller products
    save (measured on the MNIST CNN's second convolution). The chain is checked on the autograd graph, so it holds
    however ``forward`` is written (modules or functional calls): the convolution output (or the copy handed on in
    its place) has exactly one user, a ReLU, whose output has exactly one user, a max-pooling with indices. Anything
    else (a skip connection, another activation, a BatchNorm in between) keeps the layer on the general path.
    """
    for capture in live:
        capture.pool = None
    if not _POOLING_ENABLED:
        return
    candidates = [c for c in _first_layers(live) if type(c.module) is nn.Conv2d and c.module.groups == 1]
    if not candidates or logits.grad_fn is None:
        return
    users = _consumers(logits.grad_fn)

    def only_user(node: Any) -> Any:
        found = users.get(node, [])
        return found[0] if len(found) == 1 else None

    for capture in candidates:
        relu = only_user(capture.output_fn)
        if relu is not None and type(relu).__name__ == "CloneBackward0":  # the copy made for an in-place ReLU
            relu = only_user(relu)
        if relu is None or type(relu).__name__ != "ReluBackward0":
            continue
        pool = only_user(relu)
        if pool is None or type(pool).__name__ != "MaxPool2DWithIndicesBackward0":
            continue
        indices = next((getattr(pool, name) for name in _INDEX_NAMES if hasattr(pool, name)), None)
        if indices is None:  # pragma: no cover - another torch version's naming
            continue
        capture.pool = _PoolLink(GradientEdge(pool, 0), indices, relu._saved_result)


def _choose_segments(
    states: list[int], boundaries: dict[int, int], k: int, element_size: int, graph_before: list[int]
) -> tuple[list[tuple[int, int]], int]:
    """Split layers ``0..L-1`` at some of the allowed cut indices so that the largest segment need is smallest.

    The need of segment ``[a, b)`` is the graph still alive (``graph_before[b]``: what layers ``0..b-1`` and the
    operations up to layer ``b`` saved; all of it for the top segment), the states of its layers and the ``k``
    gradients of its lower and upper boundary tensors. Ties go to fewer segments (fewer, larger backward calls).

    Args:
        states: Elements per sample of every layer's state.
        boundaries: Cut index -> elements per sample of its tensor.
        k: Columns per sample.
        element_size: Bytes per element.
        graph_before: See :class:`_Plan`.

    Returns:
        The segments as ``(a, b)`` index ranges from the top (logits) down, and the largest need in bytes per sample.
    """
    count = len(states)
    prefix = [0]
    for value in states:
        prefix.append(prefix[-1] + value)
    points = [0, *sorted(boundaries), count]
    size = {0: 0, count: 0, **boundaries}

    def need(a: int, b: int) -> int:
        return graph_before[b] + element_size * (prefix[b] - prefix[a] + k * (size[a] + size[b]))

    best: dict[int, tuple[int, int, int]] = {0: (0, 0, -1)}  # point -> (largest need, segments, previous point)
    for b in points[1:]:
        options = [(max(best[a][0], need(a, b)), best[a][1] + 1, a) for a in points if a < b and a in best]
        best[b] = min(options)
    ranges = []
    b = count
    while b > 0:
        a = best[b][2]
        ranges.append((a, b))
        b = a
    return ranges, best[count][0]


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
    chunk's need fits the memory budget. None of this changes the results beyond floating-point rounding.

    Args:
        max_memory_mb: Memory budget in MiB for what one ``accumulate`` call keeps besides the model, its inputs and
            the accumulators: autograd graph, layer states, boundary gradients and product temporaries. ``None``
            (default): one training step's memory on the same batch, i.e. the activations autograd saves for the
            batch plus one gradient per parameter (measured once per model and input shape with a 1-sample forward
            pass), so that the estimator's peak stays near that of a training step. A bound, not an exact figure: a
            chunk holds at least one sample, and allocator overheads come on top.
    """

    def __init__(self, *, max_memory_mb: float | None = None) -> None:
        if max_memory_mb is not None and not max_memory_mb > 0:
            raise ValueError(f"`max_memory_mb` must be positive or None, got {max_memory_mb}.")
        self.max_memory_mb = None if max_memory_mb is None else float(max_memory_mb)
        self._plans: dict[tuple, _Plan] = {}
        self._buffers: _Buffers | None = None
        self._clone_layers: dict[int, set[str]] = {}
        self.last_chunk_size = 0  # samples per chunk of the last `accumulate` call (for inspection and tests)

    def release_buffers(self) -> None:
        """Free the scratch buffers kept between batches (they are reused to avoid re-allocating large arrays)."""
        self._plans.clear()
        self._buffers = None
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
    def _plan(self, model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor) -> _Plan:
        """Measure the graph and choose the segments with a 1-sample forward pass (cached per model and shape)."""
        key = (id(model), tuple(name for name, _ in layers), tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
        if key in self._plans:
            return self._plans[key]
        held = {p.untyped_storage().data_ptr() for p in model.parameters()}
        held |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        saved: dict[tuple[int, int], int] = {}  # (address, bytes) -> layers called before it was saved
        order: list[_Capture] = []

        def pack(tensor: Tensor) -> Tensor:
            if tensor.layout == torch.strided and tensor.untyped_storage().data_ptr() not in held:
                saved.setdefault((tensor.data_ptr(), tensor.numel() * tensor.element_size()), len(order))
            return tensor

        with torch.enable_grad():
            self._capture_forward(model, layers, inputs[:1], [])  # learns which outputs need copies
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                logits = self._forward(model, layers, inputs[:1], self._clone_layers[id(model)], order)
        num_classes = int(logits.shape[-1]) if isinstance(logits, Tensor) and logits.dim() == 2 else 0
        live = [c for c in order if c.output_fn is not None]
        per_layer = [0] * (len(live) + 1)
        for (_, nbytes), position in saved.items():
            per_layer[min(position, len(live))] += nbytes
        graph_before = list(itertools.accumulate(per_layer))
        element_size = live[-1].input.element_size() if live else inputs.element_size()
        peak = graph_before[-1]
        if live and num_classes >= 2:
            _, peak = self._segments(live, logits, self._num_columns(num_classes), element_size, graph_before)
        order.clear()
        del live, logits
        plan = _Plan(num_classes, graph_before[-1], graph_before, max(1, peak), element_size)
        self._plans[key] = plan
        return plan

    @staticmethod
    def _segments(
        live: list[_Capture], logits: Tensor, k: int, element_size: int, graph_before: list[int]
    ) -> tuple[list[_Segment], int]:
        """The backward segments (from the logits down) and their largest need in bytes per sample."""
        _link_pools(live, logits)
        cuts = _cut_positions(live, logits) if _SEGMENTS_ENABLED else []
        states = [_state_elements(c, k) for c in live]
        boundaries = {i: live[i].input_tensor[0].numel() for i in cuts}
        if len(graph_before) != len(live) + 1:  # another graph than the planned one: no graph term
            graph_before = [0] * (len(live) + 1)
        ranges, peak = _choose_segments(states, boundaries, k, element_size, graph_before)
        return [_Segment(live[a:b], a > 0) for a, b in ranges], peak

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
        plan = self._plan(model, layers, inputs)
        if plan.num_classes < 2:
            raise ValueError(
                f"the '{self.name}' estimator needs logits of shape (batch, classes) with at least 2 classes "
                "(cross-entropy); use estimator='hutchinson' with a custom loss_fn otherwise."
            )
        if self.max_memory_mb is not None:
            budget = self.max_memory_mb * 2**20
        else:  # one training step: the batch's saved activations and a gradient per parameter
            step_bytes = n * plan.graph_bytes + sum(p.numel() * p.element_size() for p in model.parameters())
            budget = max(step_bytes, _MIN_AUTO_BUDGET)
        # An eighth of the budget (at most 32 MiB) for the temporaries of the per-sample products, which come in up to
        # three pieces of `chunk_elements` (products, unfolded patches, copies); the rest for chunks of samples.
        workspace = min(budget / 8, 2**25)
        step = int(max(1, min(n, (budget - workspace) // plan.peak_bytes)))
        step = -(-n // -(-n // step))  # equal chunks
        self.last_chunk_size = step
        chunk_elements = max(1 << 12, int(workspace // (3 * plan.element_size)))
        if self._buffers is None or self._buffers.chunk_elements != chunk_elements:
            self._buffers = _Buffers(chunk_elements)
        draws = self._draw(n, generator)
        for start in range(0, n, step):
            stop = min(n, start + step)
            chunk_draws = None if draws is None else draws[start:stop]
            self._accumulate_chunk(model, layers, inputs[start:stop], targets[start:stop], chunk_draws, sums, plan)
        return n

    def _forward(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        inputs: Tensor,
        clone: set[str],
        order: list[_Capture],
    ) -> Tensor:
        """Forward pass appending every layer's capture (input and output) to ``order`` as the layer runs.

        Outputs of the layers named in ``clone`` are handed on as copies. Returns the logits.
        """
        captures = [_Capture(name, module) for name, module in layers]

        def make_hook(capture: _Capture) -> Callable:
            def hook(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
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
                if args[0].requires_grad:
                    capture.input_tensor = args[0]
                    capture.input_version = args[0]._version
                capture.output = output
                capture.version = output._version
                capture.output_shape = output.shape
                if output.requires_grad:
                    capture.output_fn = output.grad_fn
                    capture.output_edge = get_gradient_edge(output)
                    output.register_hook(capture.receive)
                order.append(capture)
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
        return logits

    def _capture_forward(
        self, model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: Tensor, order: list[_Capture]
    ) -> tuple[list[_Capture], Tensor]:
        """:meth:`_forward`, run again with copies where an in-place operation rewrote a needed layer output."""
        clone = self._clone_layers.setdefault(id(model), set())
        logits = self._forward(model, layers, inputs, clone, order)
        modified = {c.name for c in order if c.output is not None and c.output._version != c.version}
        if modified:
            # A downstream in-place operation (``ReLU(inplace=True)``, ``out += identity``) rewrote a layer output
            # whose gradient we need: run again, handing the rest of the network a copy of those outputs.
            clone |= modified
            order.clear()
            del logits
            logits = self._forward(model, layers, inputs, clone, order)
        for capture in order:
            capture.output = None
        return order, logits

    def _accumulate_chunk(
        self,
        model: nn.Module,
        layers: list[tuple[str, nn.Module]],
        inputs: Tensor,
        targets: Tensor,
        draws: Tensor | None,
        sums: dict[str, Tensor],
        plan: _Plan,
    ) -> None:
        order, logits = self._capture_forward(model, layers, inputs, [])
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            raise ValueError(f"the '{self.name}' estimator needs logits of shape (batch, classes)")
        columns = self._columns(logits.detach(), targets, draws).to(logits.dtype)  # (m, K, C)
        k = columns.shape[1]
        live = [c for c in order if c.output_fn is not None]
        del order
        if not live:  # no layer with parameters took part in this forward pass
            return
        buffers = self._buffers
        assert buffers is not None
        segments, _ = self._segments(live, logits, k, plan.element_size, plan.graph_before)
        m = int(inputs.shape[0])
        arena = max(sum(_state_elements(c, k) for c in s.layers) for s in segments)
        buffers.reserve(m * arena, live[-1].input)
        source: Tensor = logits
        grads_in = columns
        for index, segment in enumerate(segments):
            bottom = segment.layers[0].input_tensor if segment.cut else None
            grads_out = None
            if bottom is not None:
                grads_out = buffers.get(f"boundary{index % 2}", (m, k, *bottom.shape[1:]), bottom)
            self._backward_segment(segment.layers, source, bottom, grads_in, grads_out, sums)
            for capture in segment.layers:
                capture.input = capture.input_tensor = capture.sink = capture.pool = None
            if bottom is None:
                break
            source, grads_in = bottom, grads_out
            del bottom
            buffers.rewind()

    def _backward_segment(
        self,
        captures: list[_Capture],
        source: Tensor,
        bottom: Tensor | None,
        grads_in: Tensor,
        grads_out: Tensor | None,
        sums: dict[str, Tensor],
    ) -> None:
        """Backpropagate the ``K`` columns ``grads_in`` from ``source`` through one segment.

        The layer states of ``captures`` consume their output gradients and add their sums into ``sums``; the gradients
        reaching ``bottom`` (the boundary with the segment below) are written into ``grads_out`` (m, K, ...).
        """
        buffers = self._buffers
        assert buffers is not None
        k = grads_in.shape[1]
        states: list[_LayerState | None] = []
        for c in captures:
            prefix = f"{c.name}." if c.name else ""
            direct = {pname: sums[prefix + pname] for pname, _ in c.module.named_parameters(recurse=False)}
            states.append(_state_type(c.module)(c.name, c.module, c.input, c.output_shape, k, buffers, direct, c.pool))
        # The output hooks (registered during the forward pass) hand every layer-output gradient to its layer's state as
        # soon as the backward pass has computed it; nothing is kept, so it is freed right away.
        fired = [False] * len(captures)
        column = [0]

        def make_sink(i: int) -> Callable[[Tensor], None]:
            def sink(grad: Tensor) -> None:
                states[i].consume(column[0], grad)
                fired[i] = True

            return sink

        for i, capture in enumerate(captures):
            capture.sink = None if capture.pool is not None else make_sink(i)
        # Backpropagate only as far as the boundary and the first layers: every other layer lies between them. Layers
        # with a pooling link take the gradient of their pooling output instead, returned as an extra target.
        pooled = [i for i, c in enumerate(captures) if c.pool is not None]
        targets = ([] if bottom is None else [bottom]) + [
            c.output_edge for c in _first_layers(captures) if c.pool is None
        ]
        first_pooled = len(targets)
        targets += [captures[i].pool.edge for i in pooled]
        # A segment below a cut at a pooling output, holding only that pooling's first layer, needs no backward pass:
        # the gradient it asks for is the one handed down, ``grads_in`` (the MNIST CNN's conv1 segment).
        own = bottom is None and source.grad_fn is not None and bool(targets)
        if own:
            source_edge = get_gradient_edge(source)
            own = all(target == source_edge for target in targets)
        try:
            for j in range(k):
                column[0] = j
                if own:
                    grads: tuple[Tensor | None, ...] = (grads_in[:, j],) * len(targets)
                else:
                    grads = torch.autograd.grad(
                        source, targets, grad_outputs=grads_in[:, j], retain_graph=j < k - 1, allow_unused=True
                    )
                for i, grad in zip(pooled, grads[first_pooled:], strict=True):
                    if grad is not None:
                        states[i].consume(j, grad)
                        fired[i] = True
                if grads_out is not None:
                    if grads[0] is None:
                        grads_out[:, j].zero_()
                    else:
                        grads_out[:, j].copy_(grads[0])
                del grads
        finally:
            for capture in captures:
                capture.sink = None
        del targets
        for i, capture in enumerate(captures):
            state = states[i]
            states[i] = None
            if fired[i] and state is not None:  # otherwise the layer does not influence the logits
                for pname, value in state.finish().items():
                    qual = f"{capture.name}.{pname}" if capture.name else pname
                    sums[qual] += value.to(sums[qual].dtype)


#: Whether :class:`SquaredGradientEstimator` may split the backward passes into segments (tests switch it off).
_SEGMENTS_ENABLED = True
#: Smallest automatic memory budget (bytes). Below it, splitting a batch into more chunks costs more time (every
#: chunk pays the fixed cost of ``K`` backward passes) than the memory it saves is worth next to a process's fixed
#: overheads.
_MIN_AUTO_BUDGET = 32 * 2**20


def _first_layers(captures: list[_Capture]) -> list[_Capture]:
    """The captures whose input does not depend on any other capture's output (found by walking the autograd graph)."""
    targets = {c.output_fn for c in captures}
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

    def __init__(self, *, strict: bool = True, max_memory_mb: float | None = None) -> None:
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

    def __init__(self, *, num_draws: int = 1, max_memory_mb: float | None = None) -> None:
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
            for i, v, hv in zip(live, probes, hvps, strict=True):
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
