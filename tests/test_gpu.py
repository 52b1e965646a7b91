"""The paths of issue 19 on real GPUs (``make test-gpu``; every test here is skipped without CUDA).

Single GPU: training with the profiler, every estimator against its CPU result (also with TF32 switched on by the
caller, and with SyncBatchNorm), every method (first/second order, top-k, fine-tune, NegGrad+, SAM-forget, Sharp
MinMax) against its CPU result with the hard freeze bit for bit, mixed precision (``16-mixed``, ``bf16-mixed``).
Two GPUs: DDP over NCCL for training and profiling (``ddp_spawn``), a request (``ddp_spawn``; ``ddp_fork`` in a fresh
process, since a process with CUDA initialised cannot fork CUDA ranks) against the single-GPU result.

``tests/test_gpu_paths.py`` proves on the CPU what a CPU can show of the same paths.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, train_debug_run
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_unlearn.curvature import SharpnessProfile, accumulate_diagonal
from lightning_unlearn.evaluation.suite import ACCURACY_ONLY
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.selection import LastLayer, SmallestLayer, TopKParameters
from lightning_unlearn.unlearn import (
    SCRUB,
    Finetune,
    FirstOrder,
    FirstOrderRemoval,
    L1Sparse,
    NegGradPlus,
    RandomLabel,
    SamForget,
    SecondOrder,
    SharpMinMax,
    UnlearnModule,
)
from lightning_unlearn.unlearn.module import TRAINER_DEFAULTS, unlearn_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

#: name → (method factory, selection factory, fixed step or None); one-step methods use a fixed step so that the CPU
#: and the GPU apply the same update (a searched step could land elsewhere on a flat validation loss).
METHODS = {
    "first_order": (lambda: FirstOrder(criterion="fixed", steps=[3e-5]), SmallestLayer),
    "first_order_topk": (lambda: FirstOrder(criterion="fixed", steps=[3e-5]), lambda: TopKParameters(0.02)),
    "second_order_diag": (lambda: SecondOrder(criterion="fixed", steps=[0.1]), LastLayer),
    "second_order_cg": (lambda: SecondOrder(solver="cg", criterion="fixed", steps=[0.1], hvp_samples=512), LastLayer),
    "finetune": (lambda: Finetune(batch_size=64), SmallestLayer),
    "neggrad_plus": (lambda: NegGradPlus(batch_size=64), SmallestLayer),
    "sam_forget_topk": (lambda: SamForget(batch_size=64, rho=0.5), lambda: TopKParameters(0.05)),
    "sharp_minmax": (lambda: SharpMinMax(batch_size=64), LastLayer),
    "first_order_removal": (lambda: FirstOrderRemoval(criterion="fixed", steps=[3e-5]), SmallestLayer),
    "random_label": (lambda: RandomLabel(epochs=1, batch_size=64), SmallestLayer),
    "l1_sparse": (lambda: L1Sparse(epochs=1, batch_size=64, alpha=1e-4), SmallestLayer),
    # the frozen teacher must follow the student onto the GPU; one max pass (a zero gradient), then a min pass
    "scrub": (lambda: SCRUB(epochs=1, batch_size=64, forget_batch_size=64, msteps=1), LastLayer),
}


def _weights(module: UnlearnModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.net.named_parameters()}


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float, what: str) -> None:
    """Each tensor within ``rtol`` of the other, relative to the tensor's largest entry."""
    for name, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(actual[name], value, rtol=rtol, atol=rtol * scale, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """Training on one GPU (the debug config: 2,000 images, 100 poisoned): the profiler runs on the GPU after fit."""
    return train_debug_run(
        tmp_path_factory.mktemp("gpu_runs"), "--trainer.accelerator", "gpu", "--trainer.devices", "1"
    )


def _loader(run: Path, samples: int = 1024) -> DataLoader:
    datamodule = TrainingRun.from_path(run).datamodule()
    datamodule.setup("fit")
    return DataLoader(Subset(datamodule.train_dataset(), range(samples)), batch_size=256)


# ------------------------------------------------------------------------------------------------ single GPU
def test_training_on_gpu_profiles_on_gpu_like_the_cpu(gpu_run):
    profile = SharpnessProfile.load(gpu_run / "sharpness_profile.pt")
    net = TrainingRun.from_path(gpu_run).load_classifier().net
    cpu, count = accumulate_diagonal(net, _loader(gpu_run, profile.num_samples), "exact")
    assert count == profile.num_samples
    _close(profile.diagonals, {f"net.{n}": v / count for n, v in cpu.items()}, 1e-4, "profile")


@pytest.mark.parametrize("estimator", ["exact", "mc", "fisher", "hutchinson"])
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32_requested"])
def test_every_estimator_on_gpu_equals_cpu(gpu_run, estimator, tf32):
    """Same draws (they are made on the host), same sums up to float32 rounding; TF32 requested by the caller
    (Lightning's ``set_float32_matmul_precision("high")`` hint, cuDNN's default) is switched off inside."""
    net = TrainingRun.from_path(gpu_run).load_classifier().net
    cpu, _ = accumulate_diagonal(net, _loader(gpu_run), estimator, seed=3)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        if tf32:
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
        gpu, _ = accumulate_diagonal(copy.deepcopy(net).cuda(), _loader(gpu_run), estimator, seed=3)
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
    _close({n: v.cpu() for n, v in gpu.items()}, cpu, 1e-4, estimator)


def test_sync_batchnorm_profile_on_gpu(bn_run):
    net = TrainingRun.from_path(bn_run).load_classifier().net.eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).cuda().eval()
    cpu, _ = accumulate_diagonal(net, _loader(bn_run, 512), "exact")
    gpu, _ = accumulate_diagonal(synced, _loader(bn_run, 512), "exact")
    _close({n: v.cpu() for n, v in gpu.items()}, cpu, 1e-4, "SyncBatchNorm")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_gpu_equals_cpu_and_freezes_bit_for_bit(gpu_run, name):
    method, selection, *_ = METHODS[name]
    results = {}
    for accelerator in ("cpu", "gpu"):
        module = UnlearnModule(str(gpu_run), method(), selection())
        original = _weights(module)
        unlearn_trainer(accelerator=accelerator, max_epochs=module.max_epochs).fit(module)
        results[accelerator] = _weights(module)
        changed = [n for n, v in results[accelerator].items() if not torch.equal(v, original[n])]
        assert changed, f"{name} on {accelerator} changed nothing"
        if module.method.freezes_unselected:
            frozen = [n for n in original if n not in module.selected_names]
            assert all(torch.equal(results[accelerator][n], original[n]) for n in frozen), name
            for n, mask in module.mask.masks.items():  # element-wise: unselected entries bit-identical too
                assert torch.equal(results[accelerator][n][~mask.cpu()], original[n][~mask.cpu()]), n
        if accelerator == "gpu":
            assert module.timings["fit_memory_method"] == "cuda_max_memory_allocated"
            assert module.timings["fit_peak_bytes"] > 0
            if name == "sam_forget_topk":
                assert module.method.report()["skipped_perturbations"] == 0
    # iterative methods run cuDNN convolutions with TF32 (the caller's setting) for many steps: a looser bound
    rtol = 1e-4 if METHODS[name][0]().one_step else 5e-2
    _close(results["gpu"], results["cpu"], rtol, name)


