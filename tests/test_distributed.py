"""Unlearning under DDP: 2 CPU processes (gloo) give the single-process result, for every method.

Two launch modes are covered: ranks started as separate processes from the beginning (like ``strategy="ddp"`` from
a script, torchrun or SLURM: each rank builds its own module, a missing profile is computed sharded in ``setup`` and
all-reduced) and ``ddp_spawn`` through the full pipeline (the parent prepares once, rank zero's results come back).
The run has an odd number of poisoned (51) and retained (949) samples, so the shards are padded.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import train_debug_run
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_unlearn.curvature import SharpnessProfile
from lightning_unlearn.evaluation.suite import ACCURACY_ONLY
from lightning_unlearn.pipeline import REPORT_FILENAME, run_unlearning
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.selection import AutoCandidates, FisherRatio, LastLayer, Saliency, SmallestLayer, TopKParameters
from lightning_unlearn.unlearn import (
    SCRUB,
    SSD,
    Auto,
    Finetune,
    FirstOrder,
    FirstOrderRemoval,
    L1Sparse,
    NegGradPlus,
    RandomLabel,
    SamForget,
    SecondOrder,
    ShardSampler,
    SharpMinMax,
    UnlearnModule,
)
from lightning_unlearn.unlearn.base import Weighted
from lightning_unlearn.unlearn.module import TRAINER_DEFAULTS, unlearn_trainer

WORLD = 2
BATCH = 16  # per rank; the single process uses WORLD * BATCH

#: name → (method factory taking the batch size, selection factory)
METHODS = {
    "first_order": (lambda b: FirstOrder(batch_size=b), SmallestLayer),
    "first_order_topk": (lambda b: FirstOrder(batch_size=b), lambda: TopKParameters(fraction=0.02)),
    "second_order": (lambda b: SecondOrder(batch_size=b, criterion="loss"), LastLayer),
    # the default request: its candidates and budget decided alike on every rank (one all-reduced decision)
    "auto": (lambda b: Auto(batch_size=b, budget_epochs=100.0), AutoCandidates),
    "finetune": (lambda b: Finetune(batch_size=b), SmallestLayer),
    "neggrad_plus": (lambda b: NegGradPlus(batch_size=b), SmallestLayer),
    "sam_forget": (lambda b: SamForget(batch_size=b, rho=0.5), lambda: TopKParameters(fraction=0.05)),
    "sharp_minmax": (lambda b: SharpMinMax(batch_size=b), LastLayer),
    "first_order_removal": (
        lambda b: FirstOrderRemoval(batch_size=b, steps=[1e-4], criterion="fixed"),  # the searched step is 0 here
        lambda: TopKParameters(fraction=0.02),
    ),
    "random_label": (lambda b: RandomLabel(epochs=1, batch_size=b), lambda: TopKParameters(fraction=0.05)),
    "l1_sparse": (lambda b: L1Sparse(epochs=2, batch_size=b, alpha=1e-3), SmallestLayer),
    "scrub": (lambda b: SCRUB(epochs=2, batch_size=b, forget_batch_size=b, msteps=2), LastLayer),
}
#: Selections that need the model and the data (forget gradient, batch importances: computed on each rank's shard
#: and all-reduced), the one-shot SSD, which reuses its selection's importances, and a search weighted by the retain
#: set's class counts.
DATA_AWARE = {
    "first_order_saliency": (lambda b: FirstOrder(batch_size=b), lambda: Saliency(fraction=0.02)),
    "ssd": (lambda b: SSD(), lambda: FisherRatio(alpha=2.0, batch_size=40)),
    # every rank scores the whole corrected forget set (51 samples) beside validation: the same step on every rank
    "first_order_forget_weight": (lambda b: FirstOrder(batch_size=b, forget_weight=1.0), SmallestLayer),
    # the retain set's class counts (949 samples: padded shards) are all-reduced into the validation weights
    "first_order_retain_weighted": (
        lambda b: FirstOrder(batch_size=b, validation_weights="retain"),
        lambda: TopKParameters(fraction=0.02),  # a step > 0 on this run (none on its smallest or last layer)
    ),
}


# ------------------------------------------------------------------------------------------------ sharding (unit)
@pytest.mark.parametrize("shuffle", [False, True])
def test_shard_sampler_pads_ranks_equally_and_counts_each_sample_once(shuffle):
    dataset = [(torch.tensor(float(i)),) for i in range(11)]
    for length in range(1, 12):
        for world in (1, 2, 3, 4):
            samplers = [ShardSampler(length, rank, world, shuffle=shuffle, seed=3) for rank in range(world)]
            shards = [list(s) for s in samplers]
            assert {len(shard) for shard in shards} == {-(-length // world)}  # same number of batches on every rank
            weighted = Weighted(dataset[:length])
            items = [weighted[i] for shard in shards for i in shard]
            real = sorted(int(x) for x, w in items if w == 1.0)
            assert real == list(range(length))  # every sample exactly once with weight 1
            assert sum(w == 0.0 for _, w in items) == len(shards[0]) * world - length


def test_weighted_mean_of_padding_only_batch_is_zero():
    from lightning_unlearn.unlearn.base import weighted_mean

    values = torch.tensor([2.0, 4.0])
    assert weighted_mean(values, torch.tensor([1.0, 0.0])) == 2.0
    assert weighted_mean(values, torch.tensor([0.0, 0.0])) == 0.0
    assert weighted_mean(values, torch.tensor([1.0, 1.0]), count=4.0) == 1.5


def test_sharded_strategies_are_rejected(odd_run):
    module = UnlearnModule(str(odd_run))
    module._trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="strategy=FSDPStrategy"):
        module.setup("fit")


# -------------------------------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def odd_run(tmp_path_factory):
    """1,000 MNIST images, 51 of class 9 poisoned (odd forget and retain sets), one short epoch, exact profile."""
    return train_debug_run(tmp_path_factory.mktemp("odd"), "--data.train_subset", "1000", "--data.poison.count", "51")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _state(module: UnlearnModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def _ddp_trainer(strategy: str, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        **TRAINER_DEFAULTS,
        **kwargs,
    )


def _rank_worker(rank: int, port: int, run: str, out: str, table: str = "METHODS") -> None:
    """One rank launched as its own process (as torchrun would): Lightning joins the group from the environment.
    Runs the methods of ``table`` (``"METHODS"``: then also a whole request; ``"DATA_AWARE"``)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    os.environ["WORLD_SIZE"] = str(WORLD)
    torch.set_num_threads(1)
    results = {}
    for name, (method, selection) in (METHODS if table == "METHODS" else DATA_AWARE).items():
        module = UnlearnModule(run, method(BATCH), selection(), evaluate=False)  # weights compared, not metrics
        trainer = _ddp_trainer("ddp", max_epochs=module.max_epochs)
        assert trainer.strategy.launcher is None or not trainer.strategy.launcher.is_interactive_compatible
        trainer.fit(module)
        results[name] = (_state(module), module.method.report(), sorted(module.selected_names))
    if table != "METHODS":
        if rank == 0:
            torch.save(results, out)
        return
    # a whole request through the pipeline: every rank evaluates, rank zero alone writes
    module = UnlearnModule(run, FirstOrder(batch_size=BATCH), SmallestLayer())
    report = run_unlearning(_ddp_trainer("ddp"), module, out_dir=Path(out).parent / "request", evaluation=ACCURACY_ONLY)
    results["request"] = report["after"]
    if rank == 0:
        torch.save(results, out)


