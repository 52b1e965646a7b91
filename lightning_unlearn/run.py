"""A training run on disk: its checkpoint, poison record and curvature profile, and how to rebuild its parts.

``train.py fit`` writes a run directory ``runs/<name>/version_<n>/`` holding ``checkpoints/*.ckpt``, ``poison.json``,
``config.yaml`` and, with the :class:`~lightning_unlearn.callbacks.SharpnessProfiler` attached,
``sharpness_profile.pt``. Profiling and unlearning commands take such a directory (or a checkpoint file inside it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_unlearn.data.datamodule import POISON_FILENAME, PoisonedDataModule
from lightning_unlearn.data.poison import PoisonRecord
from lightning_unlearn.models.classifier import ClassifierModule
from lightning_unlearn.utils import atomic_write, clean_stale_temp_files

PROFILE_FILENAME = "sharpness_profile.pt"


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the file is not a usable checkpoint
        raise ValueError(
            f"{str(path)!r} is not a readable Lightning checkpoint ({type(err).__name__}: {err})."
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with local checkpoints written by :func:`~lightning_unlearn.utils.atomic_write`:
    a temporary file *beside* the checkpoint, fsync, rename. Lightning's own writer stages the file in the system's
    temporary folder and moves it, which is a copy (not atomic) when that folder is on another filesystem, and leaves
    nothing to report after a kill. Remote paths (``s3://`` …) go through Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def _mismatch(weights: dict[str, Any], hparams: dict[str, Any]) -> str:
    """Which entries of ``weights`` the network described by ``hparams`` lacks, does not expect or shapes otherwise."""
    try:
        kwargs = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        expected = {k: tuple(v.shape) for k, v in ClassifierModule(**kwargs).state_dict().items()}
    except Exception:  # noqa: BLE001 - the hyper-parameters themselves are unusable; the caller reports the error
        return ""
    given = {k: tuple(v.shape) for k, v in weights.items() if torch.is_tensor(v)}
    parts = []
    if missing := [k for k in expected if k not in given]:
        parts.append(f"missing {missing[:3]}{' …' if len(missing) > 3 else ''}")
    if unexpected := [k for k in given if k not in expected]:
        parts.append(f"unexpected {unexpected[:3]}{' …' if len(unexpected) > 3 else ''}")
    if shapes := [f"{k} {given[k]} vs {expected[k]}" for k in given if k in expected and given[k] != expected[k]]:
        parts.append(f"shape mismatch {shapes[:3]}")
    return "; ".join(parts)


@dataclass
class TrainingRun:
    """Paths of a training run.

    Attributes:
        directory: The run directory.
        checkpoint: The classifier checkpoint.
        poison_path: ``poison.json`` (may be missing for runs made outside this package).
        profile_path: Where the curvature profile is (or will be) stored.
    """

    directory: Path
    checkpoint: Path

    @property
    def poison_path(self) -> Path:
        return self.directory / POISON_FILENAME

    @property
    def profile_path(self) -> Path:
        return self.directory / PROFILE_FILENAME

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> TrainingRun:
        """Open a run from its directory or from a checkpoint file (its run directory is then the parent of
        ``checkpoints/``).

        Raises:
            FileNotFoundError: If the path does not exist or holds no checkpoint.
            ValueError: If a directory holds several checkpoints (pass the file).
        """
        path = Path(path)
        if path.is_file():
            directory = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            return cls(directory, path).report_interrupted_writes()
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r} is neither a run directory nor a checkpoint file.")
        checkpoints = sorted((path / "checkpoints").glob("*.ckpt")) or sorted(path.glob("*.ckpt"))
        if not checkpoints:
            raise FileNotFoundError(f"No checkpoint (*.ckpt) in {str(path)!r} or its checkpoints/ folder.")
        if len(checkpoints) > 1:
            last = [c for c in checkpoints if c.stem == "last"]
            if len(last) != 1:
                names = ", ".join(c.name for c in checkpoints)
                raise ValueError(f"{str(path)!r} holds several checkpoints ({names}): pass the one to use.")
            checkpoints = last
        return cls(path, checkpoints[0]).report_interrupted_writes()

    def report_interrupted_writes(self) -> TrainingRun:
        """Warn about (and remove) the temporary files of writes into this run that were killed midway; the
        artifacts themselves are the last complete versions (see :func:`~lightning_unlearn.utils.atomic_write`)."""
        for folder in {self.directory, self.checkpoint.parent}:
            clean_stale_temp_files(folder)
        return self

    def load_record(self) -> PoisonRecord:
        """The poison record of the run (from ``poison.json``, else from the checkpoint's datamodule state)."""
        if self.poison_path.is_file():
            return PoisonRecord.load(self.poison_path)
        state = _load_checkpoint(self.checkpoint)
        for key, value in state.items():
            if key.endswith("PoisonedDataModule") and isinstance(value, dict) and value.get("poison_record"):
                return PoisonRecord(**value["poison_record"])
        raise FileNotFoundError(
            f"No poison record for run {str(self.directory)!r}: neither {POISON_FILENAME} nor one in the checkpoint."
        )

    def load_classifier(self, map_location: str | torch.device = "cpu") -> ClassifierModule:
        """The trained :class:`ClassifierModule` (weights and hyper-parameters from the checkpoint).

        Raises:
            ValueError: If the checkpoint is unreadable (truncated, corrupted), is not a ``ClassifierModule``
                checkpoint, holds weights of another architecture than its hyper-parameters describe, or holds
                non-finite (NaN/inf) weights.
        """
        state = _load_checkpoint(self.checkpoint)  # a clear error for a truncated or foreign file
        where = str(self.checkpoint)
        missing = [key for key in ("state_dict", "hyper_parameters") if not isinstance(state.get(key), dict)]
        if missing:
            raise ValueError(
                f"{where!r} is not a ClassifierModule checkpoint: it has no {' / '.join(missing)} "
                f"(its keys: {sorted(map(str, state))[:8]})."
            )
        weights = state["state_dict"]
        bad = [n for n, v in weights.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise ValueError(
                f"Checkpoint {where!r} holds non-finite (NaN/inf) weights in {bad[:3]}: its gradients and curvature "
                "would be NaN. Use an earlier checkpoint of the run, or retrain (e.g. with a smaller learning rate)."
            )
        try:
            return ClassifierModule.load_from_checkpoint(self.checkpoint, map_location=map_location, weights_only=True)
        except (RuntimeError, ValueError, TypeError) as err:
            hparams = state["hyper_parameters"]
            arch = {k: hparams.get(k) for k in ("architecture", "arch_kwargs", "num_classes", "in_channels")}
            raise ValueError(
                f"Checkpoint {where!r} does not fit the network its hyper-parameters describe ({arch}); was it saved "
                f"from another architecture? {_mismatch(weights, hparams) or str(err).splitlines()[0]}"
            ) from err

    def datamodule(self, **overrides: Any) -> PoisonedDataModule:
        """The run's data module, with exactly the run's poison record; ``overrides`` replace init arguments."""
        hparams = dict(_load_checkpoint(self.checkpoint).get("datamodule_hyper_parameters") or {})
        if not hparams:
            raise ValueError(f"Checkpoint {str(self.checkpoint)!r} has no PoisonedDataModule hyper-parameters.")
        hparams.pop("_instantiator", None)
        if self.poison_path.is_file():
            hparams["poison_record"] = str(self.poison_path)
        hparams.update(overrides)
        datamodule = PoisonedDataModule(**hparams)
        if not self.poison_path.is_file():
            datamodule.record = self.load_record()
        return datamodule
