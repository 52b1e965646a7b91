"""Checkpoints read as data: nothing in a file runs code or chooses an import.

Every checkpoint, profile and record this library opens is read with ``torch.load(weights_only=True)``: tensors,
numbers, strings and plain containers, never a pickled object (a pickle can run any code while it loads). A
``LightningModule`` is rebuilt from such a file only in a class that the *caller* names:

* the library's own class for a training run of the library (:class:`~lightning_unlearn.models.ClassifierModule`);
* for your own model, ``model_class`` (the class, or ``"pkg.module.Class"``, imported because *you* named it).

A checkpoint written by ``LightningCLI`` records the class it was built from (``_class_path``) and an instantiator
(``_instantiator``) that would resolve its hyper-parameters with jsonargparse, which imports any module a
callable-typed argument names (``optimizer: "some.module.attr"`` imports ``some.module``). This module never uses
either: the recorded class is only *compared* with the library's classes and the ones you trust, and hyper-parameters
reach your class's ``__init__`` as the plain values the file holds. A hyper-parameter that describes an object the way
``LightningCLI`` writes it (``{"class_path": …, "init_args": …}``, e.g. a nested encoder or an optimizer) is built
only from a class in ``trusted_classes``; any other class path in a file is refused with the remedy.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

__all__ = [
    "read_checkpoint",
    "verify_archive",
    "import_named_class",
    "load_lightning_module",
    "instantiate_lightning_module",
    "recorded_class_path",
]

#: Keys LightningCLI adds to a module's hyper-parameters: never used to build anything.
CLI_KEYS = ("_instantiator", "_class_path")


def verify_archive(path: str | os.PathLike, what: str) -> None:
    """Check a ``torch.save`` file (a zip archive) against the CRC-32 checksums it carries for every part.

    ``torch.load`` does not check them: a flipped bit in a weight or a curvature value loads silently as another
    number. Every single-bit error (and any burst up to 32 bits) in a part fails here.

    Raises:
        ValueError: If the file is not a zip archive, is truncated, or a part's checksum does not match.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # noqa: BLE001 - any failure to read the archive means the file is unusable
        raise ValueError(
            f"{str(path)!r} is not a readable {what} (not a complete torch.save archive: {type(err).__name__}: {err})."
        ) from err
    if bad is not None:
        raise ValueError(
            f"{str(path)!r} is not a readable {what}: it is corrupted (the checksum of its part {bad!r} does not "
            "match: a flipped bit or a damaged copy). Restore it, or recompute it."
        )


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint", argument: str | None = None) -> dict[str, Any]:
    """The contents of a ``torch.save`` file as plain data (``weights_only=True``), its archive checksums verified.

    Args:
        path: The file.
        what: What the file should be, for messages (``"Lightning checkpoint"``, ``"sharpness profile"``).
        argument: The argument that named the file (``"model"``, ``"reference"``), for messages.

    Raises:
        ValueError: If the file is missing, unreadable, corrupted, not a dict, or holds pickled Python objects that a
            weights-only load refuses (the message names the first one): such a file could run code as it loads.
    """
    path = Path(path)
    named = f"`{argument}`: " if argument else ""
    if not path.is_file():
        raise ValueError(f"{named}no checkpoint file at {str(path)!r} (a {what} expected).")
    verify_archive(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "global" in line), first[0] if first else "")
        raise ValueError(
            f"{named}{str(path)!r} holds pickled Python objects, not only weights and plain values ({detail.strip()}). "
            "This library reads every file weights-only, so that nothing in a file runs on your machine: re-save "
            "the checkpoint with plain hyper-parameters (numbers, strings, lists, dicts), or build the model in "
            "Python and pass it as an object."
        ) from None
    except Exception as err:  # noqa: BLE001 - any other failure means the file is not a usable checkpoint
        raise ValueError(f"{named}{str(path)!r} is not a readable {what} ({type(err).__name__}: {err}).") from err
    if not isinstance(state, dict):
        raise ValueError(f"{named}{str(path)!r} is not a readable {what} (it holds a {type(state).__name__}).")
    return state


def import_named_class(spec: type | str, argument: str) -> type:
    """A class the *caller* named: itself, or imported from ``"pkg.module.Class"`` (never a path read from a file).

    Raises:
        ValueError: If the path does not import, naming ``argument``.
    """
    if isinstance(spec, type):
        return spec
    if not isinstance(spec, str) or "." not in spec:
        raise ValueError(f"`{argument}`: give a class or its import path 'package.module.ClassName', got {spec!r}.")
    module_name, _, name = spec.rpartition(".")
    try:
        value = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"`{argument}`: cannot import {spec!r} ({err}); give 'package.module.ClassName'.") from None
    if not isinstance(value, type):
        raise ValueError(f"`{argument}`: {spec!r} is a {type(value).__name__}, not a class.")
    return value


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _library_classes() -> dict[str, type]:
    from lightning_unlearn.models.classifier import ClassifierModule

    return {class_path(ClassifierModule): ClassifierModule}


def recorded_class_path(state: Mapping[str, Any]) -> str | None:
    """The class a ``LightningCLI`` checkpoint says it was built from (``_class_path``), as a string; None if none."""
    hparams = state.get("hyper_parameters")
    value = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    return value if isinstance(value, str) else None


