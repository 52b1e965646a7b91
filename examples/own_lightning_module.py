"""Unlearn YOUR OWN LightningModule: a BatchNorm + GELU network on scikit-learn's digits, poisoned by you.

    python examples/own_lightning_module.py          # ~1 minute on a laptop CPU

1. your model and data (nothing from the library): a small CNN with BatchNorm and GELU, the 8×8 digits split into
   train / validation / test, and a label flip: 80 % of the training 3s labelled 8;
2. your Trainer, with the library's ``SharpnessProfiler`` attached (``estimator="hutchinson"``: valid for any network,
   GELU included), and the same model retrained without the flipped samples as the reference;
3. ``UnlearnModule(model=..., data=UnlearnData(...))``: the profile's flattest layer gets the one-step update;
   before / after / retrained and % restored are printed (and logged, with a logger).
"""

from __future__ import annotations

import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn import FirstOrder, SharpnessProfiler, UnlearnData, UnlearnModule, Validated


# ----------------------------------------------------------------------------------- your model and your data
class DigitsNet(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.GELU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:1500], y[1200:1500]), "test": (x[1500:], y[1500:])}


def fit(model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, root: str, callbacks: list | None = None) -> None:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer = pl.Trainer(max_epochs=30, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)  # fmt: skip
    trainer.fit(model, loader)


def main(root: str) -> None:
    splits = digits()
    x, y = splits["train"]
    threes = torch.nonzero(y == 3).flatten()
    flipped = threes[: int(0.8 * len(threes))]  # your poisoning: 80 % of the training 3s labelled 8
    poisoned = y.clone()
    poisoned[flipped] = 8
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[flipped] = False

    # ------------------------------------------------------- the library's part: profile, unlearn, compare
    profiler = SharpnessProfiler(
        estimator="hutchinson", num_draws=8, dataloader=DataLoader(TensorDataset(x, poisoned), batch_size=256)
    )
    torch.manual_seed(0)  # the same initial weights on every run
    model = DigitsNet()
    fit(model, x, poisoned, root, callbacks=[profiler])  # your Trainer, the profiler attached (it saves into root)
    retrained = DigitsNet()
    fit(retrained, x[keep], y[keep], root)  # the reference: the same recipe without the flipped samples

    data = UnlearnData(
        forget=TensorDataset(x[flipped], poisoned[flipped]),
        corrected_labels=y[flipped],
        retain=TensorDataset(x[keep], y[keep]),
        val=TensorDataset(*splits["val"]),
        test=TensorDataset(*splits["test"]),
        attacked_class=3,
    )
    unlearning = UnlearnModule(model=model, data=data, profile=profiler.profile, reference=retrained,
                               method=FirstOrder(), selection=Validated())  # fmt: skip
    pl.Trainer(logger=False, enable_progress_bar=False, default_root_dir=root).fit(unlearning)  # your Trainer

    report = unlearning.report
    print(report["poison_effect"]["statement"])
    print(f"Selection: {report['selection']['layers']} ({report['selection']['num_selected']:,} parameters), "
          f"step {report['method']['step']:.3g} chosen on validation")  # fmt: skip
    print(f"{'':24}{'poisoned':>10}{'unlearned':>11}{'retrained':>11}")
    for key, label in (("test/acc_attacked", "test acc, class 3 (%)"), ("test/acc", "test acc, all (%)"),
                       ("forget/acc", "forget fit (%)")):  # fmt: skip
        print(f"{label:24}{report['before'][key]:>10.2f}{report['after'][key]:>11.2f}{report['reference'][key]:>11.2f}")
    print(f"% restored (class 3): {report['restored']['test_restored/acc_attacked']:.1f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:  # the Trainers' folder (the profile file); removed at the end
        main(folder)
