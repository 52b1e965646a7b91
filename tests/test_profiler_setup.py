"""SharpnessProfiler fails before training, not after it: setup checks (architecture, data source, one batch's
output), its ``loss_fn`` / ``batch_transform`` / ``output_transform`` options, ``strict=False``, the progress bar,
the checkpointed path, the documented attributes and the profile's short ``repr`` (issue 15, item 2)."""

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_unlearn.callbacks import SharpnessProfiler
from lightning_unlearn.curvature import SharpnessProfile, profile_model


def mlp(*middle: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), *middle, nn.Linear(5, 3))


class Counting(LightningModule):
    """A user's module that counts training steps and records how ``forward`` ran before the first one."""

    def __init__(self, body: nn.Module, features: bool = False, dict_batches: bool = False):
        super().__init__()
        self.body = body
        self.features = features  # forward returns (logits, features)
        self.dict_batches = dict_batches  # batches are {"pixels": x, "cls": y}
        self.steps = 0
        self.early_forwards: list[tuple[bool, bool]] = []  # (training mode, grad enabled) before the first step

    def forward(self, x):
        if self.steps == 0:
            self.early_forwards.append((self.training, torch.is_grad_enabled()))
        logits = self.body(x)
        return (logits, x) if self.features else logits

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = (batch["pixels"], batch["cls"]) if self.dict_batches else batch
        out = self(x)
        return F.cross_entropy(out[0] if self.features else out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


class DictData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24):
        self.inner = data(n)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        x, y = self.inner[i]
        return {"pixels": x, "cls": y}


class TrainOnly(LightningDataModule):
    def train_dataloader(self):
        return DataLoader(data(), batch_size=8)


class TrainAndVal(TrainOnly):
    def val_dataloader(self):
        return DataLoader(data(10, seed=1), batch_size=5)


def trainer(tmp_path, profiler, **kwargs) -> Trainer:
    options = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        **kwargs,
    }
    return Trainer(callbacks=[profiler, *options.pop("callbacks", [])], **options)


def fit(tmp_path, model, profiler, loader=None, datamodule=None, **kwargs) -> Trainer:
    t = trainer(tmp_path, profiler, **kwargs)
    if datamodule is not None:
        t.fit(model, datamodule=datamodule)
    else:
        t.fit(model, loader if loader is not None else DataLoader(data(), batch_size=8))
    return t


def assert_advice_exists(message: str) -> None:
    """Every ``option=`` an error message advises is an argument of ``SharpnessProfiler``."""
    advised = set(re.findall(r"\b([a-z_]+)=", message))
    assert advised, message
    assert advised <= set(inspect.signature(SharpnessProfiler).parameters), (advised, message)


def refused_before_training(tmp_path, model, profiler, match, **fit_kwargs) -> str:
    with pytest.raises(MisconfigurationException, match=match) as info:
        fit(tmp_path, model, profiler, **fit_kwargs)
    assert model.steps == 0  # raised before the first training step, not after the fit
    message = str(info.value)
    assert_advice_exists(message)
    return message


# ----------------------------------------------------------------------------------------- refused before training
def test_gelu_under_exact_is_refused_before_the_first_training_step(tmp_path):
    message = refused_before_training(
        tmp_path, Counting(mlp(nn.GELU())), SharpnessProfiler(progress=False), r"'body.1' \(GELU\)"
    )
    assert "estimator='hutchinson'" in message and "strict=False" in message


def test_val_split_without_a_datamodule_or_its_val_loader_is_refused_before_training(tmp_path):
    refused_before_training(
        tmp_path, Counting(mlp(nn.ReLU())), SharpnessProfiler(split="val"), r"split='val'.*no datamodule.*dataloader="
    )
    refused_before_training(
        tmp_path,
        Counting(mlp(nn.ReLU())),
        SharpnessProfiler(split="val"),
        r"TrainOnly without one.*dataloader=",
        datamodule=TrainOnly(),
    )
    profiler = SharpnessProfiler(split="val", progress=False)  # with a val_dataloader it profiles the validation set
    fit(tmp_path, Counting(mlp(nn.ReLU())), profiler, datamodule=TrainAndVal(), limit_val_batches=0)
    assert profiler.profile.num_samples == 10


