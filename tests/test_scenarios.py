"""The forgetting scenarios: class-wise and random-sample forgetting on clean data (``PoisonSpec`` kinds
``classwise`` and ``random_sample``): exact records, the data module's loaders, the refusal of methods that need
corrected labels, the stated gap to forget, and the two configs."""

import json
from pathlib import Path

import pytest
import torch

from lightning_unlearn import Finetune, FirstOrder, LastLayer, NegGradPlus, SecondOrder, UnlearnModule
from lightning_unlearn.data import PoisonedDataModule, PoisonRecord, PoisonSpec, make_poison
from lightning_unlearn.evaluation.suite import HARM_NOISE, poison_effect
from lightning_unlearn.models.cnn import MnistCNN
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.unlearn.module import unlearn_trainer

ROOT = Path(__file__).resolve().parents[1]
#: 1,000 toy labels, 100 per class, interleaved (class c at positions c, c + 10, ...).
LABELS = torch.arange(10).repeat(100)
SUBSET = 600


def _collect(loader):
    xs, ys, idx = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


# ------------------------------------------------------------------------------------------------ spec and record
def test_classwise_record_is_the_whole_class_with_clean_labels():
    record = make_poison(LABELS, 10, PoisonSpec("classwise", target_class=3, seed=5), "toy")
    assert record.indices == list(range(3, 1000, 10))  # every sample of class 3, by hand
    assert record.true_labels == record.poisoned_labels == [3] * 100
    partial = make_poison(LABELS, 10, PoisonSpec("classwise", fraction=0.25, target_class=3), "toy")
    assert len(partial) == 25 and set(partial.indices) <= set(record.indices)
    assert make_poison(LABELS, 10, PoisonSpec("classwise", count=7, target_class=3), "toy").true_labels == [3] * 7


def test_random_sample_record_is_the_seeded_fraction_with_clean_labels():
    spec = PoisonSpec("random_sample", fraction=0.1, target_class=None, seed=7)
    record = make_poison(LABELS, 10, spec, "toy")
    # the seeded draw by hand: a permutation of all positions from the spec's seed, its first 10 %, sorted
    expected = torch.randperm(1000, generator=torch.Generator().manual_seed(7))[:100].sort().values
    assert record.indices == expected.tolist()
    assert record.true_labels == record.poisoned_labels == LABELS[expected].tolist()
    assert len(set(record.true_labels)) > 1  # any class
    assert make_poison(LABELS, 10, spec, "toy").to_dict() == record.to_dict()  # reproducible from the seed
    other = make_poison(LABELS, 10, PoisonSpec("random_sample", fraction=0.1, target_class=None, seed=8), "toy")
    assert other.indices != record.indices


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "random_sample", "target_class": None}, "`count` and `fraction`"),
        ({"kind": "classwise", "count": 5, "fraction": 0.5}, "`count` and `fraction`"),
        ({"kind": "classwise", "target_class": None}, "`target_class`"),
        ({"kind": "classwise", "source_class": 2}, "`source_class`"),
        ({"kind": "random_sample", "fraction": 1.5}, "`fraction`"),
    ],
)
def test_invalid_scenario_spec_names_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoisonSpec(**kwargs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PoisonSpec("classwise", target_class=10), "`target_class` must lie in"),
        (PoisonSpec("classwise", count=101, target_class=3), "`count` asks for 101 samples to forget.*only 100"),
        (PoisonSpec("random_sample", fraction=1e-5, target_class=None), "`fraction`=1e-05 forgets no sample"),
    ],
)
def test_impossible_scenario_names_argument(spec, message):
    with pytest.raises(ValueError, match=message):
        make_poison(LABELS, 10, spec, "toy")


def test_classwise_of_an_absent_class_is_refused():
    with pytest.raises(ValueError, match="`target_class`=9 forgets no sample of 0 samples of class 9"):
        make_poison(torch.arange(9).repeat(10), 10, PoisonSpec("classwise", target_class=9), "toy")


