"""CUDA, NCCL and mixed-precision paths, proven on the CPU where a CPU can show them (issue 19).

No GPU is needed: device-following is shown with tensors on the ``meta`` device (a CPU × meta product raises like a
CPU × CUDA one), CUDA-only calls are replaced by recorders, and mixed precision runs as CPU autocast (bfloat16, and
float16 where the underflow is the point). ``tests/test_gpu.py`` runs the same paths on real GPUs (``make test-gpu``).
Each test names the row of the issue's table it covers.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from test_method_fidelity import TinyModule, fit, half_mask, make_batch
from torch import nn

from lightning_unlearn.curvature import accumulate_diagonal, check_exact
from lightning_unlearn.curvature._engine import planner
from lightning_unlearn.curvature._engine.base import Settings
from lightning_unlearn.curvature.base import CurvatureEstimator
from lightning_unlearn.curvature.hutchinson import HutchinsonDiagonal
from lightning_unlearn.evaluation import cost
from lightning_unlearn.selection import LastLayer, ParameterMask, TopKParameters
from lightning_unlearn.unlearn import FirstOrder, NegGradPlus, SamForget, SharpMinMax, UnlearnModule
from lightning_unlearn.unlearn.methods import one_step as one_step_module
from lightning_unlearn.unlearn.methods.one_step import forget_gradient
from lightning_unlearn.unlearn.methods.sam import Perturbation, synced_gradient
from lightning_unlearn.unlearn.module import TRAINER_DEFAULTS, unlearn_trainer
from lightning_unlearn.unlearn.request.freeze import FreezeGuard

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _bn_cnn(seed: int = 0) -> nn.Module:
    """A small conv net with BatchNorm whose running statistics and affine parameters are not the defaults."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)
    )
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _batches(n: int = 24, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def _partial_guard(net: nn.Module) -> tuple[FreezeGuard, str]:
    """A hard freeze built on the CPU with an element-wise (top-k like) mask on the first weight."""
    name = next(n for n, p in net.named_parameters() if p.dim() > 1)
    shape = dict(net.named_parameters())[name].shape
    mask = ParameterMask({name: half_mask(tuple(shape))}, "hand")
    return FreezeGuard(net, mask), name


# ------------------------------------------------------------------------- row 1: masks follow the parameters
def test_mask_update_follows_the_update_device():
    """Row 1: ``prepare()`` builds the masks on the CPU, Lightning then moves the module; an update on that device
    is masked on that device (meta stands in for CUDA: CPU × meta raises like CPU × CUDA)."""
    net = _bn_cnn()
    guard, name = _partial_guard(net)
    keep = guard.mask.masks[name]
    net.to("meta")
    masked = guard.mask_update(name, torch.ones(keep.shape, device="meta"))
    assert masked.device.type == "meta" and masked.shape == keep.shape
    cpu_guard, _ = _partial_guard(_bn_cnn())  # on the CPU the values are exact
    assert torch.equal(cpu_guard.mask_update(name, torch.ones(keep.shape)), keep.float())


def test_sam_perturbation_gradient_follows_the_module_device():
    """Row 1: SAM's perturbation gradient (``synced_gradient`` → ``mask_update``) with the network moved after the
    hard freeze was built, as on a GPU."""
    net = _bn_cnn()
    guard, name = _partial_guard(net)
    net.to("meta")
    module = SimpleNamespace(attached_trainer=None, all_reduce_sum=lambda t: t, guard=guard)
    x, y = torch.randn(4, 1, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    loss = F.cross_entropy(net(x), y)
    (grad,) = synced_gradient(module, loss, {name: dict(net.named_parameters())[name]})
    assert grad.device.type == "meta"


# ------------------------------------------------------------------ rows 2, 3: ddp_fork / ddp_spawn main process
def _fake_trainer(start_method: str, device: str = "cuda") -> SimpleNamespace:
    strategy = SimpleNamespace(root_device=torch.device(device, 0) if device == "cuda" else torch.device(device))
    strategy.launcher = _MultiProcessingLauncher(strategy, start_method=start_method)
    return SimpleNamespace(strategy=strategy, world_size=2)


def test_main_process_stays_on_the_cpu_when_ranks_are_forked_onto_cuda():
    """Row 2: a process that initialised CUDA cannot fork CUDA ranks: under ddp_fork its work goes to the CPU."""
    assert cost.main_process_device(_fake_trainer("fork")) == torch.device("cpu")
    assert cost.main_process_device(_fake_trainer("spawn")) == torch.device("cuda", 0)
    assert cost.main_process_device(_fake_trainer("fork", "cpu")) == torch.device("cpu")
    single = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0), launcher=None), world_size=1)
    assert cost.main_process_device(single) == torch.device("cuda", 0)


