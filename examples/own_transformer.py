"""Unlearn YOUR OWN transformer: a tiny Vision Transformer on scikit-learn's digits, dict batches, a label flip.

    python examples/own_transformer.py          # ~1 minute on a laptop CPU

1. your model and data (nothing from the library): patch embedding, a learnt positional embedding, two pre-norm
   ``nn.TransformerEncoderLayer`` (attention, GELU, LayerNorm), mean-pool, head; AdamW with a one-cycle schedule;
   items are dicts ``{"pixels", "target"}``; you poison 80 % of the training 3s as 8s;
2. your Trainer, with the library's ``SharpnessProfiler`` attached: the exact diagonal of the generalised Gauss-Newton
   matrix, attention and LayerNorm included (``strict=False``: for a transformer it is the GGN's, not the Hessian's);
3. the recommended request: ``UnlearnModule(model=..., data=UnlearnData(...))`` with its defaults (``Auto``: the
   method, the selection and the step chosen by the forgetting target's criterion, without the retrained model),
   ``batch_transform`` reading your dict items; before / after / retrained are printed.
"""

from __future__ import annotations

import tempfile
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader

from lightning_unlearn import SharpnessProfiler, UnlearnData, UnlearnModule

# your own choice, unrelated to the library: small loaders need no worker processes
warnings.filterwarnings("ignore", message=".*does not have many workers", category=PossibleUserWarning)


# ----------------------------------------------------------------------------------- your model and your data
class TinyViT(pl.LightningModule):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, epochs: int = 25) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.patches = nn.Conv2d(1, dim, kernel_size=2, stride=2)  # 8×8 digits → 16 tokens
        self.positions = nn.Parameter(torch.randn(16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(pixels).flatten(2).transpose(1, 2) + self.positions
        return self.head(self.norm(self.encoder(tokens)).mean(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["pixels"]), batch["target"])

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.05)
        steps = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def items(x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"pixels": xi, "target": yi} for xi, yi in zip(x, y, strict=True)]


def digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return {"train": (x[:1200], y[:1200]), "val": (x[1200:1500], y[1200:1500]), "test": (x[1500:], y[1500:])}


def fit(model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, root: str, callbacks: list | None = None) -> None:
    torch.manual_seed(0)
    loader = DataLoader(items(x, y), batch_size=64, shuffle=True)
    trainer = pl.Trainer(max_epochs=model.hparams.epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
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
    def read(item: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # your items → (inputs, label)
        return item["pixels"], item["target"]

    profile_data = DataLoader(items(x, poisoned), batch_size=256)
    profiler = SharpnessProfiler(estimator="exact", strict=False, dataloader=profile_data, batch_transform=read)
    torch.manual_seed(0)  # the same initial weights on every run
    model = TinyViT()
    fit(model, x, poisoned, root, callbacks=[profiler])  # your Trainer, the profiler attached
    retrained = TinyViT()
    fit(retrained, x[keep], y[keep], root)  # the reference: the same recipe without the flipped samples

    data = UnlearnData(
        forget=items(x[flipped], poisoned[flipped]),
        corrected_labels=y[flipped],
        retain=items(x[keep], y[keep]),
        val=items(*splits["val"]),
        test=items(*splits["test"]),
        attacked_class=3,
        batch_transform=read,
    )
    # the defaults: Auto, choosing between the last layer and the profile's flattest layer
    unlearning = UnlearnModule(model=model, data=data, profile=profiler.profile, reference=retrained)
    trainer = pl.Trainer(max_epochs=unlearning.max_epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root)  # fmt: skip
    trainer.fit(unlearning)  # your Trainer

    report = unlearning.report
    profile = profiler.profile
    print(f"Profile: {profile.estimator}, the {profile.metadata['diagonal']} diagonal of {profile.num_samples} samples")
    print(report["poison_effect"]["statement"])
    print(f"Auto chose: {report['method']['direction']} on {report['selection']['layers']}, "
          f"step {report['method']['step']:.3g}; {report['target']['statement']}")  # fmt: skip
    print(f"{'':24}{'poisoned':>10}{'unlearned':>11}{'retrained':>11}")
    for key, label in (("test/acc_attacked", "test acc, class 3 (%)"), ("test/acc", "test acc, all (%)"),
                       ("forget/acc", "forget fit (%)")):  # fmt: skip
        print(f"{label:24}{report['before'][key]:>10.2f}{report['after'][key]:>11.2f}{report['reference'][key]:>11.2f}")
    print(f"% restored (class 3): {report['restored']['test_restored/acc_attacked']:.1f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:  # the Trainers' folder (the profile file); removed at the end
        main(folder)
