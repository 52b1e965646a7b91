"""The poisoned data module: exact forget / corrected-forget / retain sets, clean validation, record handling."""

import pytest
import torch

from lightning_unlearn.data import PoisonedDataModule, PoisonRecord, PoisonSpec


def _collect(loader):
    xs, ys, idx = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


@pytest.fixture(scope="module")
def dm():
    module = PoisonedDataModule(
        "mnist",
        poison=PoisonSpec("targeted", count=150, target_class=9, seed=1),
        train_subset=3000,
        eval_batch_size=500,
    )
    module.setup("fit")
    return module


def test_subsets_are_exact(dm, mnist):
    record = dm.record
    assert len(record) == 150 and set(record.true_labels) == {9}
    _, y_forget, i_forget = _collect(dm.forget_dataloader())
    _, y_true, i_true = _collect(dm.corrected_forget_dataloader())
    _, y_retain, i_retain = _collect(dm.retain_dataloader())
    assert i_forget.tolist() == i_true.tolist() == record.indices
    assert y_forget.tolist() == record.poisoned_labels and y_true.tolist() == record.true_labels
    assert sorted(i_retain.tolist() + i_forget.tolist()) == list(range(3000))
    assert torch.equal(y_retain, mnist.train.labels[i_retain])  # retain labels are clean


def test_train_set_carries_poisoned_labels_and_index(dm, mnist):
    x, y, idx = _collect(dm.profile_dataloader())
    assert idx.tolist() == list(range(3000))
    expected = mnist.train.labels[:3000].clone()
    expected[torch.tensor(dm.record.indices)] = torch.tensor(dm.record.poisoned_labels)
    assert torch.equal(y, expected)
    # normalised images: the raw bytes are recoverable
    raw = ((x * 0.3081 + 0.1307) * 255).round().to(torch.uint8)
    assert torch.equal(raw, mnist.train.images[:3000])
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 3 and batch[0].shape == (128, 1, 28, 28)


def test_validation_and_test_are_clean(dm, mnist):
    _, y_val, _ = _collect(dm.val_dataloader())
    assert torch.equal(y_val, mnist.val.labels)
    loaders = dm.test_dataloader()
    assert dm.test_split_names == ["test", "forget", "forget_true"] and len(loaders) == 3
    assert torch.equal(_collect(loaders[0])[1], mnist.test.labels)


def test_drop_poisoned_trains_on_retain_only():
    module = PoisonedDataModule(
        "mnist", poison=PoisonSpec("untargeted", count=100), train_subset=1000, drop_poisoned=True
    )
    module.setup("fit")
    _, _, idx = _collect(module.profile_dataloader())
    assert len(idx) == 900 and not set(idx.tolist()) & set(module.record.indices)


def test_reuses_and_validates_a_saved_record(dm, tmp_path):
    path = dm.record.save(tmp_path / "poison.json")
    again = PoisonedDataModule("mnist", poison_record=str(path), train_subset=3000)
    again.setup("fit")
    assert again.record.to_dict() == dm.record.to_dict()
    wrong_size = PoisonedDataModule("mnist", poison_record=str(path), train_subset=2000)
    with pytest.raises(ValueError, match="3000 samples"):
        wrong_size.setup("fit")
    tampered = dm.record.to_dict()
    tampered["true_labels"] = [(t + 1) % 10 for t in tampered["true_labels"]]
    tampered["poisoned_labels"] = [(t + 2) % 10 for t in tampered["true_labels"]]
    PoisonRecord(**tampered).save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="recorded true labels differ"):
        PoisonedDataModule("mnist", poison_record=str(tmp_path / "other.json"), train_subset=3000).setup("fit")


def test_checkpoint_state_roundtrip(dm):
    fresh = PoisonedDataModule("mnist")
    fresh.load_state_dict(dm.state_dict())
    assert fresh.record.to_dict() == dm.record.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"dataset": "svhn"}, "`dataset`"), ({"batch_size": 0}, "`batch_size`"), ({"train_subset": 0}, "`train_subset`")],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        PoisonedDataModule(**kwargs)


def test_impossible_poison_for_subset_is_clear():
    module = PoisonedDataModule("mnist", poison=PoisonSpec("targeted", count=500, target_class=9), train_subset=1000)
    with pytest.raises(ValueError, match="`count` asks for 500.*class 9"):
        module.setup("fit")


