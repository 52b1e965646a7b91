"""A training run on disk: its checkpoint, poison record and curvature profile, and how to rebuild its parts.

``train.py fit`` writes a run directory ``runs/<name>/version_<n>/`` holding ``checkpoints/*.ckpt``, ``poison.json``,
``config.yaml`` and, with the :class:`~lightning_unlearn.callbacks.SharpnessProfiler` attached,
``sharpness_profile.pt``. Profiling and unlearning commands take such a directory (or a checkpoint file inside it).
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_unlearn.checkpoints import instantiate_lightning_module, read_checkpoint
from lightning_unlearn.data.datamodule import POISON_FILENAME, PoisonedDataModule
from lightning_unlearn.data.poison import PoisonRecord
from lightning_unlearn.models.classifier import ClassifierModule
from lightning_unlearn.utils import atomic_write, clean_stale_temp_files

PROFILE_FILENAME = "sharpness_profile.pt"
#: Written by ``train.py fit`` after fit and test: the run finished.
RESULTS_FILENAME = "results.json"
#: Key of the datamodule's state (the poison record) in a checkpoint, as Lightning names it.
DATAMODULE_STATE_KEY = PoisonedDataModule.__qualname__
#: Estimators whose diagonal is a sum of squares (GGN, Fisher): never negative.
_NON_NEGATIVE = ("exact", "mc", "fisher")


class UnverifiedRecordWarning(UserWarning):
    """A run's ``poison.json`` cannot be compared with the record its checkpoint was trained with (it has none)."""


class InterruptedTrainingWarning(UserWarning):
    """The training run of a request (or profile) looks interrupted: its checkpoint is from before its last epoch."""