@pytest.mark.parametrize("kind", ["classwise", "random_sample"])
def test_record_roundtrip_and_tampering_is_caught(kind, tmp_path):
    spec = PoisonSpec(kind, target_class=4, seed=1) if kind == "classwise" else PoisonSpec(kind, fraction=0.05, seed=1)
    record = make_poison(LABELS, 10, spec, "toy")
    path = record.save(tmp_path / "poison.json")
    loaded = PoisonRecord.load(path)
    assert loaded.to_dict() == record.to_dict()
    loaded.validate(LABELS, dataset="toy", num_classes=10)
    assert torch.equal(loaded.apply(LABELS), LABELS)  # the training labels stay clean

    def tampered(**change):
        data = record.to_dict() | change
        (tmp_path / "bad.json").write_text(json.dumps(data))
        return tmp_path / "bad.json"

    # a relabelled sample: caught when loaded
    relabelled = record.poisoned_labels[:-1] + [(record.poisoned_labels[-1] + 1) % 10]
    with pytest.raises(ValueError, match="differs from its true label"):
        PoisonRecord.load(tampered(poisoned_labels=relabelled))
    # one sample dropped: consistent in itself, caught against the data (not the seeded draw)
    dropped = tampered(indices=record.indices[1:], true_labels=record.true_labels[1:],
                       poisoned_labels=record.poisoned_labels[1:])  # fmt: skip
    with pytest.raises(ValueError, match="not the ones its spec draws.*lists (49|99) samples, the spec draws (50|100)"):
        PoisonRecord.load(dropped).validate(LABELS, dataset="toy", num_classes=10)
    # another seed in the spec: the same samples are no longer what it draws (classwise: the whole class either way)
    reseeded = PoisonRecord.load(tampered(spec=record.spec | {"seed": 2}))
    if kind == "random_sample":
        with pytest.raises(ValueError, match="not the ones its spec draws"):
            reseeded.validate(LABELS, dataset="toy", num_classes=10)
    else:
        reseeded.validate(LABELS, dataset="toy", num_classes=10)
        # a sample of another class swapped in: caught by its class
        swapped = sorted(record.indices[1:] + [5])
        with pytest.raises(ValueError, match="`true_labels` do not follow the spec"):
            PoisonRecord(swapped, LABELS[swapped].tolist(), LABELS[swapped].tolist(), record.spec, "toy", 1000, 10
                         ).validate(LABELS)  # fmt: skip


# -------------------------------------------------------------------------------------------------- data module
@pytest.fixture(scope="module", params=["classwise", "random_sample"])
def scenario(request):
    if request.param == "classwise":
        spec = PoisonSpec("classwise", target_class=9, seed=0)
    else:
        spec = PoisonSpec("random_sample", fraction=0.1, target_class=None, seed=3)
    module = PoisonedDataModule("mnist", poison=spec, train_subset=SUBSET, eval_batch_size=500)
    module.setup("fit")
    return module


def test_scenario_sets_are_exact_and_labels_clean(scenario, mnist):
    labels = mnist.train.labels[:SUBSET]
    record = scenario.record
    if scenario.spec.kind == "classwise":
        assert record.indices == torch.nonzero(labels == 9).flatten().tolist()
        assert scenario.attacked_class == 9
    else:
        assert len(record) == round(0.1 * SUBSET) and scenario.attacked_class is None
    _, y_forget, i_forget = _collect(scenario.forget_dataloader())
    _, y_retain, i_retain = _collect(scenario.retain_dataloader())
    assert i_forget.tolist() == record.indices
    assert not set(i_forget.tolist()) & set(i_retain.tolist())
    assert sorted(i_forget.tolist() + i_retain.tolist()) == list(range(SUBSET))
    assert torch.equal(y_forget, labels[i_forget]) and torch.equal(y_retain, labels[i_retain])
    _, y_train, i_train = _collect(scenario.profile_dataloader())
    assert i_train.tolist() == list(range(SUBSET)) and torch.equal(y_train, labels)  # trained on clean labels
    pairs = list(scenario.forget_pairs_dataloader())
    assert torch.equal(torch.cat([b[1] for b in pairs]), labels[i_forget])  # "poisoned" = clean labels
    assert (torch.cat([b[2] for b in pairs]) == -1).all()  # no corrected label
    assert scenario.test_split_names == ["test", "forget"] and len(scenario.test_dataloader()) == 2


def test_scenario_has_no_corrected_labels(scenario):
    assert scenario.has_corrected_labels is False
    with pytest.raises(ValueError, match="needs the forget samples' corrected labels"):
        scenario.corrected_forget_dataloader()


def test_validation_scenario_is_the_same_draw_on_clean_validation_labels(scenario, mnist):
    """What the relearning attack is calibrated on: the scenario drawn afresh on the validation split (its own seed),
    with the clean validation labels (class-wise: all of class 9; random-sample: 10 %)."""
    _, y, _ = _collect(scenario.poisoned_validation_dataloader())
    labels = mnist.val.labels
    if scenario.spec.kind == "classwise":
        assert torch.equal(y, labels[labels == 9])
    else:  # the draw by hand: 10 % of the validation positions from the seed + 1, sorted
        count = round(0.1 * len(labels))
        positions = torch.randperm(len(labels), generator=torch.Generator().manual_seed(scenario.spec.seed + 1))
        assert torch.equal(y, labels[positions[:count].sort().values])


