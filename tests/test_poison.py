"""Poisoning: exact counts, reproducibility, every impossible spec -> a clear error, record round trip/validation."""

import json

import pytest
import torch

from lightning_unlearn.data.poison import PoisonRecord, PoisonSpec, Trigger, make_poison

LABELS = torch.arange(10).repeat_interleave(100)  # 1,000 samples, 100 per class


@pytest.mark.parametrize(
    "spec",
    [
        PoisonSpec("targeted", count=40, target_class=9),
        PoisonSpec("targeted", count=40, target_class=3, poison_label=5),
        PoisonSpec("targeted", fraction=0.5, target_class=9),
        PoisonSpec("untargeted", count=250, target_class=None),
        PoisonSpec("untargeted", fraction=0.05, target_class=None),
        PoisonSpec("pairflip", count=300, target_class=None),
    ],
)
def test_exact_count_and_wrong_labels(spec):
    record = make_poison(LABELS, 10, spec, "toy")
    expected = (
        spec.count if spec.count is not None else round(spec.fraction * (100 if spec.kind == "targeted" else 1000))
    )
    assert len(record) == len(set(record.indices)) == expected
    assert record.indices == sorted(record.indices)
    idx = torch.tensor(record.indices)
    assert torch.equal(torch.tensor(record.true_labels), LABELS[idx])
    true, poisoned = torch.tensor(record.true_labels), torch.tensor(record.poisoned_labels)
    assert (true != poisoned).all()
    assert ((poisoned >= 0) & (poisoned < 10)).all()
    if spec.kind == "targeted":
        assert (true == spec.target_class).all()
        if spec.poison_label is not None:
            assert (poisoned == spec.poison_label).all()
    if spec.kind == "pairflip":
        assert torch.equal(poisoned, 9 - true)


def test_random_wrong_labels_cover_all_other_classes():
    record = make_poison(LABELS, 10, PoisonSpec("untargeted", count=1000, target_class=None), "toy")
    shifts = (torch.tensor(record.poisoned_labels) - torch.tensor(record.true_labels)) % 10
    assert set(shifts.tolist()) == set(range(1, 10))


def test_reproducible_by_seed():
    a = make_poison(LABELS, 10, PoisonSpec("untargeted", count=100, target_class=None, seed=3), "toy")
    b = make_poison(LABELS, 10, PoisonSpec("untargeted", count=100, target_class=None, seed=3), "toy")
    c = make_poison(LABELS, 10, PoisonSpec("untargeted", count=100, target_class=None, seed=4), "toy")
    assert a.to_dict() == b.to_dict()
    assert a.indices != c.indices


def test_pairflip_skips_self_partner_class():
    labels = torch.arange(5).repeat_interleave(10)  # 5 classes: class 2 is its own partner
    record = make_poison(labels, 5, PoisonSpec("pairflip", fraction=1.0, target_class=None), "toy")
    assert len(record) == 40 and 2 not in record.true_labels


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"kind": "flip"}, "`kind`"),
        ({"kind": "targeted", "count": 10, "fraction": 0.1}, "`count` and `fraction`"),
        ({"kind": "targeted", "count": None, "fraction": None}, "`count` and `fraction`"),
        ({"kind": "targeted", "count": 0}, "`count`"),
        ({"kind": "targeted", "count": None, "fraction": 0.0}, "`fraction`"),
        ({"kind": "targeted", "count": None, "fraction": 1.5}, "`fraction`"),
        ({"kind": "targeted", "count": 10, "target_class": None}, "`target_class`"),
        ({"kind": "untargeted", "count": 10, "target_class": None, "poison_label": 3}, "`poison_label`"),
    ],
)
def test_invalid_spec_names_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        PoisonSpec(**kwargs)


@pytest.mark.parametrize(
    ("spec", "argument"),
    [
        (PoisonSpec("targeted", count=101, target_class=9), "`count`.*only 100 samples of class 9"),
        (PoisonSpec("targeted", count=10, target_class=10), "`target_class`"),
        (PoisonSpec("targeted", count=10, target_class=-1), "`target_class`"),
        (PoisonSpec("targeted", count=10, target_class=9, poison_label=9), "`poison_label`"),
        (PoisonSpec("targeted", count=10, target_class=9, poison_label=12), "`poison_label`"),
        (PoisonSpec("untargeted", count=1001, target_class=None), "`count`"),
        (PoisonSpec("untargeted", fraction=1e-5, target_class=None), "`fraction`"),
    ],
)
def test_impossible_for_dataset_names_argument(spec, argument):
    with pytest.raises(ValueError, match=argument):
        make_poison(LABELS, 10, spec, "toy")


