"""What an :class:`~lightning_unlearn.unlearn.UnlearnModule` unlearns: a training run of the library, or any model.

Either way the result is a :class:`ModelSource`: the network that maps inputs to logits (``net``), the module whose
parameter names profiles, masks and reports use (``names_root``: the model the user handed over, or for a run the
``ClassifierModule``, whose names are ``net.<layer>``), and the data (:mod:`lightning_unlearn.data.protocol`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_unlearn.checkpoints import load_lightning_module, read_checkpoint
from lightning_unlearn.curvature import SharpnessProfile, profile_model
from lightning_unlearn.data.protocol import as_unlearn_data
from lightning_unlearn.run import TrainingRun

__all__ = [
    "ModelSource",
    "LogitsOf",
    "resolve_source",
    "from_run",
    "from_model",
    "load_model",
    "profile_training_set",
    "profile_split",
    "own_unlearned_checkpoint",
    "check_own_request",
    "ForgetSetWarning",
]

#: Applied to a model's forward output to get the logits, e.g. ``lambda out: out[0]`` for ``(logits, features)``.
OutputTransform = Callable[[Any], torch.Tensor]


class LogitsOf(nn.Module):
    """``model`` followed by ``output_transform`` (a model whose ``forward`` returns more than logits)."""

    def __init__(self, model: nn.Module, output_transform: OutputTransform) -> None:
        super().__init__()
        self.model = model
        self.output_transform = output_transform

    def forward(self, x: Any) -> torch.Tensor:
        return self.output_transform(self.model(x))


@dataclass
class ModelSource:
    """The network to unlearn, the module that names its parameters, and its data."""

    net: nn.Module
    #: Parameter names of profiles, masks and reports are ``names_root.named_parameters()``'s; None: the
    #: ``UnlearnModule`` itself (a run: ``net.<layer>``, the trained ``ClassifierModule``'s names).
    names_root: nn.Module | None
    datamodule: Any
    training_run: TrainingRun | None = None
    #: The ``ClassifierModule``'s hyper-parameters (runs), written into the unlearned checkpoint.
    classifier_hparams: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: A user's model given as a checkpoint: its path and class (the unlearned checkpoint is written like it, and a
    #: reference checkpoint is loaded with the same class and output transform).
    checkpoint: Path | None = None
    model_class: type | str | None = None
    output_transform: OutputTransform | None = None
    #: Classes the user trusts a checkpoint's hyper-parameters to name (a reference is read with the same list).
    trusted_classes: list[type | str] = field(default_factory=list)


def from_run(run: str | Path, eval_batch_size: int, num_workers: int) -> ModelSource:
    training_run = TrainingRun.from_path(run)
    classifier = training_run.load_classifier()
    return ModelSource(
        net=classifier.net,
        names_root=None,
        datamodule=training_run.datamodule(eval_batch_size=eval_batch_size, num_workers=num_workers),
        training_run=training_run,
        # the checkpoint's own record (under LightningCLI a module built inside another's __init__ is given the
        # outer module's hyper-parameters); LightningCLI's private keys dropped
        classifier_hparams={k: v for k, v in training_run.state()["hyper_parameters"].items() if k[:1] != "_"},
        description=f"run {training_run.directory}",
    )


def resolve_source(
    run: str | Path | None,
    model: nn.Module | str | Path | None,
    data: Any,
    model_class: type | str | None,
    output_transform: OutputTransform | None,
    eval_batch_size: int,
    num_workers: int,
    trusted_classes: list[type | str] | None = None,
    batch_transform: Callable[[Any], tuple[Any, Any]] | None = None,
) -> ModelSource:
    """``UnlearnModule``'s source: exactly one of a ``run`` and a ``model`` (with ``data``)."""
    if (run is None) == (model is None):
        raise ValueError(
            "Pass exactly one of `run` (a training run of this library: its directory or checkpoint) and `model` "
            "(your own nn.Module or LightningModule, or its checkpoint, with `data`)."
        )
    if run is None:
        return from_model(model, data, model_class, output_transform, trusted_classes, batch_transform)  # type: ignore[arg-type]
    if not isinstance(run, (str, Path)):
        raise TypeError(
            f"`run` is the path of a training run of this library, got a {type(run).__name__}: pass your own model as "
            "`model=` (with `data=`)."
        )
    own = (data, model_class, output_transform, batch_transform)
    if any(value is not None for value in own) or trusted_classes:
        raise ValueError(
            "`data`, `model_class`, `trusted_classes`, `output_transform` and `batch_transform` go with `model`; a "
            "`run` has its own."
        )
    return from_run(run, eval_batch_size, num_workers)


