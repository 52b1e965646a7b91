"""The one registration point of layer kinds: ``{module type: rule}``.

To support a new parameter-holding layer kind, write its :class:`~lightning_unlearn.curvature._engine.base.LayerRule`
in a module of its own and add it here; the model checks (``check_exact``, the refusal of unsupported layers), the
memory planner and the backward passes all look rules up in this map.
"""

from __future__ import annotations

from torch import nn

from lightning_unlearn.curvature._engine.base import LayerRule
from lightning_unlearn.curvature._engine.batchnorm import BatchNormRule
from lightning_unlearn.curvature._engine.conv import ConvRule
from lightning_unlearn.curvature._engine.linear import LinearRule

#: Parameter-holding layer types whose per-sample squared gradients the engine computes, and their rules. Subclasses
#: of a registered type take its rule (see :func:`rule_for`).
RULES: dict[type[nn.Module], type[LayerRule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Conv3d: ConvRule,
    nn.BatchNorm1d: BatchNormRule,
    nn.BatchNorm2d: BatchNormRule,
    nn.BatchNorm3d: BatchNormRule,
    # what `Trainer(sync_batchnorm=True)` turns every BatchNorm into (not a BatchNormNd subclass); in eval mode it
    # normalises with its running statistics like any BatchNorm, without synchronising anything
    nn.SyncBatchNorm: BatchNormRule,
}


def rule_for(module: nn.Module) -> type[LayerRule] | None:
    """The rule of ``module``'s type or of its nearest registered base class (``None``: not supported)."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule
    return None


def supported_names() -> str:
    """The registered layer types, for messages (``Linear, Conv1d, ...``)."""
    return ", ".join(cls.__name__ for cls in RULES)