def test_a_model_returning_logits_and_features_is_refused_naming_output_transform_which_works(tmp_path):
    for estimator in ("exact", "hutchinson"):
        message = refused_before_training(
            tmp_path,
            Counting(mlp(nn.ReLU()), features=True),
            SharpnessProfiler(estimator=estimator, progress=False),
            r"forward returns a tuple of 2 items .*`output_transform=`",
        )
        assert "loss_fn" not in message  # the advice is the option that exists and fixes it
    model = Counting(mlp(nn.ReLU()), features=True)
    profiler = SharpnessProfiler(output_transform=lambda out: out[0], progress=False)
    fit(tmp_path, model, profiler)
    reference = profile_model(model.body, DataLoader(data(), batch_size=5), "exact")
    assert set(profiler.profile.diagonals) == {f"body.{k}" for k in reference.diagonals}  # the user's own names
    for name, diag in reference.diagonals.items():
        torch.testing.assert_close(profiler.profile.diagonals[f"body.{name}"], diag, rtol=1e-5, atol=1e-10)
    assert not model._forward_hooks  # the selection hook is gone after profiling

    bad = SharpnessProfiler(output_transform=lambda out: out[0].sum(1), progress=False)
    refused_before_training(tmp_path, Counting(mlp(nn.ReLU()), features=True), bad, r"`output_transform` returns")


def test_layernorm_profiles_after_fit_with_every_estimator_but_strict_exact(tmp_path):
    """A LayerNorm: ``exact`` with ``strict=True`` is refused before training (its GGN diagonal is not the Hessian's)
    and the message names both ways on; ``exact`` with ``strict=False``, ``mc``, ``fisher`` (the engine's generic
    path for the LayerNorm's parameters) and ``hutchinson`` profile after fit."""
    message = refused_before_training(
        tmp_path,
        Counting(mlp(nn.LayerNorm(5))),
        SharpnessProfiler(estimator="exact", strict=True, progress=False),
        r"'body.1' \(LayerNorm\).*strict=False for the exact GGN diagonal.*estimator='hutchinson'",
    )
    assert "cannot profile" not in message
    choices = (("exact", {"strict": False}), ("mc", {}), ("fisher", {}), ("hutchinson", {"num_draws": 2}))
    for estimator, options in choices:
        model = Counting(mlp(nn.LayerNorm(5)))
        profiler = SharpnessProfiler(estimator=estimator, progress=False, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not piecewise linear: the GGN diagonal"
            fit(tmp_path / estimator, model, profiler)
        assert {"body.1.weight", "body.1.bias"} <= set(profiler.profile.diagonals)
        assert all(torch.isfinite(d).all() for d in profiler.profile.diagonals.values())


def test_strict_false_computes_the_ggn_diagonal_of_a_gelu_network(tmp_path):
    model = Counting(mlp(nn.GELU()))
    profiler = SharpnessProfiler(strict=False, progress=False)
    fit(tmp_path, model, profiler)
    assert profiler.profile.metadata["diagonal"] == "ggn"  # what it holds, recorded (GELU: not the Hessian's)
    reference = profile_model(model, DataLoader(data(), batch_size=7), "exact", strict=False)
    for name, diag in reference.diagonals.items():
        torch.testing.assert_close(profiler.profile.diagonals[name], diag, rtol=1e-5, atol=1e-10)


def test_batch_transform_and_loss_fn_are_options_checked_before_training(tmp_path):
    loader = DataLoader(DictData(), batch_size=8)
    refused_before_training(
        tmp_path,
        Counting(mlp(nn.Tanh()), dict_batches=True),
        SharpnessProfiler(estimator="hutchinson", progress=False),
        r"batch_transform=",
        loader=loader,
    )
    per_sample = SharpnessProfiler(  # reduction="none": not a scalar
        estimator="hutchinson", loss_fn=lambda z, y: F.cross_entropy(z, y, reduction="none"), progress=False
    )
    refused_before_training(tmp_path, Counting(mlp(nn.Tanh())), per_sample, r"`loss_fn` must return a floating scalar")

    def smooth(z, y):
        return F.cross_entropy(z, y, label_smoothing=0.3)

    def pair(batch):
        return batch["pixels"], batch["cls"]

    model = Counting(mlp(nn.Tanh()), dict_batches=True)
    profiler = SharpnessProfiler(estimator="hutchinson", loss_fn=smooth, batch_transform=pair, seed=3, progress=False)
    fit(tmp_path, model, profiler, loader=loader)
    tensors = DataLoader(data(), batch_size=24)  # the same samples as the profiler's one batch of 24, unshuffled
    ours = profile_model(model, tensors, "hutchinson", loss_fn=smooth, seed=3)
    plain = profile_model(model, tensors, "hutchinson", seed=3)
    for name, diag in ours.diagonals.items():
        torch.testing.assert_close(profiler.profile.diagonals[name], diag, rtol=1e-5, atol=1e-10)
    assert any(not torch.allclose(ours.diagonals[n], plain.diagonals[n]) for n in ours.diagonals)  # loss_fn is used

    with pytest.raises(MisconfigurationException, match=r"`loss_fn` is used by estimator='hutchinson' only") as info:
        SharpnessProfiler(estimator="exact", loss_fn=smooth)
    assert_advice_exists(str(info.value))


# ------------------------------------------------------------------------------------ the check changes nothing
class Noisy(Counting):
    """Dropout, BatchNorm and a random draw in every forward pass (also in eval mode): any RNG use would show."""

    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 3)))

    def forward(self, x):
        return super().forward(x + 0.1 * torch.randn_like(x))