def test_retraining_drops_the_forget_set(scenario):
    retrain = PoisonedDataModule("mnist", poison=scenario.spec, train_subset=SUBSET, drop_poisoned=True)
    retrain.setup("fit")
    assert retrain.record.to_dict() == scenario.record.to_dict()
    _, _, idx = _collect(retrain.profile_dataloader())
    assert sorted(idx.tolist()) == retrain.retain_positions.tolist()
    assert len(idx) == SUBSET - len(scenario.record) and not set(idx.tolist()) & set(scenario.record.indices)


@pytest.mark.parametrize("method", [FirstOrder(), SecondOrder(), NegGradPlus(corrected_weight=0.5)])
def test_label_replacing_methods_are_refused(scenario, method):
    module = UnlearnModule(model=MnistCNN(), data=scenario, method=method, selection=LastLayer())
    with pytest.raises(ValueError, match=f"{method.name!r} needs the forget samples' corrected labels"):
        module.prepare()


@pytest.mark.parametrize("method", [Finetune(epochs=1), NegGradPlus(epochs=1)], ids=["finetune", "neggrad_plus"])
def test_removal_methods_run(scenario, method):
    torch.manual_seed(0)
    net = MnistCNN()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    module = UnlearnModule(
        model=net, data=scenario, method=method, selection=LastLayer(), profile_max_samples=32, evaluate=False
    )
    unlearn_trainer(limit_train_batches=2).fit(module)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    selected = tuple(f"{layer}." for layer in module.mask.layers)
    assert changed and all(name.startswith(selected) for name in changed)  # only the selected layer moved


# -------------------------------------------------------------------------------------------------- the statement
def test_classwise_effect_is_the_forgotten_class_gap():
    effect = poison_effect(
        {"test/acc_attacked": 98.8, "forget/acc": 99.6, "test/acc": 98.9},
        {"test/acc_attacked": 0.0, "forget/acc": 0.0, "test/acc": 89.0},
        "classwise",
    )
    assert effect["metric"] == "test/acc_attacked" and effect["harm"] == pytest.approx(98.8) and effect["plain"]
    assert effect["fit"] == 99.6 and effect["memorisation"] == pytest.approx(99.6)
    assert effect["statement"].startswith("Gap to forget 98.80 points: test accuracy of the forgotten class 98.80 %")
    assert "fit 99.60 %" in effect["statement"] and "below the noise" not in effect["statement"]


def test_random_sample_effect_says_when_the_gap_is_below_the_noise():
    small = poison_effect(
        {"forget/acc": 99.7, "test/acc": 98.9}, {"forget/acc": 98.9, "test/acc": 98.8}, "random_sample"
    )
    assert small["metric"] == "forget/acc" and small["harm"] == pytest.approx(0.8) and HARM_NOISE > 0.8
    assert not small["plain"] and "below the noise level" in small["statement"]
    assert "membership inference" in small["statement"]
    large = poison_effect({"forget/acc": 99.0}, {"forget/acc": 91.0}, "random_sample")
    assert large["plain"] and large["harm"] == pytest.approx(8.0) and "below the noise" not in large["statement"]


# -------------------------------------------------------------------------------------------------------- configs
@pytest.mark.slow  # about 20 s each: two short trainings through the CLI
@pytest.mark.parametrize(
    ("config", "kind", "forget"),
    [("mnist_cnn_classwise.yaml", "classwise", None), ("mnist_cnn_random10.yaml", "random_sample", 60)],
)
def test_configs_train_and_record_the_forget_set(config, kind, forget, tmp_path, mnist):
    """A few batches of ``train.py fit -c configs/<config>`` on 600 images (no profiler): ``poison.json`` holds the
    scenario's exact forget set, verified against the checkpoint; the retrain overlay leaves it out."""
    from lightning_unlearn.cli import TrainCLI

    quick = ["--data.train_subset", str(SUBSET), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
             "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
             "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
             "--trainer.callbacks.filename", "last", "--trainer.logger.init_args.save_dir"]  # fmt: skip
    runs = {}
    for name, overlay in (("trained", []), ("retrained", ["-c", str(ROOT / "configs" / "retrain.yaml")])):
        cli = TrainCLI(args=["fit", "-c", str(ROOT / "configs" / config), *overlay, *quick, str(tmp_path / name)])
        runs[name] = TrainingRun.from_path(cli.trainer.log_dir)
    record = runs["trained"].load_record()
    spec = PoisonSpec.from_dict(record.spec)
    assert spec.kind == kind and record.poisoned_labels == record.true_labels
    if forget is None:
        assert record.indices == torch.nonzero(mnist.train.labels[:SUBSET] == 9).flatten().tolist()
    else:
        assert len(record) == forget
    assert runs["retrained"].load_record().to_dict() == record.to_dict()
    results = json.loads((runs["trained"].directory / "results.json").read_text())["metrics"]
    assert "forget/acc" in results and "forget_true/acc" not in results