def test_retain_weighted_step_search_on_gpu_matches_cpu(gpu_run):
    """``validation_weights="retain"`` under ``deterministic=True`` on a GPU (the retain set's labels are counted on the
    CPU: a weighted bincount on CUDA has no deterministic kernel): the same class weights, the same grid losses."""
    reports = {}
    for accelerator in ("cpu", "gpu"):
        method = FirstOrder(validation_weights="retain")
        module = UnlearnModule(str(gpu_run), method, TopKParameters(0.02), evaluate=False)
        unlearn_trainer(accelerator=accelerator, max_epochs=module.max_epochs).fit(module)
        reports[accelerator] = method.report()
    assert reports["gpu"]["class_weights"] == reports["cpu"]["class_weights"]
    grid = {a: {c["step"]: c["val_loss"] for c in r["candidates"] if c["phase"] == "grid"} for a, r in reports.items()}
    assert grid["gpu"].keys() == grid["cpu"].keys()
    for step, loss in grid["cpu"].items():
        assert grid["gpu"][step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_one_step_equals_float32_and_sam_perturbs(gpu_run, precision):
    def run(method, selection, precision):
        module = UnlearnModule(str(gpu_run), method, selection)
        unlearn_trainer(accelerator="gpu", max_epochs=module.max_epochs, precision=precision).fit(module)
        return module

    reference = run(FirstOrder(criterion="fixed", steps=[3e-5]), TopKParameters(0.02), "32-true")
    mixed = run(FirstOrder(criterion="fixed", steps=[3e-5]), TopKParameters(0.02), precision)
    for (name, a), b in zip(mixed.net.named_parameters(), reference.net.parameters(), strict=True):
        assert torch.equal(a, b), name  # autocast is off for the forget gradient; deterministic kernels
    sam = run(SamForget(batch_size=64, rho=0.5), TopKParameters(0.05), precision)
    assert sam.method.report()["skipped_perturbations"] == 0


def test_half_precision_weights_are_refused(gpu_run):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    module = UnlearnModule(str(gpu_run), FirstOrder(), LastLayer())
    with pytest.raises(MisconfigurationException, match="16-true"):
        unlearn_trainer(accelerator="gpu", precision="16-true").fit(module)


# ---------------------------------------------------------------------------------------------- two GPUs, NCCL
def _ddp_trainer(strategy: str, tmp_path: Path, **kwargs):
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="gpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        **TRAINER_DEFAULTS,
        **kwargs,
    )