def _compare_with_one_process(odd_run: Path, table: dict, distributed: dict) -> None:
    """Each method of ``table`` in one process gives the weights (frozen ones bit for bit), selection and choices
    the ranks reported in ``distributed``."""
    original = _state(UnlearnModule(str(odd_run)))
    for name, (method, selection) in table.items():
        module = UnlearnModule(str(odd_run), method(WORLD * BATCH), selection(), evaluate=False)
        unlearn_trainer(max_epochs=module.max_epochs, accelerator="cpu").fit(module)
        single, report = _state(module), module.method.report()
        state, ddp_report, selected = distributed[name]
        assert selected == sorted(module.selected_names), name
        changed = [k for k in single if not torch.equal(single[k], original[k])]
        assert changed, f"{name}: the single-process run changed nothing, the comparison would be vacuous"
        for key in single:
            where = f"{name} {key}"
            torch.testing.assert_close(state[key], single[key], rtol=2e-5, atol=1e-6, msg=lambda _, w=where: w)
            if torch.equal(single[key], original[key]):  # frozen: bit-identical under DDP too
                assert torch.equal(state[key], original[key]), f"{name}: frozen {key} moved under DDP"
        if module.method.one_step and not isinstance(module.method, SSD):  # the step-searched one-step methods
            assert ddp_report["forget_samples"] == report["forget_samples"] == 51
            assert ddp_report["step"] == report["step"]
            assert ddp_report["grad_norm"] == pytest.approx(report["grad_norm"], rel=1e-5)
            assert ddp_report.get("class_weights") == report.get("class_weights")


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_every_method_under_ddp_equals_one_process(odd_run, tmp_path):
    # ranks get a copy of the run without its profile: they compute it sharded in `setup` and all-reduce it
    run = tmp_path / "run"
    shutil.copytree(odd_run, run)
    (run / "sharpness_profile.pt").unlink()
    out = tmp_path / "ranks.pt"
    mp.start_processes(_rank_worker, args=(_free_port(), str(run), str(out)), nprocs=WORLD, start_method="spawn")
    distributed = torch.load(out, weights_only=True)
    assert sorted(p.name for p in (tmp_path / "request").iterdir()) == [REPORT_FILENAME, "unlearned.ckpt"]
    written = json.loads((tmp_path / "request" / REPORT_FILENAME).read_text())
    assert written["after"] == distributed.pop("request") and written["method"]["forget_samples"] == 51

    profile = SharpnessProfile.load(run / "sharpness_profile.pt")
    single_profile = SharpnessProfile.load(odd_run / "sharpness_profile.pt")
    assert profile.metadata["world_size"] == WORLD and profile.num_samples == single_profile.num_samples == 1000
    for name, diag in single_profile.diagonals.items():
        torch.testing.assert_close(profile.diagonals[name], diag, rtol=1e-5, atol=1e-12)
    assert not list(run.glob(".*.tmp"))

    _compare_with_one_process(odd_run, METHODS, distributed)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_data_aware_selections_and_ssd_under_ddp_equal_one_process(odd_run, tmp_path):
    out = tmp_path / "ranks.pt"
    args = (_free_port(), str(odd_run), str(out), "DATA_AWARE")
    mp.start_processes(_rank_worker, args=args, nprocs=WORLD, start_method="spawn")
    distributed = torch.load(out, weights_only=True)
    assert distributed["ssd"][1]["dampened"] > 0 and distributed["ssd"][1]["batch_size"] == 40
    _compare_with_one_process(odd_run, DATA_AWARE, distributed)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_pipeline_under_ddp_spawn_writes_one_report_equal_to_one_process(odd_run, tmp_path):
    def request(trainer: Trainer, folder: Path, batch_size: int) -> dict:
        module = UnlearnModule(str(odd_run), FirstOrder(batch_size=batch_size), SmallestLayer())
        return run_unlearning(trainer, module, out_dir=folder, evaluation=ACCURACY_ONLY)

    single = request(unlearn_trainer(accelerator="cpu"), tmp_path / "single", WORLD * BATCH)
    ddp = request(_ddp_trainer("ddp_spawn", default_root_dir=str(tmp_path)), tmp_path / "ddp", BATCH)
    written = json.loads((tmp_path / "ddp" / REPORT_FILENAME).read_text())
    # rank zero's measurements come back to the parent with the weights
    assert written["method"]["forget_samples"] == ddp["method"]["forget_samples"] == 51
    assert written["method"]["step"] == single["method"]["step"] > 0
    for key, value in single["after"].items():
        assert ddp["after"][key] == pytest.approx(value, abs=1e-6), key
    unlearned = TrainingRun.from_path(tmp_path / "ddp" / "unlearned.ckpt").load_classifier()
    reference = TrainingRun.from_path(tmp_path / "single" / "unlearned.ckpt").load_classifier()
    for (name, a), b in zip(unlearned.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6, msg=name)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [REPORT_FILENAME, "unlearned.ckpt"]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_training_under_ddp_spawn_writes_one_record_and_profile_and_exact_test_metrics(tmp_path):
    """``train.py fit`` on 2 ranks: the poison record is the single-process one (written once), the profile is the
    all-reduced exact diagonal of the final weights, and the synced test metrics count every sample once (31 forget
    samples: Lightning's default sampler would repeat one)."""
    from lightning_unlearn.curvature import profile_model, weights_fingerprint
    from lightning_unlearn.data import PoisonedDataModule
    from lightning_unlearn.evaluation.suite import evaluate_model

    run = train_debug_run(
        tmp_path,
        "--data.train_subset",
        "600",
        "--data.poison.count",
        "31",
        "--trainer.devices",
        str(WORLD),
        "--trainer.strategy",
        "ddp_spawn",
        "--trainer.accelerator",
        "cpu",
    )
    training_run = TrainingRun.from_path(run)
    single = PoisonedDataModule("mnist", poison={"kind": "targeted", "count": 31}, train_subset=600)
    single.setup("fit")
    assert training_run.load_record().indices == single.record.indices
    assert not list(run.glob(".*.tmp"))

    classifier = training_run.load_classifier()
    datamodule = training_run.datamodule()
    datamodule.setup("fit")
    profile = SharpnessProfile.load(run / "sharpness_profile.pt")
    assert profile.metadata["world_size"] == WORLD and profile.weights == weights_fingerprint(classifier)
    reference = profile_model(classifier, datamodule.profile_dataloader(batch_size=100), "exact")
    for name, diag in reference.diagonals.items():
        torch.testing.assert_close(profile.diagonals[name], diag, rtol=1e-5, atol=1e-12)

    results = json.loads((run / "results.json").read_text())["metrics"]
    metrics = evaluate_model(classifier.net, datamodule, ACCURACY_ONLY)
    for key in ("test/acc", "forget/acc", "forget_true/acc"):
        assert results[key] == pytest.approx(metrics[key], abs=1e-4), key


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_train_script_under_ddp_launches_its_ranks(tmp_path):
    """``python train.py fit ... --trainer.strategy ddp --trainer.devices 2``: Lightning starts the second rank by
    running the same command line again, which must therefore reach it unchanged."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, debug_train_args

    extra = ["--data.train_subset", "600", "--data.poison.count", "30", "--trainer.devices", str(WORLD)]
    extra += ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    command = [sys.executable, str(ROOT / "train.py"), *debug_train_args(tmp_path, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp_path / "mnist_cnn_targeted").iterdir()
    assert SharpnessProfile.load(run / "sharpness_profile.pt").metadata["world_size"] == WORLD
    assert len(TrainingRun.from_path(run).load_record()) == 30
    assert json.loads((run / "results.json").read_text())["metrics"]["test/acc"] > 0
