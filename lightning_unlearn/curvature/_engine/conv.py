"""Convolutions (1-, 2- and 3-d, any stride, dilation, padding, padding mode and groups)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_unlearn.curvature._engine.base import LayerRule, Settings, add_row_squares
from lightning_unlearn.curvature._engine.buffers import Workspace

if TYPE_CHECKING:
    from lightning_unlearn.curvature._engine.capture import Capture


def conv_padding(conv: nn.modules.conv._ConvNd, spatial: int) -> list[int]:
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


def unfold(
    x: Tensor, conv: nn.modules.conv._ConvNd, workspace: Workspace | None = None, out: Tensor | None = None
) -> Tensor:
    """Patches of ``x`` (m, Cin, *spatial) as (m, Cin·prod(kernel), L), ordered like ``weight.flatten(1)``.

    Args:
        x: Layer input.
        conv: The convolution (kernel size, stride, dilation, padding and padding mode are honoured).
        workspace: Optional scratch buffer to write the patches into.
        out: Optional contiguous tensor of the result's size to write the patches into (takes precedence).
    """
    spatial = x.dim() - 2
    pads = conv_padding(conv, spatial)
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


#: What one pass over memory costs in multiply-adds, for :func:`conv_mode`. 16 on a 2-core x86 CPU: with 4, the
#: direct products were chosen for ResNet-18's 2×2 maps (ImageNet stem, 32×32 images) with one column (``mc``,
#: ``fisher``), where they are memory-bound; the Gram form made ``mc`` 111 -> 93 ms there. No other choice changes
#: on the MNIST CNN or either ResNet-18 stem.
MEMORY_PASS = 16


def conv_mode(k: int, cout: int, length: int, fan_in: int, groups: int) -> str:
    """How a convolution's squared per-sample gradients are summed (see :class:`ConvRule`)."""
    if groups == 1:
        # Multiply-adds per sample, a pass over memory counted as MEMORY_PASS of them: the direct products (which
        # write and square K·Cout·fan_in values per sample) vs the Gram form. With one output position (L = 1) the
        # Gram form is the rank-one rule of Linear layers, (Σ_c g_c²)(u²)ᵀ, one matrix product.
        pairs = length * (length + 1) // 2
        direct = k * cout * fan_in * (length + MEMORY_PASS)
        gram = cout * fan_in * pairs + cout * length * length * k + MEMORY_PASS * pairs * fan_in
        if gram < direct:
            return "gram"
    # Stacking the columns first gives one product per sample with K times more rows (faster than K products, and the
    # patches are read once, after the backward passes) at the cost of a copy of the output gradients, which only
    # matters when the products themselves are cheap (small fan-in).
    if k == 1 or fan_in < 64:
        return "stream"
    return "stack"


class ConvRule(LayerRule):
    """Convolution: per-sample weight gradients ``g_c Uᵀ``, ``U`` = unfolded input patches (Cin·kernel × L).

    Three exact ways to sum their squares, chosen by cost (:func:`conv_mode`) unless ``settings.conv_mode`` forces one:

    * ``stream``: per column, batched products of every sample's ``g_c`` (Cout × L) with its ``Uᵀ``;
    * ``stack``: the columns are gathered first, then one product per sample with all ``K·Cout`` rows at once;
    * ``gram``: for few output positions ``L``, ``Σ_c (g_c Uᵀ)² = Σ_{l≤l'} w_{ll'} (Σ_c g_{c,l} g_{c,l'}) (u_l u_l')``;
      the ``Σ_c g g`` part is accumulated per column, and a single matrix product contracts samples and position
      pairs at the end.

    A fourth, ``pooled``, is used for a first convolution whose output only flows through a ReLU and a max-pooling
    (``pool`` link, see :func:`~lightning_unlearn.curvature._engine.planner.link_pools`): the output gradient is then
    zero except at the positions the pooling picked, so each output channel's per-sample gradient is a product over the
    pooled positions only, ``Σ_p g_{c,o,p} u_{i(o,p)}``, with the patches gathered at the picked positions ``i(o,p)`` (a
    quarter of them for 2×2 pooling), and the backward passes stop at the pooling output instead of going through the
    ReLU and pooling.
    """

    @classmethod
    def choose_mode(cls, k: int, cout: int, length: int, fan_in: int, groups: int, settings: Settings) -> str:
        """The algorithm for a layer without pool link: :func:`conv_mode`, or the one ``settings.conv_mode`` forces
        (``gram`` holds for ungrouped convolutions only; grouped ones keep the automatic choice)."""
        forced = settings.conv_mode
        if forced is not None and (forced != "gram" or groups == 1):
            return forced
        return conv_mode(k, cout, length, fan_in, groups)

    @classmethod
    def elements(cls, capture: Capture, k: int, settings: Settings) -> int:
        module, out_shape = capture.module, capture.output_shape
        if capture.pool is not None:  # mask and K columns at the pooled positions
            return (k + 1) * capture.pool.indices[0].numel()
        cout, length = out_shape[1], math.prod(out_shape[2:])
        fan_in = module.weight[0].numel()
        mode = cls.choose_mode(k, cout, length, fan_in, module.groups, settings)
        if mode == "gram":
            return cout * length * length
        if mode == "stream":
            return module.groups * fan_in * length
        return k * math.prod(out_shape[1:])

    @classmethod
    def can_pool(cls, module: nn.Module) -> bool:
        return type(module) is nn.Conv2d and module.groups == 1

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
        self.mode = self.choose_mode(k, self.cout, self.length, self.fan_in, self.groups, self.settings)
        if self.mode == "gram":
            self.gram = buffers.take((self.m * self.cout, self.length, self.length), x).zero_()
        elif self.mode == "stream":
            patches = unfold(x, module, out=buffers.take((self.m, self.groups * self.fan_in, self.length), x))
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
                add_row_squares(self.weight_acc, prod.view(s, per_sample))

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
            u = unfold(self.x[start:stop], self.module, self.buffers.space("patches"))
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
                    add_row_squares(self.weight_acc, prod.view(s * kc, per_class))
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
            u = unfold(self.x[start:stop], self.module, self.buffers.space("patches"))  # (s, fan_in, L)
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
            u = unfold(self.x[start:stop], self.module, self.buffers.space("patches"))
            ut = u.transpose(1, 2).contiguous()  # (s, L, fan_in)
            b = self.buffers.get("product", (s, pairs, fan_in), ut)
            offset = 0
            for row in range(length):  # b[:, (row, col)] = u_row * u_col for col >= row
                width = length - row
                torch.mul(ut[:, row : row + 1], ut[:, row:], out=b[:, offset : offset + width])
                offset += width
            a = (gram[start:stop][:, :, flat] * twice).transpose(0, 1).reshape(cout, s * pairs)
            acc.addmm_(a, b.view(s * pairs, fan_in))
