"""``SharpnessProfile``: a per-parameter Hessian diagonal with per-layer statistics, fingerprints and atomic storage."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_unlearn.utils import atomic_write

FORMAT_VERSION = 1


def architecture_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the model's parameter names and shapes: equal for the same architecture."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}:{tuple(p.shape)};".encode())
    return digest.hexdigest()[:16]


#: The estimator name of a profile that holds a model's layout only (:meth:`SharpnessProfile.layout_of`).
LAYOUT = "layout"


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the parameter values: equal only for the very same weights."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()[:16]


def layer_of(parameter_name: str) -> str:
    """The layer (owning module) of a parameter: ``net.fc1.weight`` → ``net.fc1``."""
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else ""


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one layer's Hessian diagonal."""

    name: str
    type: str
    numel: int
    mean: float
    median: float
    max: float


@dataclass(repr=False)
class SharpnessProfile:
    """The diagonal of the training-loss Hessian at the learned parameters, per parameter.

    Attributes:
        diagonals: Parameter name → diagonal (same shape as the parameter, float32, CPU).
        estimator: Name of the estimator that made it.
        num_samples: Number of samples it averages.
        dataset: Name of the dataset profiled (if known).
        architecture: :func:`architecture_fingerprint` of the profiled model.
        weights: :func:`weights_fingerprint` of the profiled model.
        layer_types: Layer name → module class name (e.g. ``Conv2d``), in model order.
        metadata: Anything else worth keeping (split, seed, world size, seconds, estimator options, ...).
    """

    diagonals: dict[str, torch.Tensor]
    estimator: str
    num_samples: int
    dataset: str | None = None
    architecture: str = ""
    weights: str = ""
    layer_types: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls, model: nn.Module, diagonals: dict[str, torch.Tensor], estimator: str, num_samples: int, **kwargs: Any
    ) -> SharpnessProfile:
        """Build a profile for ``model``: fingerprints and layer types are read off the model."""
        modules = dict(model.named_modules())
        layer_types = {}
        for name in diagonals:
            layer = layer_of(name)
            layer_types.setdefault(layer, type(modules[layer]).__name__ if layer in modules else "?")
        return cls(
            {name: d.detach().float().cpu() for name, d in diagonals.items()},
            estimator,
            int(num_samples),
            architecture=architecture_fingerprint(model),
            weights=weights_fingerprint(model),
            layer_types=layer_types,
            **kwargs,
        )

    @classmethod
    def layout_of(cls, model: nn.Module) -> SharpnessProfile:
        """The model's layers and parameters without curvature (estimator :data:`LAYOUT`, zeros): what a request
        whose selection and method need no curvature values (the last layer, all layers, named layers, ``Auto``'s
        default) selects from, so that it computes no profile it would not use."""
        diagonals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()}
        return cls.from_model(model, diagonals, LAYOUT, 0, metadata={"layout_only": True})

    @property
    def is_layout(self) -> bool:
        """Whether this is a layout without curvature (:meth:`layout_of`)."""
        return self.estimator == LAYOUT

    def __repr__(self) -> str:
        """One line: estimator, samples, size and fingerprints, never the diagonals themselves."""
        dataset = f", dataset={self.dataset!r}" if self.dataset else ""
        return (
            f"{type(self).__name__}(estimator={self.estimator!r}, num_samples={self.num_samples}{dataset}, "
            f"parameters={self.total} in {len(self.layers)} layers, architecture={self.architecture!r}, "
            f"weights={self.weights!r})"
        )

    # ---------------------------------------------------------------------------------------------------- layers
    @property
    def layers(self) -> dict[str, list[str]]:
        """Layer name → its parameter names, in model order."""
        out: dict[str, list[str]] = {}
        for name in self.diagonals:
            out.setdefault(layer_of(name), []).append(name)
        return out

    @property
    def total(self) -> int:
        return sum(d.numel() for d in self.diagonals.values())

    def layer_stats(self) -> list[LayerStats]:
        """Mean, median and max of each layer's diagonal (weight and bias together), in model order."""
        stats = []
        for layer, names in self.layers.items():
            values = torch.cat([self.diagonals[n].reshape(-1).double() for n in names])
            stats.append(
                LayerStats(
                    layer,
                    self.layer_types.get(layer, "?"),
                    values.numel(),
                    float(values.mean()),
                    float(values.median()),
                    float(values.max()),
                )
            )
        return stats

    def rank_layers(self, descending: bool = False, types: tuple[str, ...] | None = None) -> list[str]:
        """Layer names sorted by mean diagonal (ascending: flattest first); optionally only layers of ``types``."""
        stats = [s for s in self.layer_stats() if types is None or s.type in types]
        return [s.name for s in sorted(stats, key=lambda s: s.mean, reverse=descending)]

    def top_parameters(self, fraction: float, largest: bool = True) -> dict[str, torch.Tensor]:
        """Boolean masks selecting exactly ``round(fraction · total)`` single parameters (at least one) with the
        largest (or smallest) diagonal; ties broken by position in model order."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"`fraction` must lie in (0, 1], got {fraction}.")
        names = list(self.diagonals)
        flat = torch.cat([self.diagonals[n].reshape(-1).double() for n in names])
        k = max(1, round(fraction * flat.numel()))
        order = torch.sort(flat, descending=largest, stable=True).indices[:k]
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[order] = True
        masks, offset = {}, 0
        for name in names:
            n = self.diagonals[name].numel()
            masks[name] = chosen[offset : offset + n].reshape(self.diagonals[name].shape)
            offset += n
        return masks

    def to_table(self) -> str:
        """Per-layer statistics as a markdown table."""
        lines = [
            f"Hessian diagonal ({self.estimator}, {self.num_samples:,} samples)",
            "| layer | type | params | mean | median | max |",
            "|---|---|---|---|---|---|",
        ]
        for s in self.layer_stats():
            lines.append(f"| {s.name} | {s.type} | {s.numel:,} | {s.mean:.3e} | {s.median:.3e} | {s.max:.3e} |")
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------------ compatibility
    def check_compatible(self, model: nn.Module) -> None:
        """Raise if ``model`` does not have the architecture this profile was made for.

        Raises:
            ValueError: Naming both fingerprints and a parameter that differs.
        """
        actual = architecture_fingerprint(model)
        if actual == self.architecture:
            return
        params = {n: tuple(p.shape) for n, p in model.named_parameters()}
        diff = [n for n in self.diagonals if params.get(n) != tuple(self.diagonals[n].shape)]
        diff += [n for n in params if n not in self.diagonals]
        raise ValueError(
            f"The profile was made for another architecture (fingerprint {self.architecture}, model {actual}); "
            f"first differing parameter: {diff[0] if diff else '?'}."
        )

    # -------------------------------------------------------------------------------------------------- storage
    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "diagonals": self.diagonals,
            "estimator": self.estimator,
            "num_samples": self.num_samples,
            "dataset": self.dataset,
            "architecture": self.architecture,
            "weights": self.weights,
            "layer_types": self.layer_types,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile atomically (temp file + rename) with ``torch.save``."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SharpnessProfile:
        """Read a profile written by :meth:`save` (``weights_only`` loading: plain data only).

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If it is not a readable profile (truncated, corrupted, another format).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No sharpness profile at {str(path)!r}.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            version = state.pop("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"format version {version}, expected {FORMAT_VERSION}")
            profile = cls(**state)
        except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
            raise ValueError(f"{str(path)!r} is not a readable sharpness profile: {err}") from err
        bad = [n for n, d in profile.diagonals.items() if not torch.isfinite(d).all()]
        if bad:
            raise ValueError(f"{str(path)!r} holds non-finite curvature values in {bad[:3]}.")
        return profile