def test_paper_setting_on_real_mnist_labels(mnist):
    """2,500 of class 9 fits real MNIST (4,988 nines in the 50k training split); 5,000 does not."""
    record = make_poison(mnist.train.labels, 10, PoisonSpec("targeted", count=2500, target_class=9), "mnist")
    assert len(record) == 2500 and set(record.true_labels) == {9}
    with pytest.raises(ValueError, match="only 4988 samples of class 9"):
        make_poison(mnist.train.labels, 10, PoisonSpec("targeted", count=5000, target_class=9), "mnist")


def test_record_roundtrip_apply_and_validate(tmp_path):
    record = make_poison(LABELS, 10, PoisonSpec("targeted", count=30, target_class=2), "toy")
    path = record.save(tmp_path / "poison.json")
    assert [p.name for p in tmp_path.iterdir()] == ["poison.json"]  # no temp file left behind
    loaded = PoisonRecord.load(path)
    assert loaded.to_dict() == record.to_dict()
    poisoned = loaded.apply(LABELS)
    changed = torch.nonzero(poisoned != LABELS).flatten().tolist()
    assert changed == record.indices and torch.equal(LABELS, torch.arange(10).repeat_interleave(100))

    with pytest.raises(ValueError, match="1000 samples"):
        loaded.validate(LABELS[:500])
    with pytest.raises(ValueError, match="recorded true labels differ"):
        loaded.validate(LABELS.flip(0))
    with pytest.raises(ValueError, match="made for dataset 'toy'"):
        loaded.validate(LABELS, dataset="mnist")


def test_record_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No poison record"):
        PoisonRecord.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"indices": [1, 2]')
    with pytest.raises(ValueError, match="not a valid poison record"):
        PoisonRecord.load(bad)
    record = make_poison(LABELS, 10, PoisonSpec("targeted", count=3, target_class=2), "toy").to_dict()
    record["poisoned_labels"] = record["true_labels"]
    bad.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="equals its true label"):
        PoisonRecord.load(bad)


# ------------------------------------------------------------------------------------ label flip and backdoor
def test_label_flip_moves_source_samples_to_one_target():
    record = make_poison(LABELS, 10, PoisonSpec("label_flip", fraction=0.5, source_class=9, target_class=4), "toy")
    assert len(record) == 50 and set(record.true_labels) == {9} and set(record.poisoned_labels) == {4}
    spec = PoisonSpec.from_dict(record.spec)
    assert spec.attacked_class == 9 and not spec.stamps_inputs


def test_backdoor_poisons_other_classes_or_one_source_with_the_target_label():
    record = make_poison(LABELS, 10, PoisonSpec("backdoor", count=200, target_class=0), "toy")
    assert len(record) == 200 and 0 not in record.true_labels and set(record.poisoned_labels) == {0}
    only = make_poison(LABELS, 10, PoisonSpec("backdoor", count=20, target_class=0, source_class=7), "toy")
    assert set(only.true_labels) == {7}
    spec = PoisonSpec("backdoor", count=20, target_class=0)
    assert spec.stamps_inputs and spec.attacked_class is None


@pytest.mark.parametrize(
    ("position", "rows", "cols"),
    [("bottom_right", (24, 27), (24, 27)), ("top_left", (1, 4), (1, 4)), ("top_right", (1, 4), (24, 27))],
)
def test_trigger_is_stamped_exactly_where_documented(position, rows, cols):
    images = torch.randint(0, 200, (5, 2, 28, 28), dtype=torch.uint8)
    stamped = Trigger(size=3, position=position, margin=1, value=255).stamp(images)
    patch = torch.zeros(28, 28, dtype=torch.bool)
    patch[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert (stamped[:, :, patch] == 255).all()
    assert torch.equal(stamped[:, :, ~patch], images[:, :, ~patch])  # nothing else touched
    assert images.max() < 255  # the input is not modified in place


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"kind": "label_flip", "count": 10, "target_class": 4}, "`source_class`"),
        ({"kind": "label_flip", "count": 10, "source_class": 4, "target_class": 4}, "must differ"),
        ({"kind": "backdoor", "count": 10, "target_class": 0, "trigger_position": "centre"}, "`trigger_position`"),
        ({"kind": "backdoor", "count": 10, "target_class": 0, "trigger_size": 0}, "`trigger_size`"),
        ({"kind": "backdoor", "count": 10, "target_class": 0, "trigger_value": 300}, "`trigger_value`"),
        ({"kind": "backdoor", "count": 10, "target_class": None}, "`target_class`"),
        ({"kind": "untargeted", "count": 10, "source_class": 3}, "`source_class`"),
    ],
)
def test_invalid_new_kinds_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        PoisonSpec(**kwargs)


def test_trigger_that_does_not_fit_and_unknown_spec_fields():
    with pytest.raises(ValueError, match="does not fit"):
        Trigger(size=8, margin=2).stamp(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="Unknown poison spec fields"):
        PoisonSpec.from_dict({"kind": "targeted", "count": 3, "colour": "red"})
    assert PoisonSpec.from_dict({"kind": "targeted", "count": 3}).trigger_size == 3  # older records: defaults