def test_prepare_before_fit_prepares_on_the_cpu_under_ddp_fork(poisoned_run, monkeypatch):
    """Row 2: ``UnlearnModule.prepare_before_fit`` follows :func:`main_process_device` (the profile, if it must be
    computed in the parent, is computed on the CPU, never initialising CUDA there)."""
    module = UnlearnModule(str(poisoned_run), FirstOrder(), LastLayer())
    seen = []
    monkeypatch.setattr(module, "prepare", lambda device=None: seen.append(device))
    module.prepare_before_fit(_fake_trainer("fork"))
    module.prepare_before_fit(_fake_trainer("spawn"))
    assert seen == [torch.device("cpu"), torch.device("cuda", 0)]


def test_fit_memory_is_measured_in_the_rank_and_travels_with_the_extra_state(poisoned_run):
    """Row 3: the fit's peak memory is measured by the process that runs it (``setup`` → ``on_train_end``) and goes
    back to the parent of spawned ranks with the weights (``get_extra_state``)."""
    module = UnlearnModule(str(poisoned_run), FirstOrder(criterion="fixed", steps=[1e-4]), LastLayer())
    unlearn_trainer(accelerator="cpu", max_epochs=1).fit(module)
    timings = module.timings
    assert timings["fit_memory_method"] in cost.METHODS and timings["fit_memory_device"] == "cpu"
    assert isinstance(timings["fit_peak_bytes"], int) and timings["fit_peak_bytes"] >= 0
    parent = UnlearnModule(str(poisoned_run), FirstOrder(criterion="fixed", steps=[1e-4]), LastLayer())
    parent.set_extra_state(module.get_extra_state())
    assert parent.timings["fit_peak_bytes"] == timings["fit_peak_bytes"]
    assert not module._fit_meter.running  # the sampler thread is stopped


def test_report_memory_comes_from_the_ranks_when_they_measured():
    """Row 3: :func:`fit_memory` (for the pipeline's report) prefers the ranks' own measurement to the one taken
    around ``fit`` in the calling process."""
    parent = cost.Cost(seconds=1.0, peak_bytes=2**20, device="cuda:0", method="cuda_max_memory_allocated")
    ranks = {"fit_peak_bytes": 3 * 2**20, "fit_memory_method": "cuda_max_memory_allocated", "fit_memory_device": "x"}
    assert cost.fit_memory(ranks, parent) == {
        "peak_mib": 3.0,
        "memory_method": ranks["fit_memory_method"],
        "memory_device": "x",
    }
    assert cost.fit_memory({}, parent)["peak_mib"] == 1.0


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fit_memory_of_spawned_ranks_reaches_the_parent(poisoned_run, tmp_path):
    """Row 3 under ddp_spawn (2 gloo ranks): the parent's module holds the ranks' measurement."""
    from lightning.pytorch import Trainer

    module = UnlearnModule(str(poisoned_run), FirstOrder(criterion="fixed", steps=[1e-4], batch_size=16), LastLayer())
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        max_epochs=1,
        default_root_dir=str(tmp_path),
        **TRAINER_DEFAULTS,
    )
    module.prepare_before_fit(trainer)
    trainer.fit(module)
    assert module.timings["fit_memory_method"] == "proc_statm_sampled"
    assert module.timings["fit_peak_bytes"] > 0


# --------------------------------------------------------------------------- row 4: SyncBatchNorm under exact
@pytest.mark.parametrize("estimator", ["exact", "mc", "fisher"])
def test_sync_batchnorm_in_eval_mode_is_profiled_like_batchnorm(estimator):
    """Row 4: ``Trainer(sync_batchnorm=True)`` turns BatchNorm into SyncBatchNorm (not a BatchNormNd subclass); in
    eval mode it is the same function, so ``exact`` accepts it and gives the BatchNorm result bit for bit."""
    net = _bn_cnn()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).eval()
    assert isinstance(synced[1], nn.SyncBatchNorm) and not isinstance(synced[1], nn.BatchNorm2d)
    assert check_exact(synced) == []
    plain, count = accumulate_diagonal(net, _batches(), estimator)
    sums, count_synced = accumulate_diagonal(synced, _batches(), estimator)
    assert count == count_synced == 24
    for name, value in plain.items():
        assert torch.equal(sums[name], value), name
    assert float(sums["1.weight"].abs().sum()) > 0  # the BatchNorm parameters have a curvature


