"""Hard freezing: parameters outside the selection never change, bit for bit, whatever the optimizer does.

Whole parameters outside the mask get ``requires_grad=False`` and are left out of the optimizer (weight decay or
momentum would otherwise still move them). Partly selected parameters (element-wise strategies such as ``topk``)
keep ``requires_grad=True``; :class:`FreezeGuard` zeroes the gradient of their unselected entries before each step
and writes the original values back after it, so decoupled weight decay (AdamW) cannot move them either.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_unlearn.selection import ParameterMask


class FreezeGuard:
    """Applies a :class:`ParameterMask` to ``module`` as a hard freeze.

    Args:
        module: The network whose parameter names the mask uses.
        mask: The selection.

    Raises:
        ValueError: If the mask names parameters the module does not have (a profile of another model) or shapes
            differ.
    """

    def __init__(self, module: nn.Module, mask: ParameterMask) -> None:
        params = dict(module.named_parameters())
        unknown = [name for name in mask.masks if name not in params]
        if unknown:
            raise ValueError(
                f"The selection names parameters this model does not have ({unknown[:3]}...): was the profile made "
                f"for another model? The model has e.g. {list(params)[:3]}."
            )
        for name, m in mask.masks.items():
            if m.shape != params[name].shape:
                raise ValueError(
                    f"Mask of {name!r} has shape {tuple(m.shape)}, the parameter {tuple(params[name].shape)}."
                )
        self.mask = mask
        self.trainable: dict[str, nn.Parameter] = {}
        self._partial: dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = {}
        for name, p in params.items():
            selected = name in mask.masks and bool(mask.masks[name].any())
            p.requires_grad_(selected)
            if not selected:
                continue
            self.trainable[name] = p
            if not mask.is_full(name):
                keep = mask.masks[name].to(p.device)
                self._partial[name] = (p, keep, p.detach().clone())

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer may see (at least one selected entry each)."""
        return list(self.trainable.values())

    @property
    def num_trainable(self) -> int:
        return self.mask.num_selected

    def _follow_devices(self) -> None:
        """Keep the saved masks and values on their parameter's device (Lightning moves modules after __init__, e.g.
        onto the GPU after ``prepare()`` built the masks on the CPU)."""
        for name, (p, keep, original) in self._partial.items():
            if keep.device != p.device:
                self._partial[name] = (p, keep.to(p.device), original.to(p.device))

    def zero_frozen_grads(self) -> None:
        """Zero the gradient of unselected entries of partly selected parameters (call before ``optimizer.step``)."""
        self._follow_devices()
        for p, keep, _ in self._partial.values():
            if p.grad is not None:
                p.grad.mul_(keep.to(p.grad.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the original values back into unselected entries (call after ``optimizer.step``)."""
        self._follow_devices()
        for p, keep, original in self._partial.values():
            p.copy_(torch.where(keep, p, original))

    def mask_update(self, name: str, update: torch.Tensor) -> torch.Tensor:
        """``update`` with unselected entries of parameter ``name`` set to zero, on ``update``'s device (the mask
        follows the parameter, and is moved to ``update``'s device should that differ)."""
        if name not in self._partial:
            return update
        self._follow_devices()
        keep = self._partial[name][1]
        return update * keep.to(device=update.device, dtype=update.dtype)