@two_gpus
@pytest.mark.timeout(600)
def test_training_and_profile_under_nccl_ddp_spawn(gpu_run, tmp_path):
    run = train_debug_run(
        tmp_path,
        "--trainer.accelerator",
        "gpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp_spawn",
    )
    profile = SharpnessProfile.load(run / "sharpness_profile.pt")
    single_profile = SharpnessProfile.load(gpu_run / "sharpness_profile.pt")
    assert profile.metadata["world_size"] == 2 and profile.num_samples == single_profile.num_samples
    net = TrainingRun.from_path(run).load_classifier().net
    single, count = accumulate_diagonal(net.cuda(), _loader(run, profile.num_samples), "exact")
    _close(profile.diagonals, {f"net.{n}": v.cpu() / count for n, v in single.items()}, 1e-4, "DDP profile")


@two_gpus
@pytest.mark.timeout(600)
def test_request_under_nccl_ddp_spawn_equals_one_gpu(gpu_run, tmp_path):
    from lightning_unlearn.pipeline import run_unlearning

    def request(trainer, folder: Path, batch_size: int) -> dict:
        module = UnlearnModule(str(gpu_run), FirstOrder(batch_size=batch_size), TopKParameters(0.02))
        return run_unlearning(trainer, module, out_dir=folder, evaluation=ACCURACY_ONLY)

    single = request(unlearn_trainer(accelerator="gpu"), tmp_path / "single", 64)
    ddp = request(_ddp_trainer("ddp_spawn", tmp_path), tmp_path / "ddp", 32)
    assert ddp["method"]["forget_samples"] == single["method"]["forget_samples"] == 100
    assert ddp["method"]["step"] == pytest.approx(single["method"]["step"], rel=1e-3)
    for key, value in single["after"].items():
        assert ddp["after"][key] == pytest.approx(value, abs=0.05), key


_FORK_SCRIPT = """
import json, sys, torch
from lightning.pytorch import Trainer
from lightning_unlearn.selection import TopKParameters
from lightning_unlearn.unlearn import FirstOrder, UnlearnModule
from lightning_unlearn.unlearn.module import TRAINER_DEFAULTS
run, out = sys.argv[1], sys.argv[2]
module = UnlearnModule(run, FirstOrder(criterion="fixed", steps=[3e-5], batch_size=32), TopKParameters(0.02))
trainer = Trainer(accelerator="gpu", devices=2, strategy="ddp_fork", logger=False, enable_progress_bar=False,
                  max_epochs=1, **TRAINER_DEFAULTS)
module.prepare_before_fit(trainer)   # on the CPU: this process must not initialise CUDA before forking
assert not torch.cuda.is_initialized()
trainer.fit(module)
weights = {n: p.detach().cpu().tolist() for n, p in module.net.named_parameters()}
json.dump({"weights": weights, "timings": {k: v for k, v in module.timings.items() if k.startswith("fit_")}},
          open(out, "w"))
"""


@two_gpus
@pytest.mark.timeout(600)
def test_fit_under_nccl_ddp_fork_in_a_fresh_process(gpu_run, tmp_path):
    """``ddp_fork`` from a process that has not initialised CUDA (pytest's has: hence a fresh interpreter)."""
    out = tmp_path / "fork.json"
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FORK_SCRIPT), str(gpu_run), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["timings"]["fit_memory_method"] == "cuda_max_memory_allocated"
    assert result["timings"]["fit_peak_bytes"] > 0
    module = UnlearnModule(
        str(gpu_run), FirstOrder(criterion="fixed", steps=[3e-5], batch_size=64), TopKParameters(0.02)
    )
    unlearn_trainer(accelerator="gpu").fit(module)
    for name, value in _weights(module).items():
        torch.testing.assert_close(torch.tensor(result["weights"][name]), value, rtol=1e-4, atol=1e-6, msg=name)