# ------------------------------------------------------------------ row 5: IEEE float32 in the profiling block
@pytest.fixture
def precision_flags():
    """Leave the process's float32 precision settings as they were (the tests below change them)."""
    saved_matmul = torch.get_float32_matmul_precision()
    saved_cudnn = torch.backends.cudnn.allow_tf32
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    keys = [("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv")]
    saved = {k: getter(*k) for k in keys} if getter is not None else {}
    yield
    torch.set_float32_matmul_precision(saved_matmul)
    torch.backends.cudnn.allow_tf32 = saved_cudnn
    for key, value in saved.items():
        torch._C._set_fp32_precision_setter(*key, value)


class _Recorder(CurvatureEstimator):
    """An estimator that records the precision settings it runs under."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def accumulate(self, model, inputs, targets, sums, *, generator=None) -> int:
        state = {
            "matmul": torch.get_float32_matmul_precision(),
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "autocast": torch.is_autocast_enabled("cpu"),
        }
        getter = getattr(torch._C, "_get_fp32_precision_getter", None)
        if getter is not None:
            state["new"] = {k: getter(*k) for k in [("cuda", "matmul"), ("cuda", "conv"), ("mkldnn", "matmul")]}
        self.seen.append(state)
        return int(inputs.shape[0])


def test_profiling_block_runs_without_tf32_or_autocast_and_restores_the_settings(precision_flags):
    """Row 5: inside the profiling block TF32 is off for matmuls (even after Lightning's
    ``set_float32_matmul_precision("high")`` hint) and for cuDNN convolutions (on by default), oneDNN does not use
    bfloat16, autocast is off; the caller's settings come back exactly."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    recorder = _Recorder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        accumulate_diagonal(_bn_cnn(), _batches(), recorder)
    assert recorder.seen and all(s["matmul"] == "highest" and s["cudnn_tf32"] is False for s in recorder.seen)
    assert not any(s["autocast"] for s in recorder.seen)
    if "new" in recorder.seen[0]:
        assert set(recorder.seen[0]["new"].values()) == {"ieee"}
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32 is True


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_profile_under_bf16_autocast_equals_the_float32_profile(estimator):
    """Row 5/7: a profile computed inside autocast (a ``*-mixed`` Trainer) is the float32 one, bit for bit."""
    net = _bn_cnn()
    reference, _ = accumulate_diagonal(net, _batches(), estimator, strict=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = accumulate_diagonal(net, _batches(), estimator, strict=False)
    for name, value in reference.items():
        assert torch.equal(mixed[name], value), name


def test_half_precision_weights_are_profiled_in_float32_and_left_bit_identical():
    """Row 7: ``*-true`` half precision: the estimator squares in float32 (the weights are promoted for the block)
    and the model leaves the block exactly as it came (dtype and bits)."""
    net = _bn_cnn().to(torch.bfloat16)
    before = {n: t.detach().clone() for n, t in net.state_dict().items()}
    sums, _ = accumulate_diagonal(net, _batches(), "exact")
    reference, _ = accumulate_diagonal(copy.deepcopy(net).float(), _batches(), "exact")
    for name, value in reference.items():
        assert sums[name].dtype == torch.float32 and torch.equal(sums[name], value), name
    for name, value in net.state_dict().items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name


def test_half_precision_trainers_are_refused(poisoned_run):
    """Row 7: ``*-true`` precision would convert the trained weights (no bit-identical hard freeze) and feed float32
    validation batches to half-precision layers: refused in ``setup`` with the alternatives."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    module = UnlearnModule(str(poisoned_run), FirstOrder(), LastLayer())
    with pytest.raises(MisconfigurationException, match="'bf16-true'.*bf16-mixed"):
        unlearn_trainer(accelerator="cpu", precision="bf16-true").fit(module)


# --------------------------------------------------------------------- row 6: determinism of unlearning runs
@pytest.mark.parametrize("config", sorted(p.name for p in (CONFIGS / "unlearn").glob("*.yaml")))
def test_unlearning_configs_ask_for_deterministic_algorithms(config):
    """Row 6: every unlearning config sets ``trainer.deterministic`` (cuDNN/cuBLAS pick deterministic kernels)."""
    assert yaml.safe_load((CONFIGS / "unlearn" / config).read_text())["trainer"]["deterministic"] is True


def test_unlearning_trainers_are_deterministic_by_default():
    """Row 6: ``unlearn.py`` without a config (``TRAINER_DEFAULTS``) and programmatic requests too."""
    assert TRAINER_DEFAULTS["deterministic"] is True
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(False)
    try:
        unlearn_trainer(accelerator="cpu")
        assert (
            torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        )
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# ------------------------------------------------------------------------ row 7: mixed precision in the methods
def _linear_problem():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y_true = torch.randn(10, 6), torch.randint(0, 3, (10,))
    return net, x, (y_true + 1) % 3, y_true


def test_one_step_forget_gradient_ignores_autocast():
    """Row 7: inside ``training_step`` of a ``*-mixed`` Trainer the forget gradient is still the float32 one."""
    net, x, y_poisoned, y_true = _linear_problem()
    params = list(net.parameters())
    reference = forget_gradient(net, x, y_poisoned, y_true, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = forget_gradient(net, x, y_poisoned, y_true, params)
    for a, b in zip(mixed, reference, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_one_step_forget_gradient_of_half_weights_is_float32():
    """Row 7: with ``*-true`` half-precision weights the forget gradient is summed in float32."""
    net, x, y_poisoned, y_true = _linear_problem()
    net = net.to(torch.bfloat16)
    grads = forget_gradient(net, x.to(torch.bfloat16), y_poisoned, y_true, list(net.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)


def test_first_order_request_under_bf16_mixed_equals_float32(poisoned_run):
    """Row 7, end to end: Lightning's ``bf16-mixed`` autocasts ``training_step``; the one-step update is unchanged."""

    def run(precision: str) -> dict[str, torch.Tensor]:
        module = UnlearnModule(str(poisoned_run), FirstOrder(criterion="fixed", steps=[3e-5]), TopKParameters(0.05))
        unlearn_trainer(accelerator="cpu", max_epochs=1, precision=precision).fit(module)
        return {n: p.detach().clone() for n, p in module.net.named_parameters()}

    reference, mixed = run("32-true"), run("bf16-mixed")
    for name, value in reference.items():
        assert torch.equal(mixed[name], value), name


def test_sam_perturbation_gradient_is_loss_scaled_under_16_mixed():
    """Row 7: SAM-forget's perturbation gradient comes from ``torch.autograd.grad``, outside ``manual_backward``'s
    loss scaling: in float16 a small forget gradient underflows to zero and the perturbation is silently skipped. It
    is scaled like ``manual_backward`` scales (the direction does not depend on the scale)."""
    net, x, y_poisoned, y_true = _linear_problem()
    named = dict(net.named_parameters())
    everything = ParameterMask({n: torch.ones_like(p, dtype=torch.bool) for n, p in named.items()}, "all")

    def perturbation(scaler) -> Perturbation:
        plugin = SimpleNamespace(scaler=scaler)
        module = SimpleNamespace(
            attached_trainer=SimpleNamespace(precision_plugin=plugin),
            all_reduce_sum=lambda t: t,
            guard=FreezeGuard(net, everything),
        )
        with torch.autocast("cpu", dtype=torch.float16):
            loss = 1e-7 * F.cross_entropy(net(x), y_true)  # a small forget loss: its float16 gradient underflows
        grads = synced_gradient(module, loss, named)
        eps = Perturbation(list(named.values()), grads, rho=0.05)
        eps.restore()
        return eps

    assert not perturbation(None).applied  # what happened under 16-mixed before: skipped
    assert perturbation(torch.amp.GradScaler("cpu", init_scale=2.0**16)).applied


# ------------------------------------------------------------------------ row 8: host synchronisations of SAM
def test_sam_perturbation_synchronises_with_the_host_once(monkeypatch):
    """Row 8: one device-to-host transfer per perturbation, not one per parameter (``float(norm)``, ``alpha=``)."""
    net, *_ = _linear_problem()
    params = list(net.parameters())
    grads = [torch.randn_like(p) for p in params]
    calls = []
    for method in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    eps = Perturbation(params, grads, rho=0.1, adaptive=True)
    monkeypatch.undo()
    assert eps.applied and len(params) == 4
    assert len(calls) == 1, calls


# --------------------------------------------------------------------------------- row 9: collectives per step
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_all_reduce_sum_is_one_collective_without_a_barrier(monkeypatch):
    """Row 9: ``strategy.reduce`` puts a barrier (itself a collective, and a host synchronisation on NCCL) before
    every all-reduce; the methods' sums go straight to ``all_reduce`` (a 1-process gloo group shows the calls)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        barriers, reduces = [], []
        monkeypatch.setattr(dist, "barrier", lambda *a, **k: barriers.append(1))
        real_all_reduce = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: reduces.append(1) or real_all_reduce(*a, **k))
        stub = SimpleNamespace(_distributed=True, trainer=SimpleNamespace(strategy=DDPStrategy()))
        stub._all_reduce = lambda flat, op="sum": UnlearnModule._all_reduce(stub, flat, op)
        tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(2.0)}
        out = UnlearnModule.all_reduce_sum(stub, tensors)
        assert torch.equal(out["a"], tensors["a"]) and torch.equal(out["b"], tensors["b"])
        assert (len(barriers), len(reduces)) == (0, 1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("method", "expected"),
    [(lambda: NegGradPlus(), 1), (lambda: SamForget(rho=0.1), 2), (lambda: SharpMinMax(rho=0.1), 3)],
    ids=["neggrad_plus", "sam_forget", "sharp_minmax"],
)
def test_all_reduces_per_step(method, expected):
    """Row 9: a step's sample counts of the forget and retain batches travel in one all-reduce (NegGrad+: 1 per step,
    SAM-forget: counts + perturbation gradient = 2, Sharp MinMax: counts + one per branch = 3; they were 2, 3, 4)."""
    selected = {"net.2.weight": torch.ones(3, 4, dtype=torch.bool)}
    module = TinyModule(method(), selected, [make_batch(0)])
    calls = []
    module.all_reduce_sum = lambda tensors: calls.append(sorted(tensors)) or tensors
    fit(module)
    assert len(calls) == expected, calls


# ------------------------------------------------------------------------ row 10: timings of one-step methods
def test_device_clock_synchronises_the_device_before_reading_the_clock(monkeypatch):
    """Row 10: CUDA runs kernels asynchronously; the clock is read after ``torch.cuda.synchronize``."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    cost.device_clock(torch.device("cuda", 1))
    cost.device_clock("cpu")
    cost.device_clock(None)
    assert synced == [torch.device("cuda", 1)]