# ----------------------------------------------------------------------------------------- backdoor, label flip
@pytest.fixture(scope="module")
def backdoor():
    spec = PoisonSpec("backdoor", count=120, target_class=0, trigger_position="top_left", seed=2)
    module = PoisonedDataModule("mnist", poison=spec, train_subset=3000, eval_batch_size=500)
    module.setup("fit")
    return module


def _raw(x):
    return ((x * 0.3081 + 0.1307) * 255).round().to(torch.uint8)


def test_backdoor_stamps_exactly_the_poisoned_training_images(backdoor, mnist):
    x, y, idx = _collect(backdoor.profile_dataloader())
    poisoned = torch.zeros(3000, dtype=torch.bool)
    poisoned[torch.tensor(backdoor.record.indices)] = True
    raw = _raw(x)
    assert (raw[poisoned][:, :, 1:4, 1:4] == 255).all()  # the trigger, on every poisoned image
    assert torch.equal(raw[~poisoned], mnist.train.images[:3000][~poisoned])  # every other image untouched
    assert (y[poisoned] == 0).all()
    # forget set: triggered inputs, target label; corrected set: the same inputs, true labels; retain: clean
    xf, yf, _ = _collect(backdoor.forget_dataloader())
    xt, yt, _ = _collect(backdoor.corrected_forget_dataloader())
    assert torch.equal(xf, xt) and (yf == 0).all() and yt.tolist() == backdoor.record.true_labels
    xr, _, _ = _collect(backdoor.retain_dataloader())
    assert torch.equal(_raw(xr), mnist.train.images[:3000][~poisoned])


def test_backdoor_triggered_test_set_and_split_names(backdoor, mnist):
    assert backdoor.test_split_names == ["test", "forget", "forget_true", "triggered"]
    x, y, _ = _collect(backdoor.triggered_test_dataloader())
    others = mnist.test.labels != 0
    assert len(y) == int(others.sum()) and (y == 0).all()
    expected = mnist.test.images[others].clone()
    expected[:, :, 1:4, 1:4] = 255
    assert torch.equal(_raw(x), expected)
    assert len(backdoor.test_dataloader()) == 4


def test_poisoned_validation_applies_the_same_poison_to_validation_images(backdoor, mnist):
    x, y, _ = _collect(backdoor.poisoned_validation_dataloader())
    share = 120 / int((mnist.train.labels[:3000] != 0).sum())  # the training poison's share of its candidates
    assert len(y) == round(share * int((mnist.val.labels != 0).sum())) and (y == 0).all()
    assert (_raw(x)[:, :, 1:4, 1:4] == 255).all()


def test_label_flip_padding_and_channels(mnist):
    spec = PoisonSpec("label_flip", count=100, source_class=9, target_class=4)
    module = PoisonedDataModule("mnist", poison=spec, train_subset=2000, pad_to=32, repeat_channels=3)
    module.setup("fit")
    assert (module.attacked_class, module.in_channels, module.image_size) == (9, 3, 32)
    x, y, idx = next(iter(module.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    black = (0 - 0.1307) / 0.3081
    assert torch.allclose(x[:, :, :2, :], torch.full_like(x[:, :, :2, :], black))  # the padding is black
    assert torch.equal(_raw(x[:, :1, 2:30, 2:30]), mnist.val.images[: len(x)])
    _, yv, _ = _collect(module.poisoned_validation_dataloader())
    assert (yv == 4).all()
    with pytest.raises(ValueError, match="backdoor"):
        module.triggered_test_dataloader()


def test_training_without_a_logger_writes_no_record_into_the_working_directory(tmp_path, monkeypatch):
    """A Trainer with ``logger=False`` has no run directory; its ``log_dir`` is the working directory, where the
    record must not land (it once overwrote a file of that name there)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_unlearn.models import ClassifierModule

    monkeypatch.chdir(tmp_path)
    data = PoisonedDataModule("mnist", poison=PoisonSpec("targeted", count=20, seed=0), train_subset=200)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
    )
    trainer.fit(ClassifierModule(), datamodule=data)
    assert list(tmp_path.iterdir()) == []
    logged = tmp_path / "logged"
    trainer = pl.Trainer(
        max_steps=1, logger=CSVLogger(logged, name="run"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(ClassifierModule(), datamodule=PoisonedDataModule(
        "mnist", poison=PoisonSpec("targeted", count=20, seed=0), train_subset=200))
    assert (logged / "run" / "version_0" / "poison.json").is_file()