def _load_checkpoint(path: Path, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's contents (plain data only), its archive checksums verified; kept in ``cache`` (a
    :class:`TrainingRun`'s) while the file is unchanged (size and modification time)."""
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns) if stat else None
    cache = {} if cache is None else cache
    if key is not None and cache.get("key") == key:
        return cache["state"]
    state = read_checkpoint(path, "Lightning checkpoint")
    cache.update(key=key, state=state)
    return state


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
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def poison_path(self) -> Path:
        return self.directory / POISON_FILENAME

    @property
    def profile_path(self) -> Path:
        return self.directory / PROFILE_FILENAME

    @property
    def is_unlearned(self) -> bool:
        """Whether the checkpoint was written by an unlearning request (``unlearned_from``): a chained request's
        source, whose folder is the earlier request's committed output."""
        return "unlearned_from" in self.state()

    @property
    def stores_profile(self) -> bool:
        """Whether a profile computed for this checkpoint is saved at :attr:`profile_path`: for a training run; not
        for an unlearned checkpoint, whose folder belongs to the request that wrote it (a chained request keeps its
        profile in its own output folder)."""
        return not self.is_unlearned

    @property
    def home(self) -> Path:
        """The folder this checkpoint's own outputs go under by default (``unlearn/…``, ``sweep_…``): the run
        directory; for an unlearned checkpoint in a request folder (``<run>/unlearn/<name>/<version>/``) the original
        run's, so that a chained request writes into a folder of its own beside the earlier one, never into it."""
        if self.is_unlearned and self.directory.parent.parent.name == "unlearn":
            return self.directory.parent.parent.parent
        return self.directory

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

    def state(self) -> dict[str, Any]:
        """The checkpoint's contents (plain data, checksums verified; see :func:`verify_archive`).

        Raises:
            ValueError: If the checkpoint is truncated, corrupted or not a checkpoint.
        """
        return _load_checkpoint(self.checkpoint, self._cache)

    def check_unlearnable(self, record: PoisonRecord | None = None, drop_poisoned: bool | None = None) -> None:
        """Check there is something to unlearn: a forget set (``record``, default the run's verified record) that is
        neither empty nor the whole training split, and a model that was trained on it (not a reference retrained
        with ``drop_poisoned``).

        Raises:
            ValueError: Naming the record or the checkpoint.
        """
        record = record if record is not None else self.load_record()
        where = str(self.poison_path) if self.poison_path.is_file() else f"the record in {str(self.checkpoint)!r}"
        if not len(record):
            raise ValueError(
                f"Nothing to unlearn: the poison record {where!r} lists no poisoned sample (kind "
                f"{record.spec.get('kind')!r}), so the forget set would be empty."
            )
        if len(record) >= record.dataset_size:
            raise ValueError(
                f"The poison record {where!r} lists all {record.dataset_size} samples of the training split: the "
                "retain set would be empty, and unlearning everything is retraining from scratch."
            )
        if drop_poisoned is None:
            drop_poisoned = bool((self.state().get("datamodule_hyper_parameters") or {}).get("drop_poisoned"))
        if drop_poisoned:
            raise ValueError(
                f"{str(self.checkpoint)!r} was trained without its poisoned samples (`drop_poisoned: true`: a "
                "reference retrained from scratch): it never saw the forget set, so there is nothing to unlearn. "
                "Unlearn the poisoned run, and pass this one as `--reference`."
            )

    def checkpoint_record(self) -> PoisonRecord | None:
        """The poison record stored in the checkpoint (the one the model was trained with), or None if it has none.

        Raises:
            ValueError: If the checkpoint's record is not a valid record.
        """
        value = _load_checkpoint(self.checkpoint, self._cache).get(DATAMODULE_STATE_KEY)
        if not isinstance(value, dict) or not value.get("poison_record"):
            return None
        try:
            return PoisonRecord.from_dict(value["poison_record"])
        except ValueError as err:
            raise ValueError(f"Checkpoint {str(self.checkpoint)!r} holds an invalid poison record: {err}") from err

    def load_record(self) -> PoisonRecord:
        """The poison record of the run, verified: ``poison.json`` must equal the record in the checkpoint (the
        poison the model was actually trained with); either alone is used as it is (a run without ``poison.json``,
        e.g. an unlearned checkpoint, or a checkpoint without a record, with a :class:`UnverifiedRecordWarning`).

        Raises:
            ValueError: If ``poison.json`` and the checkpoint's record differ (naming both and how), or either is
                invalid in itself.
            FileNotFoundError: If there is no record at all.
        """
        stored = self.checkpoint_record()
        if not self.poison_path.is_file():
            if stored is None:
                raise FileNotFoundError(
                    f"No poison record for run {str(self.directory)!r}: neither {POISON_FILENAME} nor one in the "
                    "checkpoint."
                )
            return stored
        record = PoisonRecord.load(self.poison_path)
        if stored is None:
            warnings.warn(
                f"Checkpoint {str(self.checkpoint)!r} holds no poison record: {str(self.poison_path)!r} cannot be "
                "checked against the poison the model was trained with, and is used as it is.",
                UnverifiedRecordWarning,
                stacklevel=2,
            )
            return record
        differences = stored.differences(record)
        if differences:
            raise ValueError(
                f"The poison record {str(self.poison_path)!r} is not the one the model was trained with (the record "
                f"in checkpoint {str(self.checkpoint)!r}): they differ in {'; '.join(differences)}. The forget set "
                f"would not be what was trained on: restore {POISON_FILENAME} (the checkpoint's record is "
                f"authoritative), or check that the run directory holds its own files."
            )
        return stored

    def training_status(self) -> dict[str, Any]:
        """Whether the training of this checkpoint finished: ``complete`` is True when the run wrote
        ``results.json`` (after fit and test), stopped early or reached ``max_steps``, or the checkpoint is an
        unlearned one; False when the checkpoint is from before the last epoch of the run's ``config.yaml``
        (``epoch`` + 1 < ``max_epochs``: interrupted, or a best-so-far checkpoint without ``results.json``); None when
        it cannot be told."""
        state = _load_checkpoint(self.checkpoint, self._cache)
        epoch, step = state.get("epoch"), state.get("global_step")
        status: dict[str, Any] = {"complete": None, "epoch": epoch, "max_epochs": None}
        if "unlearned_from" in state or (self.directory / RESULTS_FILENAME).is_file():
            return status | {"complete": True}
        stopped = any(isinstance(v, dict) and v.get("stopped_epoch") for k, v in (state.get("callbacks") or {}).items())
        try:
            trainer = (yaml.safe_load((self.directory / "config.yaml").read_text()) or {}).get("trainer") or {}
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            trainer = {}
        max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
        status["max_epochs"] = max_epochs
        if stopped or (isinstance(max_steps, int) and max_steps > 0 and isinstance(step, int) and step >= max_steps):
            return status | {"complete": True}
        if isinstance(epoch, int) and isinstance(max_epochs, int) and max_epochs > 0:
            status["complete"] = epoch + 1 >= max_epochs
        return status

    def load_classifier(self, map_location: str | torch.device = "cpu") -> ClassifierModule:
        """The trained :class:`ClassifierModule` (weights and hyper-parameters from the checkpoint).

        Raises:
            ValueError: If the checkpoint is unreadable (truncated, corrupted), is not a ``ClassifierModule``
                checkpoint, holds weights of another architecture than its hyper-parameters describe, or holds
                non-finite (NaN/inf) weights.
        """
        state = _load_checkpoint(self.checkpoint, self._cache)  # a clear error for a truncated or foreign file
        where = str(self.checkpoint)
        missing = [key for key in ("state_dict", "hyper_parameters") if not isinstance(state.get(key), dict)]
        if not missing and "architecture" not in state["hyper_parameters"]:
            missing = ["ClassifierModule hyper-parameters"]
        if missing:
            raise ValueError(
                f"{where!r} is not a checkpoint of this library's ClassifierModule: it has no {' / '.join(missing)} "
                f"(its keys: {sorted(map(str, state))[:8]}). A `run` is a training run of this library; to unlearn "
                "your own model pass `model=` (the module, or this checkpoint with `model_class=`) and `data=` "
                "instead (docs/own-model.md, 'Your own model')."
            )
        weights = state["state_dict"]
        bad = [n for n, v in weights.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise ValueError(
                f"Checkpoint {where!r} holds non-finite (NaN/inf) weights in {bad[:3]}: its gradients and curvature "
                "would be NaN. Use an earlier checkpoint of the run, or retrain (e.g. with a smaller learning rate)."
            )
        try:
            # the library's own class, whatever the file records; nothing in its hyper-parameters picks an import
            # (and the factories ClassifierModule never saves are not taken from a file)
            hparams = {k: v for k, v in state["hyper_parameters"].items() if k not in ("optimizer", "lr_scheduler")}
            plain = {**state, "hyper_parameters": hparams}
            return instantiate_lightning_module(plain, ClassifierModule, where=where).to(map_location)
        except (RuntimeError, ValueError, TypeError) as err:
            hparams = state["hyper_parameters"]
            arch = {k: hparams.get(k) for k in ("architecture", "arch_kwargs", "num_classes", "in_channels")}
            raise ValueError(
                f"Checkpoint {where!r} does not fit the network its hyper-parameters describe ({arch}); was it saved "
                f"from another architecture? {_mismatch(weights, hparams) or str(err).splitlines()[0]}"
            ) from err

    def datamodule(self, **overrides: Any) -> PoisonedDataModule:
        """The run's data module with exactly the run's verified poison record (:meth:`load_record`); ``overrides``
        replace init arguments.

        Raises:
            ValueError: If the checkpoint has no usable ``PoisonedDataModule`` hyper-parameters, or they describe
                other images than the network takes (channels, size) or another number of classes than the record.
        """
        where = str(self.checkpoint)
        state = _load_checkpoint(self.checkpoint, self._cache)
        hparams = state.get("datamodule_hyper_parameters")
        if not isinstance(hparams, dict) or not hparams:
            raise ValueError(f"Checkpoint {where!r} has no PoisonedDataModule hyper-parameters.")
        accepted = set(inspect.signature(PoisonedDataModule.__init__).parameters) - {"self"}
        unknown = sorted(str(k) for k in hparams if k not in accepted and not str(k).startswith("_"))
        if unknown:
            raise ValueError(
                f"Checkpoint {where!r} has datamodule hyper-parameters that PoisonedDataModule does not take "
                f"({unknown[:5]}): written by an unlearning request of an older version, which saved the request's "
                "arguments there instead of the data's. Unlearn the original training run again to get a checkpoint "
                "that reopens."
            )
        hparams = {k: v for k, v in hparams.items() if k in accepted}
        hparams["poison_record"] = None  # the verified record is set below: the data module reads no file itself
        hparams.update(overrides)
        record = self.load_record()
        try:
            datamodule = PoisonedDataModule(**hparams)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Checkpoint {where!r} has unusable datamodule hyper-parameters: {err}") from err
        model = state.get("hyper_parameters") if isinstance(state.get("hyper_parameters"), dict) else {}
        checks = (
            ("num_classes", record.num_classes, "classes (its poison record)"),
            ("in_channels", datamodule.in_channels, "image channels (its data)"),
            ("image_size", datamodule.image_size, "pixels per side (its data)"),
        )
        for name, value, what in checks:
            if model.get(name) is not None and model[name] != value:
                raise ValueError(
                    f"Checkpoint {where!r} is inconsistent: its network takes `{name}`={model[name]!r} but the run "
                    f"has {value!r} {what}."
                )
        datamodule.record = record
        return datamodule


def check_profile(profile: Any, model: torch.nn.Module, where: str, allow_stale: bool = False) -> None:
    """Check that a curvature profile is one of ``model``: a diagonal for exactly its parameters (names and shapes),
    the layer types of its modules, its architecture and (unless ``allow_stale``) weights fingerprints, a known
    estimator, at least one sample, finite values and, for the estimators that sum squares (``exact``, ``mc``,
    ``fisher``), no negative one. A profile that passes is what the selection may rank; a layer left out or
    retyped would change the selection unnoticed.

    Raises:
        ValueError: Naming ``where`` and the first thing that does not fit.
    """
    from lightning_unlearn.curvature import ESTIMATORS
    from lightning_unlearn.curvature.profile import architecture_fingerprint, layer_of, weights_fingerprint

    def fail(problem: str) -> None:
        raise ValueError(f"The profile {where!r} does not fit the checkpoint: {problem}. Recompute it.")

    if profile.estimator not in ESTIMATORS:
        fail(f"its estimator {profile.estimator!r} is none of {sorted(ESTIMATORS)}")
    if not isinstance(profile.num_samples, int) or isinstance(profile.num_samples, bool) or profile.num_samples < 1:
        fail(f"it averages {profile.num_samples!r} samples")
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    diagonals = profile.diagonals if isinstance(profile.diagonals, dict) else {}
    missing = [n for n in params if n not in diagonals]
    unexpected = [str(n) for n in diagonals if n not in params]
    if missing or unexpected:
        fail(f"it has no diagonal for {missing[:3]} and one for unknown parameters {unexpected[:3]}")
    for name, shape in params.items():
        value = diagonals[name]
        if not torch.is_tensor(value) or not value.is_floating_point() or tuple(value.shape) != shape:
            got = f"{value.dtype} {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            fail(f"the diagonal of {name} is {got}, not a float tensor of shape {shape}")
        if not value.isfinite().all():
            fail(f"the diagonal of {name} holds non-finite (NaN/inf) values")
        # sums of squares are never negative; rounding in the products may leave a last-digit negative near zero
        if profile.estimator in _NON_NEGATIVE and value.numel() and -value.min() > 1e-4 * value.abs().max():
            fail(f"the diagonal of {name} holds negative values, which the {profile.estimator!r} estimator cannot give")
    modules = dict(model.named_modules())
    layer_types = profile.layer_types if isinstance(profile.layer_types, dict) else {}
    for layer in dict.fromkeys(layer_of(n) for n in params):
        actual = type(modules[layer]).__name__ if layer in modules else "?"
        if layer_types.get(layer) != actual:
            fail(f"it types layer {layer} as {layer_types.get(layer)!r}, the model's is {actual!r}")
    if profile.architecture != architecture_fingerprint(model):
        fail(f"it was made for another architecture (fingerprint {profile.architecture!r})")
    if not allow_stale and profile.weights != weights_fingerprint(model):
        fail(
            f"it was computed for other weights (fingerprint {profile.weights!r}, the checkpoint's "
            f"{weights_fingerprint(model)!r}); pass `allow_stale_profile=True` to use it anyway"
        )
