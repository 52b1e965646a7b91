"""The public toolkits' fine-tuning baselines: random labels (SalUn's RL), l1-sparse fine-tuning, SCRUB.

* :class:`RandomLabel` — OPTML-Group/Unlearn-Saliency, ``Classification/unlearn/RL.py``: cross-entropy on the forget
  set with labels drawn uniformly from all classes, and on the retain set with its own labels;
* :class:`L1Sparse` — OPTML-Group/Unlearn-Sparse, ``unlearn/FT.py`` (``FT_l1``, run by ``FT_prune``): fine-tuning on
  the retain set with ``CE + α_e ‖θ‖₁``, ``α_e`` decaying linearly over the epochs;
* :class:`SCRUB` — meghdadk/SCRUB, ``large_scale_unlearning.ipynb`` with ``thirdparty/repdistiller/helper/loops.py``
  (``train_distill``) and ``helper/KD.py`` (``DistillKL``): a student (the model) pushed away from a frozen teacher
  (the original model) on the forget set and kept close to it on the retain set.

None needs the forget samples' corrected labels. Like the other iterative methods they run under manual
optimization with the hard freeze (only the selection changes), the network in ``eval()`` and every loss a weighted
mean whose weights drop the DDP padding (``ShardSampler``). What the official code does differently on purpose is
listed in ``docs/fidelity.md``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_unlearn.unlearn.base import UnlearnContext, weighted_mean
from lightning_unlearn.unlearn.methods.iterative import IterativeMethod, cross_entropy, optimizer_step, rank_count

__all__ = ["EpochPhases", "L1Sparse", "RandomLabel", "SCRUB", "distill_kl"]

#: How :class:`RandomLabel` orders an epoch.
ORDERS = ("forget_then_retain", "shuffled")


class EpochPhases:
    """One epoch as whole passes over named loaders in turn; each batch comes as ``{phase name: batch}``.

    Args:
        loaders: Phase name → a loader from ``module.loader`` (its ``ShardSampler`` is set to the epoch here).
        phases: Epoch (within the method's schedule) → the names of the phases of that epoch, in order.
        epoch: The current epoch within the method's schedule (read when an epoch's iteration starts).
    """

    def __init__(
        self, loaders: dict[str, DataLoader], phases: Callable[[int], tuple[str, ...]], epoch: Callable[[], int]
    ) -> None:
        self.loaders, self.phases, self.epoch = loaders, phases, epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch()
        for name in self.phases(epoch):
            loader = self.loaders[name]
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                yield {name: batch}

    def __len__(self) -> int:
        return sum(len(self.loaders[name]) for name in self.phases(self.epoch()))


class Tagged(Dataset):
    """``dataset``'s items as ``(inputs, label, position, is_forget)`` (``position``: the item's index in
    ``dataset``)."""

    def __init__(self, dataset: Dataset, forget: bool) -> None:
        self.dataset, self.forget = dataset, forget

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
        item = self.dataset[index]
        return item[0], item[1], torch.tensor(index), torch.tensor(self.forget)


class ScheduledMethod(IterativeMethod):
    """An iterative method whose epochs differ: it counts them itself. :attr:`epoch` is the epoch within the current
    run of ``epochs`` (under ``UnlearnModule(lr_grid=...)`` every rate's run starts again at 0)."""

    def __init__(self, epochs: int = 1, batch_size: int = 128) -> None:
        super().__init__(epochs, batch_size)
        self._epochs_done = 0

    @property
    def epoch(self) -> int:
        return self._epochs_done % self.epochs

    def train_dataloader(self, module: UnlearnContext) -> Any:
        self._epochs_done = 0  # one request per fit
        return self.epoch_loader(module)

    def epoch_loader(self, module: UnlearnContext) -> Any:
        raise NotImplementedError

    def on_train_epoch_end(self, module: UnlearnContext) -> None:
        self._epochs_done += 1


class RandomLabel(ScheduledMethod):
    """Random-label fine-tuning ("RL" of SalUn; Unlearn-Saliency ``Classification/unlearn/RL.py``).

    Cross-entropy steps on the forget set with **random labels**, drawn uniformly from all ``C`` classes (the label
    the model was trained on, or the true one, may be drawn too, as in the official code), and on the retain set with
    its labels. The forget samples' labels of epoch ``e`` (within the schedule) are row ``e`` of
    ``torch.randint(0, C, (epochs, |D_f|), generator=torch.Generator().manual_seed(seed))``, indexed by the sample's
    position in the forget set: new labels every epoch, the same on every rank and in every run with this ``seed``.

    Args:
        epochs: Passes over the data (official: 10).
        batch_size: Batch size of the forget and retain loaders (official: 256).
        order: ``"forget_then_retain"``: each epoch one pass over the forget set, then one over the retain set (the
            official code for CIFAR-10 and SVHN); ``"shuffled"``: one pass over the forget and retain sets
            concatenated and shuffled together (its code for CIFAR-100 and TinyImageNet).
        seed: Seed of the random labels (recorded in the report).
        num_classes: ``C``; None: the width of the model's output.
    """

    name = "random_label"

    def __init__(
        self,
        epochs: int = 10,
        batch_size: int = 256,
        order: str = "forget_then_retain",
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(epochs, batch_size)
        if order not in ORDERS:
            raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(
                f"`num_classes` must be an int >= 2 or None (the model's output width), got {num_classes!r}."
            )
        self.order, self.seed, self.num_classes = order, seed, num_classes
        self._labels: torch.Tensor | None = None
        self._num_forget = 0

    def epoch_loader(self, module: UnlearnContext) -> EpochPhases:
        dm, size = module.datamodule, self.batch_size
        forget = Tagged(dm.forget_dataloader().dataset, forget=True)
        retain = Tagged(dm.retain_dataloader().dataset, forget=False)
        self._num_forget, self._labels = len(forget), None
        if self.order == "shuffled":
            loaders = {"mixed": module.loader(ConcatDataset([forget, retain]), shuffle=True, batch_size=size)}
        else:
            loaders = {
                "forget": module.loader(forget, shuffle=True, batch_size=size),
                "retain": module.loader(retain, shuffle=True, batch_size=size),
            }
        names = tuple(loaders)
        return EpochPhases(loaders, lambda epoch: names, lambda: self.epoch)

    def random_labels(self, outputs: int) -> torch.Tensor:
        """The forget set's random labels of every epoch, ``(epochs, |D_f|)``, for a model with ``outputs`` logits
        (drawn once per fit, on the CPU)."""
        classes = self.num_classes or outputs
        if classes > outputs:
            raise ValueError(f"`num_classes` = {classes} exceeds the model's {outputs} outputs.")
        if self._labels is None:
            generator = torch.Generator().manual_seed(self.seed)
            self._labels = torch.randint(0, classes, (self.epochs, self._num_forget), generator=generator)
        return self._labels

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        ((phase, (x, y, position, is_forget, weight)),) = batch.items()
        logits = module.net(x)
        labels = self.random_labels(logits.shape[-1])[self.epoch].to(y.device)
        y = y.clone()
        y[is_forget] = labels[position[is_forget]]
        loss = cross_entropy(logits, y, weight, rank_count(module, weight))
        optimizer_step(module, loss)
        module.log(f"unlearn/{phase}_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(weight))
        return loss

    def report(self) -> dict[str, Any]:
        return {**super().report(), "order": self.order, "seed": self.seed, "num_classes": self.num_classes}


class L1Sparse(ScheduledMethod):
    """l1-sparse fine-tuning (Unlearn-Sparse ``unlearn/FT.py``: ``FT_l1``, which their ``FT_prune`` runs).

    Fine-tunes on the retain set with ``CE(D_r) + α_e ‖θ_S‖₁`` where ``‖θ_S‖₁`` sums the absolute values of the
    **selected entries only** (the official code sums over every parameter of the model; here nothing outside the
    selection may change, so nothing outside it is penalised) and ``α_e`` decays linearly over the epochs as the
    official code does: ``α_e = α (1 − e / (E − E₀))`` for epochs ``e = 0 … E − E₀ − 1`` (``E = epochs``,
    ``E₀ = no_l1_epochs``), 0 for the last ``E₀`` epochs, and ``α`` throughout when ``E₀ = E``.

    Args:
        epochs: Passes over the retain set (official: 10).
        batch_size: Batch size (official: 256).
        alpha: ``α >= 0``, the penalty's weight in the first epoch (the official ``--alpha``, default 0.2; its README
            leaves the value to the user).
        no_l1_epochs: ``E₀``, final epochs without the penalty (official ``--no-l1-epochs``, default 0).
    """

    name = "l1_sparse"

    def __init__(self, epochs: int = 10, batch_size: int = 256, alpha: float = 0.2, no_l1_epochs: int = 0) -> None:
        super().__init__(epochs, batch_size)
        if not alpha >= 0:
            raise ValueError(f"`alpha` must be >= 0, got {alpha}.")
        if not 0 <= no_l1_epochs <= epochs:
            raise ValueError(f"`no_l1_epochs` must lie in [0, epochs = {epochs}], got {no_l1_epochs}.")
        self.alpha, self.no_l1_epochs = alpha, no_l1_epochs

    def alpha_at(self, epoch: int) -> float:
        """``α_e`` of epoch ``epoch`` (0-based, within the schedule)."""
        decay = self.epochs - self.no_l1_epochs
        if decay == 0:
            return self.alpha
        return self.alpha * (1 - epoch / decay) if epoch < decay else 0.0

    def epoch_loader(self, module: UnlearnContext) -> DataLoader:
        return module.loader(module.datamodule.retain_dataloader().dataset, shuffle=True, batch_size=self.batch_size)

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        x, y, weight = batch[0], batch[1], batch[-1]
        ce = cross_entropy(module.net(x), y, weight, rank_count(module, weight))
        alpha = self.alpha_at(self.epoch)
        guard = module.guard
        l1 = sum(guard.mask_update(name, p.abs()).sum() for name, p in guard.trainable.items())
        loss = ce + alpha * l1
        optimizer_step(module, loss)
        logs = {"unlearn/retain_loss": ce.detach(), "unlearn/l1": torch.as_tensor(l1).detach(), "unlearn/alpha": alpha}
        module.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(weight))
        return loss

    def report(self) -> dict[str, Any]:
        return {**super().report(), "alpha": self.alpha, "no_l1_epochs": self.no_l1_epochs}


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample ``T² KL(softmax(t/T) ‖ softmax(s/T))`` of student logits ``s`` and teacher logits ``t`` (the
    per-sample term of RepDistiller's ``DistillKL``, which averages it over the batch)."""
    log_student = F.log_softmax(student / temperature, dim=1)
    teacher_probs = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="none").sum(dim=1) * temperature**2


class SCRUB(ScheduledMethod):
    """SCRUB (Kurmanji et al., "Towards Unbounded Machine Unlearning"; meghdadk/SCRUB).

    The student is the model being unlearned, the teacher a frozen copy of it taken before the first step. Each
    epoch ``e`` (0-based) passes over

    1. the forget set, only while ``e < msteps``: "max" steps on ``−KL_T`` (the student moves away from the
       teacher), labels unused;
    2. the retain set: "min" steps on ``γ CE(D_r) + α KL_T``,

    with ``KL_T = mean_i T² KL(softmax(t_i/T) ‖ softmax(s_i/T))`` (teacher ‖ student, RepDistiller's ``DistillKL``),
    one optimizer (and its state) for both kinds of step. The defaults are those of the official large-scale notebook
    (``large_scale_unlearning.ipynb``: ``msteps=2``, 3 epochs, ``kd_T=4``, ``gamma=0.99``, ``alpha=0.001``,
    ``beta=0``, forget batches of 512, retain batches of 256; SGD lr 5e-4, momentum 0.9, weight decay 5e-4 in
    ``configs/unlearn/scrub.yaml``).

    The teacher lives in this method object, not in the ``UnlearnModule``: it is no submodule, so it is neither
    trained nor part of the module's ``state_dict`` or checkpoints; it follows the student's device at every step.

    Args:
        epochs: Epochs (official 3).
        batch_size: Batch size of the retain loader (official 256).
        forget_batch_size: Batch size of the forget loader (official 512).
        msteps: Epochs that start with a "max" pass over the forget set (official 2).
        temperature: ``T > 0`` of the distillation (official ``kd_T=4``).
        alpha: ``α >= 0``, weight of ``KL_T`` in the "min" steps (official 0.001).
        gamma: ``γ >= 0``, weight of the retain cross-entropy in the "min" steps (official 0.99).
    """

    name = "scrub"

    def __init__(
        self,
        epochs: int = 3,
        batch_size: int = 256,
        forget_batch_size: int = 512,
        msteps: int = 2,
        temperature: float = 4.0,
        alpha: float = 0.001,
        gamma: float = 0.99,
    ) -> None:
        super().__init__(epochs, batch_size)
        if forget_batch_size < 1:
            raise ValueError(f"`forget_batch_size` must be >= 1, got {forget_batch_size}.")
        if msteps < 0:
            raise ValueError(f"`msteps` must be >= 0 (epochs with a max pass over the forget set), got {msteps}.")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if not (alpha >= 0 and gamma >= 0):
            raise ValueError(f"`alpha` and `gamma` must be >= 0, got {alpha} and {gamma}.")
        self.forget_batch_size, self.msteps = forget_batch_size, msteps
        self.temperature, self.alpha, self.gamma = temperature, alpha, gamma
        self.teacher: nn.Module | None = None

    def epoch_loader(self, module: UnlearnContext) -> EpochPhases:
        self.teacher = copy.deepcopy(module.net).eval().requires_grad_(False)
        dm = module.datamodule
        loaders = {
            "forget": module.loader(dm.forget_dataloader().dataset, shuffle=True, batch_size=self.forget_batch_size),
            "retain": module.loader(dm.retain_dataloader().dataset, shuffle=True, batch_size=self.batch_size),
        }
        return EpochPhases(loaders, self.phases, lambda: self.epoch)

    def phases(self, epoch: int) -> tuple[str, ...]:
        """``("forget", "retain")`` in the first ``msteps`` epochs, ``("retain",)`` after them."""
        return ("forget", "retain") if epoch < self.msteps else ("retain",)

    @torch.no_grad()
    def teacher_logits(self, module: UnlearnContext, x: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits, on the student's device."""
        first = next(self.teacher.parameters(), None)
        if first is not None and first.device != module.device:
            self.teacher.to(module.device)
        self.teacher.eval()
        return self.teacher(x)

    def training_step(self, module: UnlearnContext, batch: Any, batch_idx: int) -> torch.Tensor:
        module.net.eval()
        ((phase, items),) = batch.items()
        x, y, weight = items[0], items[1], items[-1]
        count = rank_count(module, weight)
        logits = module.net(x)
        kl = weighted_mean(distill_kl(logits, self.teacher_logits(module, x), self.temperature), weight, count)
        if phase == "forget":
            loss = -kl
        else:
            loss = self.gamma * cross_entropy(logits, y, weight, count) + self.alpha * kl
        optimizer_step(module, loss)
        logs = {f"unlearn/{phase}_kl": kl.detach(), f"unlearn/{phase}_loss": loss.detach()}
        module.log_dict(logs, on_epoch=True, batch_size=len(weight))
        return loss

    def report(self) -> dict[str, Any]:
        return {
            **super().report(),
            "forget_batch_size": self.forget_batch_size,
            "msteps": self.msteps,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "gamma": self.gamma,
        }
