"""SharpnessProfiler under a real Trainer: file, logging, equality with the Trainer-free function, DDP."""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn.callbacks import SharpnessProfiler
from lightning_unlearn.curvature import SharpnessProfile, profile_model
from lightning_unlearn.run import TrainingRun


class UserModule(LightningModule):
    """A user's own classifier module: batches ``(x, y)``, no knowledge of this package."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def user_data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_profile_of_training_run_matches_standalone_function(poisoned_run):
    run = TrainingRun.from_path(poisoned_run)
    saved = SharpnessProfile.load(run.profile_path)
    assert saved.estimator == "exact" and saved.num_samples == 4000 and saved.dataset == "mnist"
    classifier = run.load_classifier()
    dm = run.datamodule()
    dm.setup("fit")
    again = profile_model(classifier, dm.profile_dataloader(batch_size=500), "exact")
    assert set(again.diagonals) == set(saved.diagonals)
    for name, diag in saved.diagonals.items():
        torch.testing.assert_close(diag, again.diagonals[name], rtol=1e-4, atol=1e-12)
    assert [s.name for s in saved.layer_stats()] == ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]


def test_profiler_on_a_users_trainer_with_inference_mode(tmp_path):
    data = user_data()
    profiler = SharpnessProfiler(dataloader=DataLoader(data, batch_size=32), dirpath=str(tmp_path), progress=False)
    model = UserModule()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        inference_mode=True,
        callbacks=[profiler],
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))
    assert profiler.path is not None and profiler.path.is_file()
    reference = profile_model(model, DataLoader(data, batch_size=7), "exact")
    loaded = SharpnessProfile.load(profiler.path)
    for name, diag in reference.diagonals.items():
        torch.testing.assert_close(loaded.diagonals[name], diag, rtol=1e-5, atol=1e-10)
    assert profiler.state_dict()["num_samples"] == 96

    events = list((tmp_path / "lightning_logs").rglob("events.out.tfevents.*"))
    tags = {"scalars": set(), "histograms": set(), "images": set()}
    for path in events:
        accumulator = EventAccumulator(str(path), size_guidance={"histograms": 0, "images": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    assert {"sharpness/body.0", "sharpness/body.4"} <= tags["scalars"]
    assert {"sharpness_hist/body.0", "sharpness_hist/body.4"} <= tags["histograms"]
    assert "sharpness/mean_diagonal_per_layer" in tags["images"]


def test_profiler_tolerates_fast_dev_run_and_no_logger(tmp_path):
    data = user_data(32)
    profiler = SharpnessProfiler(dataloader=DataLoader(data, batch_size=16), progress=False)
    trainer = Trainer(
        accelerator="cpu",
        fast_dev_run=True,
        callbacks=[profiler],
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
    )
    trainer.fit(UserModule(), DataLoader(data, batch_size=16))
    assert profiler.profile is not None and profiler.path is None  # computed, nothing written under fast_dev_run


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"estimator": "newton"}, "`estimator`"), ({"split": "test"}, "`split`"), ({"max_samples": 0}, "`max_samples`")],
)
def test_bad_profiler_arguments(kwargs, argument):
    with pytest.raises(MisconfigurationException, match=argument):
        SharpnessProfiler(**kwargs)


class ShardedUserModule(UserModule):
    """The user's module with a datamodule-like train_dataset, so the profiler shards it across ranks."""

    def train_dataloader(self):
        return DataLoader(user_data(), batch_size=16)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ddp_two_processes_equal_one(tmp_path):
    torch.manual_seed(0)
    model = ShardedUserModule()
    profiler = SharpnessProfiler(dirpath=str(tmp_path), batch_size=10, progress=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        callbacks=[profiler],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model)
    ddp = SharpnessProfile.load(tmp_path / "sharpness_profile.pt")
    assert ddp.num_samples == 96 and ddp.metadata["world_size"] == 2
    single = profile_model(model, DataLoader(user_data(), batch_size=13), "exact")
    for name, diag in single.diagonals.items():
        torch.testing.assert_close(ddp.diagonals[name], diag, rtol=1e-5, atol=1e-10)