def load_model(
    checkpoint: str | Path,
    model_class: type | str | None = None,
    trusted_classes: list[type | str] | None = None,
    argument: str = "model",
) -> nn.Module:
    """A LightningModule from its checkpoint, read as data (weights-only) into ``model_class`` (the class or its
    import path), or without one into the class the checkpoint records if that is the library's or in
    ``trusted_classes`` (see :func:`~lightning_unlearn.checkpoints.load_lightning_module`: nothing in the file runs
    or picks an import).

    Raises:
        ValueError: If the file is missing or holds pickled objects, or no class is given and the checkpoint records
            none that is trusted.
    """
    return load_lightning_module(checkpoint, model_class, trusted_classes, argument)


def from_model(
    model: nn.Module | str | Path,
    data: Any,
    model_class: type | str | None = None,
    output_transform: OutputTransform | None = None,
    trusted_classes: list[type | str] | None = None,
    batch_transform: Callable[[Any], tuple[Any, Any]] | None = None,
) -> ModelSource:
    """A user's model (an ``nn.Module``, a ``LightningModule`` or the path of its checkpoint) and data
    (``batch_transform`` maps its items to ``(inputs, label)``, see :class:`~lightning_unlearn.data.UnlearnData`)."""
    checkpoint = None
    if isinstance(model, (str, Path)):
        checkpoint = Path(model)
        model = load_model(model, model_class, trusted_classes)
        model_class = type(model)  # a reference checkpoint is read into the same class
    elif model_class is not None or trusted_classes:
        raise ValueError(
            "`model_class` applies (as `trusted_classes` does) to a checkpoint path given as `model`; `model` is "
            "already an object."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be an nn.Module, a LightningModule or the path of a LightningModule checkpoint, got "
            f"{type(model).__name__}."
        )
    if data is None:
        raise ValueError(
            "`data` is required with `model`: an UnlearnData (forget, retain and validation sets) or a data module "
            "with forget_dataloader(), retain_dataloader() and val_dataloader(); see lightning_unlearn.data.protocol."
        )
    if output_transform is not None and not callable(output_transform):
        raise TypeError(f"`output_transform` must be callable (model output → logits), got {output_transform!r}.")
    net = model if output_transform is None else LogitsOf(model, output_transform)
    return ModelSource(
        net=net,
        names_root=model,
        datamodule=_with_transform(as_unlearn_data(data, batch_transform=batch_transform), batch_transform),
        description=f"model {type(model).__name__}",
        checkpoint=checkpoint,
        model_class=model_class,
        output_transform=output_transform,
        trusted_classes=list(trusted_classes or []),
    )


@torch.no_grad()
def check_output(net: nn.Module, datamodule: Any, given: bool) -> None:
    """One forward pass on the first forget batch (the model in eval mode, its modes restored): the request needs
    ``(batch, classes)`` logits; anything else is refused naming ``output_transform``.

    Raises:
        ValueError: For a tuple, a dict or a tensor of another shape.
    """
    from lightning_unlearn.batches import unpack_batch
    from lightning_unlearn.curvature.compute import describe, eval_mode

    batch = next(iter(datamodule.forget_dataloader()), None)
    if batch is None:
        return
    x, _ = unpack_batch(batch)
    device = next(net.parameters()).device
    with eval_mode(net):
        output = net(x.to(device) if isinstance(x, torch.Tensor) else x)
    if isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() == 2:
        return
    source = "`output_transform` returns" if given else "the model's forward returns"
    raise ValueError(
        f"{source} {describe(output)} on a batch of {len(batch[1]) if isinstance(batch, (list, tuple)) else 'its'} "
        "inputs; unlearning needs logits, a floating tensor of shape (batch, classes). Pass `output_transform=` "
        "(`--model.output_transform pkg.function`), a callable mapping the model's output to its logits, e.g. "
        "`lambda out: out[0]` for a model returning `(logits, features)`."
    )


class ForgetSetWarning(UserWarning):
    """The request's forgetting target is met before any update (own data): maybe not what the model was trained on."""


