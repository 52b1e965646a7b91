"""Determinism: the same seed and config give the same poison record, the same curvature profile (bit for bit at one
thread count, within float tolerance across thread counts) and the same unlearning report metrics.

Every pair of runs here starts from a *different* global RNG state: what a run draws must come from its own seeds.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_unlearn.curvature import SharpnessProfile, profile_model
from lightning_unlearn.data.datamodule import PoisonedDataModule
from lightning_unlearn.data.poison import PoisonSpec, make_poison
from lightning_unlearn.models.registry import build_model

ESTIMATORS = ("exact", "mc", "hutchinson")


def scramble_global_rng(seed: int) -> None:
    """Put the global random generators (torch, numpy, random) in a state that depends on ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)``; the previous thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------- poison record
@pytest.mark.parametrize(
    "spec",
    [
        PoisonSpec("targeted", count=300, target_class=9, seed=3),  # random wrong label per sample
        PoisonSpec("targeted", fraction=0.1, target_class=4, poison_label=7, seed=3),
        PoisonSpec("untargeted", count=500, target_class=None, seed=3),
        PoisonSpec("pairflip", fraction=0.02, target_class=None, seed=3),
    ],
    ids=["targeted", "targeted-label", "untargeted", "pairflip"],
)
def test_make_poison_depends_only_on_the_spec(mnist, spec, tmp_path):
    labels = mnist.train.labels
    scramble_global_rng(1)
    first = make_poison(labels, 10, spec, "mnist")
    scramble_global_rng(2)
    with num_threads(2):
        second = make_poison(labels, 10, spec, "mnist")
    assert second.to_dict() == first.to_dict()
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    other = make_poison(labels, 10, PoisonSpec(**{**spec.to_dict(), "seed": 4}), "mnist")
    assert other.indices != first.indices or other.poisoned_labels != first.poisoned_labels  # the seed matters


def test_datamodule_draws_the_same_record_and_labels(tmp_path):
    def make(seed: int = 3) -> PoisonedDataModule:
        spec = {"kind": "targeted", "count": 100, "target_class": 9, "seed": seed}
        datamodule = PoisonedDataModule("mnist", poison=spec, train_subset=3000, batch_size=64)
        datamodule.setup("fit")
        return datamodule

    scramble_global_rng(1)
    first = make()
    scramble_global_rng(2)
    second = make()
    assert len(first.record) == 100
    assert second.record.to_dict() == first.record.to_dict()
    first.record.save(tmp_path / "first" / "poison.json")
    second.record.save(tmp_path / "second" / "poison.json")
    assert (tmp_path / "first" / "poison.json").read_bytes() == (tmp_path / "second" / "poison.json").read_bytes()
    assert torch.equal(first.train_dataset().labels, second.train_dataset().labels)
    for a, b in zip(first.profile_dataloader(), second.profile_dataloader(), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert make(seed=4).record.indices != first.record.indices


# --------------------------------------------------------------------------------------------------------- profile
@pytest.fixture(scope="module")
def profiling_case() -> tuple[torch.nn.Module, list[Any]]:
    """The MNIST CNN (fixed initialisation, briefly trained so curvature is not trivial) and 384 real MNIST images."""
    datamodule = PoisonedDataModule("mnist", poison={"kind": "none"}, train_subset=384, batch_size=128)
    datamodule.setup("fit")
    batches = [(x, y) for x, y, _ in datamodule.profile_dataloader(batch_size=128)]
    torch.manual_seed(0)
    model = build_model("mnist_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches * 2:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model.eval(), batches


def _profile(case: tuple[torch.nn.Module, list[Any]], estimator: str, seed: int = 7) -> SharpnessProfile:
    model, batches = case
    return profile_model(model, batches, estimator, seed=seed, num_draws=2)


def _without_timing(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without wall-clock times (``seconds``, ``seconds_*``)."""
    return {k: v for k, v in values.items() if not k.startswith("seconds")}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_profile_is_identical_when_run_twice(profiling_case, estimator):
    scramble_global_rng(1)
    first = _profile(profiling_case, estimator)
    scramble_global_rng(2)
    second = _profile(profiling_case, estimator)
    assert first.num_samples == second.num_samples == 384
    assert (first.architecture, first.weights) == (second.architecture, second.weights)
    assert _without_timing(first.metadata) == _without_timing(second.metadata)
    assert list(first.diagonals) == list(second.diagonals)
    for name, value in first.diagonals.items():
        assert torch.equal(value, second.diagonals[name]), name  # bit for bit
    assert any(value.abs().max() > 0 for value in first.diagonals.values())
    if estimator != "exact":  # the draws follow the seed
        reseeded = _profile(profiling_case, estimator, seed=8)
        assert not all(torch.equal(v, reseeded.diagonals[n]) for n, v in first.diagonals.items())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_profile_agrees_across_thread_counts(profiling_case, estimator):
    threads = torch.get_num_threads()
    with num_threads(1):
        single = _profile(profiling_case, estimator)
    with num_threads(2):
        double = _profile(profiling_case, estimator)
    assert torch.get_num_threads() == threads  # restored
    assert single.num_samples == double.num_samples
    for name, value in single.diagonals.items():
        # float32 sums in another order: errors of a few 1e-6 of the layer's largest entry (hutchinson's entries
        # cancel, so its small entries have no relative accuracy to speak of)
        scale = float(value.abs().max())
        torch.testing.assert_close(double.diagonals[name], value, rtol=1e-5, atol=1e-5 * scale, msg=name)


# -------------------------------------------------------------------------------------------------- unlearning report
def _request(run: Path, method: str, out: Path) -> dict[str, Any]:
    from lightning_unlearn.evaluation.suite import ACCURACY_ONLY
    from lightning_unlearn.pipeline import run_unlearning
    from lightning_unlearn.selection import SmallestLayer
    from lightning_unlearn.unlearn import UnlearnModule, get_method
    from lightning_unlearn.unlearn.module import unlearn_trainer

    kwargs = {"epochs": 1, "batch_size": 256} if method == "neggrad_plus" else {}
    module = UnlearnModule(str(run), get_method(method, **kwargs), SmallestLayer(), seed=5)
    trainer = unlearn_trainer(accelerator="cpu")
    return run_unlearning(trainer, module, out_dir=out, evaluation=ACCURACY_ONLY)


@pytest.mark.parametrize("method", ["first_order", "neggrad_plus"])
def test_unlearning_report_metrics_are_identical_when_run_twice(poisoned_run, tmp_path, method):
    scramble_global_rng(1)
    first = _request(poisoned_run, method, tmp_path / "first")
    scramble_global_rng(2)
    second = _request(poisoned_run, method, tmp_path / "second")
    assert first["before"] == second["before"]
    assert first["after"] == second["after"]  # exactly
    assert first["selection"] == second["selection"]
    assert _without_timing(first["method"]) == _without_timing(second["method"])
    if method == "first_order":  # the chosen step and every candidate's validation accuracy and loss
        assert first["method"]["step"] == second["method"]["step"]
        assert first["method"]["candidates"] == second["method"]["candidates"]
        assert len(first["method"]["candidates"]) > 2
    else:
        assert first["after"] != first["before"]  # the request changed the model
    weights = [
        torch.load(r["output_dir"] + "/unlearned.ckpt", weights_only=True)["state_dict"] for r in (first, second)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