def test_one_step_timings_read_the_device_clock_of_the_module(poisoned_run, monkeypatch):
    """Row 10: every clock reading of a one-step request goes through :func:`device_clock` with the module's device
    (gradient batches, the all-reduce, the validation class weights, the direction, the search)."""
    devices = []
    real = one_step_module.device_clock
    monkeypatch.setattr(one_step_module, "device_clock", lambda device: devices.append(device) or real(device))
    module = UnlearnModule(str(poisoned_run), FirstOrder(criterion="fixed", steps=[1e-4], batch_size=64), LastLayer())
    unlearn_trainer(accelerator="cpu", max_epochs=1).fit(module)
    batches = -(-module.method.result["forget_samples"] // 64)
    assert len(devices) == 2 * batches + 8 and set(devices) == {module.device}


# ------------------------------------------------------------------ row 11: kernel sizes, draws, host copies
def test_chunking_on_an_accelerator_takes_large_pieces():
    """Row 11: the CPU's 32 MiB caps made thousands of tiny kernels on a GPU; on an accelerator the automatic budget
    is at least 1 GiB and the product temporaries up to 256 MiB. CPU chunks are unchanged (bit-identical sums)."""
    net = _bn_cnn()
    x = torch.randn(256, 1, 8, 8)
    from lightning_unlearn.curvature._engine.capture import partition

    layers, _ = partition(net, "exact", x)
    plan = planner.measure(net, layers, x, set(), lambda c: c - 1, Settings(), "exact")
    tight = Settings(min_auto_budget=2**16)
    cpu = planner.chunking(256, plan, net, None, tight, torch.device("cpu"))
    assert cpu == planner.chunking(256, plan, net, None, tight)  # the CPU default, as before
    gpu = planner.chunking(256, plan, net, None, tight, torch.device("cuda"))
    assert cpu[0] < 256 and gpu[0] == 256 and gpu[1] >= 8 * cpu[1]
    assert planner.chunking(256, plan, net, 1.0, tight, torch.device("cuda"))[0] < 256  # an explicit budget holds


def test_estimator_chunks_for_the_device_of_its_inputs(monkeypatch):
    """Row 11: the estimator tells the planner where it runs."""
    from lightning_unlearn.curvature import squared

    seen = []
    real = squared.chunking
    monkeypatch.setattr(squared, "chunking", lambda *a: seen.append(a[-1]) or real(*a))
    accumulate_diagonal(_bn_cnn(), _batches(), "exact")
    assert seen and all(d == torch.device("cpu") for d in seen)


def test_hutchinson_draws_once_per_batch_with_the_same_probes(monkeypatch):
    """Row 11: one host draw (and one copy to the device) per batch instead of one per parameter and probe; the
    probes, hence the estimate, are bit-identical to the per-parameter draws."""
    net, batches = _bn_cnn(), _batches()
    estimator = HutchinsonDiagonal(num_probes=3)
    draws = []
    real = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: draws.append(a) or real(*a, **k))
    sums, _ = accumulate_diagonal(net, batches, estimator, seed=4)
    monkeypatch.undo()
    assert len(draws) == len(batches)

    # the same estimate from per-parameter, per-probe draws (what the estimator did before)
    from lightning_unlearn.curvature._support import init_sums, make_generator

    generator, expected = make_generator(4, 0), init_sums(net)
    for x, y in batches:
        params = {n: p.detach().requires_grad_(True) for n, p in net.named_parameters()}
        loss = F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        for probe in range(3):
            vs = [torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8).float() * 2 - 1 for p in grads]
            hvps = torch.autograd.grad(grads, list(params.values()), grad_outputs=vs, retain_graph=probe < 2)
            for name, v, hv in zip(params, vs, hvps, strict=True):
                expected[name] += (v * hv) * (len(x) / 3)
    for name, value in expected.items():
        assert torch.equal(sums[name], value), name