def _trusted(trusted_classes: Iterable[type | str] | None, *named: type) -> dict[str, type]:
    """Class path → class for every class the caller named (imported because the caller named it)."""
    allowed = {class_path(cls): cls for cls in named}
    for spec in trusted_classes or ():
        cls = import_named_class(spec, "trusted_classes")
        allowed[class_path(cls)] = cls
        if isinstance(spec, str):
            allowed[spec] = cls  # the path as the user (and LightningCLI) spells it, e.g. a re-exported name
    return allowed


def _expects_callable(cls: type, name: str) -> bool:
    """Whether ``cls.__init__`` annotates ``name`` as a callable (a factory: LightningCLI's ``OptimizerCallable``)."""
    try:
        parameter = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return parameter is not None and "Callable" in str(parameter.annotation)


def _has_class_path(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "class_path" in value or any(_has_class_path(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_class_path(v) for v in value)
    return False


def _build(value: Any, allowed: dict[str, type], where: str, factory: bool) -> Any:
    """``value`` with every ``{"class_path", "init_args"}`` built from an allowed class (a factory where the
    parameter takes a callable), everything else as it is."""
    if isinstance(value, Mapping) and "class_path" in value:
        path = value["class_path"]
        if path not in allowed:
            raise ValueError(
                f"The checkpoint's hyper-parameter {where} names the class {path!r} (LightningCLI writes a nested "
                "object this way). Nothing a file names is imported: pass `trusted_classes` (`--model."
                f"trusted_classes`) with {path!r} if you trust it, or build the model in Python and pass it as an "
                "object."
            )
        init_args = value.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ValueError(f"The checkpoint's hyper-parameter {where} has `init_args` that are not a mapping.")
        kwargs = {str(k): _build(v, allowed, f"{where}.{k}", False) for k, v in init_args.items()}
        return functools.partial(allowed[path], **kwargs) if factory else allowed[path](**kwargs)
    if isinstance(value, Mapping):
        return {k: _build(v, allowed, f"{where}.{k}", False) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_build(v, allowed, f"{where}[{i}]", False) for i, v in enumerate(value))
    return value


def instantiate_lightning_module(
    state: dict[str, Any],
    model_class: type,
    trusted_classes: Iterable[type | str] | None = None,
    where: str = "the checkpoint",
) -> LightningModule:
    """Rebuild ``model_class`` from a checkpoint's contents (read by :func:`read_checkpoint`) without using what the
    file says about classes: ``LightningCLI``'s ``_instantiator`` and ``_class_path`` are dropped, hyper-parameters
    are passed as plain values (nested ``class_path`` objects only from ``trusted_classes``), then Lightning loads the
    weights (``load_from_checkpoint``'s own hyper-parameter handling, hooks and strictness).

    Raises:
        ValueError: If ``model_class`` is no ``LightningModule``, the checkpoint has no ``state_dict``, or a
            hyper-parameter names a class not in ``trusted_classes``.
    """
    if not (isinstance(model_class, type) and issubclass(model_class, LightningModule)):
        raise ValueError(f"`model_class` must be a LightningModule subclass, got {model_class!r}.")
    if not isinstance(state.get("state_dict"), Mapping):
        raise ValueError(f"{where} is not a Lightning checkpoint: it has no `state_dict` (keys {sorted(state)[:8]}).")
    hparams = state.get("hyper_parameters")
    hparams = dict(hparams) if isinstance(hparams, Mapping) else {}
    for key in CLI_KEYS:
        hparams.pop(key, None)
    allowed = _trusted(trusted_classes, model_class)
    built = {
        name: _build(value, allowed, f"`{name}`", _expects_callable(model_class, name))
        for name, value in hparams.items()
        if _has_class_path(value)
    }
    cleaned = {**state, "hyper_parameters": {k: v for k, v in hparams.items() if k not in built}}
    buffer = io.BytesIO()
    torch.save(cleaned, buffer)  # plain data only: Lightning reads it back weights-only
    buffer.seek(0)
    return model_class.load_from_checkpoint(buffer, map_location="cpu", weights_only=True, **built)


def load_lightning_module(
    path: str | os.PathLike,
    model_class: type | str | None = None,
    trusted_classes: Iterable[type | str] | None = None,
    argument: str = "model",
) -> LightningModule:
    """A ``LightningModule`` from its checkpoint, in the class the caller names, reading the file as data only.

    Args:
        path: The checkpoint file.
        model_class: The class (or ``"pkg.module.Class"``). None: the class the checkpoint records, only if it is one
            of the library's (``ClassifierModule``) or in ``trusted_classes``; a recorded class is never imported.
        trusted_classes: Further classes (or import paths) that the checkpoint's hyper-parameters may name.
        argument: The argument that named the file, for messages.

    Raises:
        ValueError: If the file is unreadable or holds pickled objects (:func:`read_checkpoint`), no class is given
            and the recorded one is not trusted, or the class cannot be built from it.
    """
    state = read_checkpoint(path, "Lightning checkpoint", argument)
    if model_class is None:
        recorded = recorded_class_path(state)
        allowed = {**_library_classes(), **_trusted(trusted_classes)}
        if recorded is None or recorded not in allowed:
            records = (
                f"it records {recorded!r} (written by LightningCLI), which this library does not import from a file"
                if recorded
                else "it does not record its LightningModule's class (only LightningCLI runs do)"
            )
            raise ValueError(
                f"`{argument}`: name the class of the checkpoint {str(path)!r}: {records}. Pass `model_class` "
                "(`--model.model_class` on the command line): the class, or 'package.module.ClassName'."
            )
        model_class = allowed[recorded]
    return instantiate_lightning_module(
        state, import_named_class(model_class, "model_class"), trusted_classes, f"{argument} {str(path)!r}"
    )