def check_own_request(module: Any) -> None:
    """Before a request on a user's model: its output must be logits (:func:`check_output`), and the forget set
    should not already meet the request's forgetting target — samples the model was not trained on, other samples
    than it was (an index into the wrong split), or a deletion held-out data cannot tell apart. A label flip the model
    generalised to held-out data of the class (both read low) is no sign."""
    from lightning.pytorch.utilities import rank_zero_warn

    check_output(module.net, module.datamodule, given=module.source.output_transform is not None)
    reading, _ = module.read_target()
    target = module.forgetting_target
    if reading.met and (target.target != "corrected" or reading.forget >= 0.5):
        rank_zero_warn(
            f"Before any update the forget set already meets the request's target {target.target!r} "
            f"({target.statistic}: {reading.forget:.3f}, held-out level {reading.level:.3f}, within the noise): the "
            "model treats it like data it never saw. Were these samples trained on with these labels, and are they "
            "the ones that were (indices into the right split)?",
            category=ForgetSetWarning,
        )


def _with_transform(data: Any, batch_transform: Callable[[Any], tuple[Any, Any]] | None) -> Any:
    """``data`` reading its items through ``batch_transform`` (an ``UnlearnData`` given as it is gets it too)."""
    if batch_transform is None:
        return data
    if not callable(batch_transform):
        raise TypeError(f"`batch_transform` must be callable (item → (inputs, label)), got {batch_transform!r}.")
    given = getattr(data, "batch_transform", None)
    if given is not None and given is not batch_transform:
        raise ValueError("`batch_transform` is given twice (to the data and to the request): give it once.")
    if not hasattr(data, "batch_transform"):
        raise ValueError(
            f"`batch_transform` applies to a user's data (UnlearnData or a data module); {type(data).__name__} "
            "reads its own items."
        )
    data.batch_transform = batch_transform
    return data


def profile_training_set(
    model: nn.Module,
    output_transform: OutputTransform | None,
    datamodule: Any,
    estimator: str,
    max_samples: int | None = None,
    **kwargs: Any,
) -> SharpnessProfile:
    """The curvature profile of ``model`` on ``datamodule``'s training set as trained on (its first ``max_samples``);
    keyword arguments as in :func:`profile_split`."""
    datamodule.setup("fit")
    name = getattr(datamodule, "dataset", None)
    return profile_split(
        model, output_transform, datamodule.train_dataset(), estimator, max_samples, split="train", dataset_name=name,
        **kwargs,
    )  # fmt: skip


def profile_split(
    model: nn.Module,
    output_transform: OutputTransform | None,
    dataset: Any,
    estimator: str,
    max_samples: int | None = None,
    *,
    split: str | None = None,
    dataset_name: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> SharpnessProfile:
    """The curvature profile of ``model`` (its outputs through ``output_transform``; its own parameter names) on
    ``dataset`` (its first ``max_samples``; items ``(inputs, label, ...)``), this rank's shard
    ``rank, rank + world_size, …`` all-reduced with ``reduce``; ``split`` is recorded in the profile's metadata."""
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    pin = device is not None and torch.device(device).type == "cuda"  # pinned batches: asynchronous copies
    shard = DataLoader(Subset(dataset, range(rank, total, world_size)), batch_size=256, pin_memory=pin)
    return profile_model(
        model,
        shard,
        estimator,
        output_transform=output_transform,
        dataset=dataset_name,
        split=split,
        reduce=reduce,
        world_size=world_size,
        device=device,
        progress=rank == 0,
        rank=rank,
    )


def own_unlearned_checkpoint(module: Any) -> dict[str, Any]:
    """An own model's unlearned weights: its checkpoint as it was given, with the unlearned ``state_dict`` (it reopens
    with the same ``load_from_checkpoint``) and without the optimizer and scheduler states of the old weights; for a
    model given as an object, its ``state_dict``. Both with ``unlearned_from``."""
    given = module.source.checkpoint
    state = read_checkpoint(given, "Lightning checkpoint", "model") if given is not None else {}
    for key in ("optimizer_states", "lr_schedulers"):
        state.pop(key, None)
    state["state_dict"] = {k: v.detach().cpu() for k, v in module.names_root.state_dict().items()}
    mask = getattr(module, "mask", None)
    state["unlearned_from"] = {
        "model": type(module.names_root).__name__,
        "checkpoint": None if given is None else str(given),
        "method": module.method.name,
        "selection": None if mask is None else mask.strategy,
    }
    return state