class _CopySpy(torch.Tensor):
    """A tensor that records the ``non_blocking`` flag of its ``.to`` calls."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cls.calls.append(kwargs.get("non_blocking", False))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out


def test_profiling_copies_are_blocking_from_pageable_memory():
    """Row 11: ``non_blocking=True`` from pageable (unpinned) memory is a synchronous copy in disguise, and a real
    hazard in the other direction; the profiling loop asks for it only from pinned memory to a CUDA device."""
    _CopySpy.calls = []
    x, y = _batches()[0]
    accumulate_diagonal(_bn_cnn(), [(x.as_subclass(_CopySpy), y)], "fisher")
    assert _CopySpy.calls and not any(_CopySpy.calls)


def test_unlearning_loaders_pin_memory_for_cuda(poisoned_run, monkeypatch):
    """Row 11: batches bound for a CUDA device come from pinned memory (Lightning's copies are then asynchronous)."""
    module = UnlearnModule(str(poisoned_run), FirstOrder(), LastLayer())
    dataset = [(torch.zeros(1), 0)] * 4
    assert module.loader(dataset).pin_memory is False
    monkeypatch.setattr(UnlearnModule, "_target_device", property(lambda self: torch.device("cuda", 0)))
    assert module.loader(dataset).pin_memory is True


# ------------------------------------------------------------------ row 12: one device for every evaluation
def test_accelerator_device_names_where_a_trainer_computes(monkeypatch):
    """Row 12 (helper): the demo and the benchmarks evaluate "before" and "reference" where the Trainer computes
    "after", and label results with the device they ran on."""
    assert cost.accelerator_device("cpu") == torch.device("cpu")
    assert cost.accelerator_device("gpu") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cost.accelerator_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    assert cost.device_label("cuda:0") == "cuda:0 (NVIDIA H200)"
    assert cost.device_label("cpu").startswith("cpu (")
    with pytest.raises(ValueError, match="accelerator"):
        cost.accelerator_device("tpu")