def test_the_one_batch_check_runs_in_eval_mode_with_one_curvature_product_and_changes_no_training(tmp_path):
    """The check before training: one gradient-free forward on the batch (inputs, logits, targets, loss), then one
    real curvature product on two of its samples (so an estimator that cannot run fails before training), all in eval
    mode; the training that follows is bit for bit the one without the profiler."""
    def train(profiler):
        torch.manual_seed(0)
        model = Noisy()
        loader = DataLoader(data(48), batch_size=8, shuffle=True)
        callbacks = [] if profiler is None else [profiler]
        t = Trainer(
            accelerator="cpu",
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=str(tmp_path),
        )
        t.fit(model, loader)
        return model

    plain = train(None)
    # estimator "fisher": BatchNorm and Dropout are fine for it, and the check runs on the shuffled training loader
    checked = train(SharpnessProfiler(estimator="fisher", progress=False, log_figure=False))
    assert checked.early_forwards[0] == (False, False)  # the plain forward: eval mode, no gradient
    assert len(checked.early_forwards) > 1 and any(grad for _, grad in checked.early_forwards[1:])  # the product
    assert not any(training for training, _ in checked.early_forwards)  # all of it in eval mode
    assert plain.early_forwards == []
    for (name, a), b in zip(plain.state_dict().items(), checked.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics bit-identical
    assert checked.training  # modes restored


# ------------------------------------------------------------------------------ progress bar, state, docs, repr
def test_the_progress_bar_follows_the_trainers_enable_progress_bar(tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs.get("desc"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    fit(tmp_path, Counting(mlp(nn.ReLU())), SharpnessProfiler(), enable_progress_bar=False)
    assert not [d for d in bars if d and d.startswith("Hessian diagonal")]
    fit(tmp_path, Counting(mlp(nn.ReLU())), SharpnessProfiler(), enable_progress_bar=True)
    assert [d for d in bars if d and d.startswith("Hessian diagonal")]


def test_every_checkpoint_carries_the_profiles_path(tmp_path):
    profiler = SharpnessProfiler(progress=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fit(tmp_path, Counting(mlp(nn.ReLU())), profiler, max_epochs=2, enable_checkpointing=True, callbacks=[checkpoints])
    assert profiler.path == tmp_path / "sharpness_profile.pt" and profiler.path.is_file()
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(saved) == 2  # after each epoch, i.e. before on_train_end writes the profile
    for path in saved:
        state = torch.load(path, weights_only=True)["callbacks"][profiler.state_key]
        assert state["path"] == str(profiler.path)
    assert SharpnessProfile.load(state["path"]).num_samples == 24
    resumed = SharpnessProfiler()
    resumed.load_state_dict(state)
    assert resumed.path == profiler.path


def test_public_attributes_and_options_are_documented():
    doc = SharpnessProfiler.__doc__
    for name in ("profile", "path", "seconds", *inspect.signature(SharpnessProfiler).parameters):
        assert re.search(rf"^\s+{name}:", doc, re.MULTILINE), name


def test_the_profile_repr_is_one_short_line():
    model = mlp(nn.ReLU())
    profile = profile_model(model, DataLoader(data(), batch_size=8), "exact")
    text = repr(profile)
    assert "\n" not in text and "tensor" not in text and len(text) < 200, text
    assert text.startswith("SharpnessProfile(estimator='exact', num_samples=24") and "parameters=53 in 2 layers" in text
    assert str(profile) == text
