"""Speed and memory of the Hessian-diagonal estimators, relative to one training step, and against BackPACK.

For each model, on one fixed batch of random data (timings do not depend on the values), measured side by side in
one process, after a warm-up, as the median of ``--repeats`` interleaved repeats:

* ``fwd+bwd``: one training step: forward, mean cross-entropy, backward to the parameter gradients (eval mode, as
  the estimators run in eval mode);
* ``exact``, ``mc`` (k=1), ``fisher``, ``hutchinson`` (k=1): one ``accumulate`` call of the estimator on the batch
  (the estimator object is reused across repeats, as it is across the batches of a profiling run);
* ``exact passes`` (with ``--phases``): ``exact`` with its per-sample products switched off (``products=False``),
  i.e. its forward pass and ``C-1`` backward passes to the layer outputs only; ``exact`` minus this is the time of
  the products. A diagnostic of where the time goes (its diagonal is empty, and its memory is not measured);
* ``backpack``: BackPACK's ``DiagGGNExact`` (forward + ``backward`` inside ``with backpack(...)``), when
  ``backpack-for-pytorch`` is installed, and the largest relative difference between its diagonal and ``exact``'s.

Time is reported in milliseconds and as a ratio to ``fwd+bwd``. Peak memory: on CUDA, ``torch.cuda`` peak allocation
above the level before the call; on CPU each measurement runs in a fresh subprocess, which resets its resident-set
high-water mark (Linux ``/proc/self/clear_refs``) right before the call and reports the peak (``VmHWM``) minus the
resident set before the call (in MiB and as a ratio to the step's increase); the median of ``--memory-repeats``
subprocesses is reported, as the resident set of small runs varies by a few MiB. ``exact``, ``mc`` and ``fisher`` run
with their automatic memory budget unless ``--max-memory-mb`` is given. The overlap of the top-1 % parameters
of ``mc`` (k=1) with those of ``exact`` on the same batch is reported too. Prints a markdown table and writes the
results to a JSON file (atomically).

    .venv/bin/python benchmarks/profile_speed.py --repeats 5
    .venv/bin/python benchmarks/profile_speed.py --models mnist_cnn --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch import nn  # noqa: E402

from lightning_unlearn.curvature import ESTIMATORS, get_estimator  # noqa: E402
from lightning_unlearn.curvature.squared import SquaredGradientEstimator  # noqa: E402
from lightning_unlearn.models.cnn import MnistCNN  # noqa: E402
from lightning_unlearn.models.resnet import ResNet18  # noqa: E402
from lightning_unlearn.utils import atomic_write, atomic_write_text  # noqa: E402


class ViT(nn.Module):
    """A Vision Transformer for 28×28 images: 7×7 patches (16 tokens), a learnt positional embedding, ``depth``
    pre-norm ``nn.TransformerEncoderLayer`` (attention, GELU, LayerNorm), mean-pool, head."""

    def __init__(self, dim: int, depth: int, heads: int, mlp: int, num_classes: int = 10) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, dim, kernel_size=7, stride=7)
        self.positions = nn.Parameter(torch.randn(16, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.positions
        return self.head(self.norm(self.encoder(tokens)).mean(1))


class Mixer(nn.Module):
    """An MLP-Mixer for 28×28 images: 7×7 patches (16 tokens), ``depth`` blocks of a token-mixing and a
    channel-mixing MLP (LayerNorm, GELU), mean-pool, head."""

    def __init__(self, dim: int, depth: int, hidden: int, num_classes: int = 10) -> None:
        super().__init__()
        self.patches = nn.Conv2d(1, dim, kernel_size=7, stride=7)
        def mlp(width: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm1": nn.LayerNorm(dim), "tokens": mlp(16), "norm2": nn.LayerNorm(dim), "channels": mlp(dim)}
            )
            for _ in range(depth)
        )  # fmt: skip
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patches(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = h + block["tokens"](block["norm1"](h).transpose(1, 2)).transpose(1, 2)
            h = h + block["channels"](block["norm2"](h))
        return self.head(h.mean(1))


class TextClassifier(nn.Module):
    """Token ids → ``nn.Embedding`` + a learnt positional embedding → ``depth`` pre-norm ``TransformerEncoderLayer``
    → mean-pool → head."""

    def __init__(self, vocab: int, length: int, dim: int, depth: int, heads: int, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.positions).mean(1))


MODELS: dict[str, dict[str, Any]] = {
    # transformers: the per-layer rules take the convolution, the feed-forward Linear layers and the head; attention,
    # LayerNorm and the positional embedding take the engine's generic torch.func path (``exact`` is the GGN's there)
    "vit_tiny": {
        "build": lambda: ViT(dim=32, depth=2, heads=4, mlp=64),
        "input": (1, 28, 28),
        "batch": 128,
        "label": "tiny ViT (2 layers, width 32)",
    },
    "vit_5m": {
        "build": lambda: ViT(dim=320, depth=6, heads=8, mlp=640),
        "input": (1, 28, 28),
        "batch": 32,
        "label": "ViT (6 layers, width 320)",
    },
    "mixer": {
        "build": lambda: Mixer(dim=64, depth=2, hidden=128),
        "input": (1, 28, 28),
        "batch": 128,
        "label": "MLP-Mixer (2 blocks, width 64)",
    },
    "text": {
        "build": lambda: TextClassifier(vocab=1000, length=32, dim=64, depth=2, heads=4),
        "input": (32,),
        "vocab": 1000,
        "batch": 128,
        "label": "token classifier (embedding 1000×64, 2 layers, 32 tokens)",
    },
    "mnist_cnn": {"build": lambda: MnistCNN(num_classes=10), "input": (1, 28, 28), "batch": 128, "label": "MNIST CNN"},
    "resnet18": {
        "build": lambda: ResNet18(num_classes=10, in_channels=3, stem="cifar"),
        "input": (3, 32, 32),
        "batch": 32,
        "label": "ResNet-18 (CIFAR stem)",
    },
    # the model of configs/cifar10_resnet18_targeted.yaml: torchvision's stem (7x7 stride-2 conv, max-pool)
    "resnet18_imagenet_stem": {
        "build": lambda: ResNet18(num_classes=10, in_channels=3, stem="imagenet"),
        "input": (3, 32, 32),
        "batch": 32,
        "label": "ResNet-18 (ImageNet stem)",
    },
}
ESTIMATOR_NAMES = ("exact", "mc", "fisher", "hutchinson")  # each with one draw / probe (k=1)
#: Hutchinson with four probes, the yardstick of ``exact`` on architectures the per-layer rules do not cover.
HUTCHINSON_4 = "hutchinson4"
METHODS = ("fwd+bwd", *ESTIMATOR_NAMES, HUTCHINSON_4, "backpack")


def have_backpack() -> bool:
    try:
        import backpack  # noqa: F401
    except ImportError:
        return False
    return True


def setup(model_name: str, device: torch.device, batch: int | None) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = spec["build"]().to(device).eval()
    n = batch or spec["batch"]
    if "vocab" in spec:  # token ids
        x = torch.randint(0, spec["vocab"], (n, *spec["input"]), device=device)
    else:
        x = torch.randn(n, *spec["input"], device=device)
    y = torch.randint(0, 10, (n,), device=device)
    return model, x, y


PASSES = "exact passes"


def estimator_options(kind: str, max_memory_mb: float | None = None) -> dict[str, Any]:
    """The options of estimator ``kind`` with one draw / probe, as the profiling loop builds them; ``max_memory_mb``
    for the estimators that take it (the squared-gradient ones)."""
    cls = ESTIMATORS[kind]
    options = cls.options_for(num_draws=1)
    if max_memory_mb is not None and issubclass(cls, SquaredGradientEstimator):
        options["max_memory_mb"] = max_memory_mb
    return options


def make_methods(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], max_memory_mb: float | None = None
) -> dict[str, Callable[[], dict[str, torch.Tensor] | None]]:
    """Zero-argument callables, one per method; estimator methods return the mean-loss diagonal.

    ``max_memory_mb`` is passed to the estimators that take it (``exact``, ``mc``, ``fisher``); ``None``: their
    automatic budget. ``names`` may include :data:`PASSES` (see the module docstring).
    """
    methods: dict[str, Callable[[], dict[str, torch.Tensor] | None]] = {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    methods["fwd+bwd"] = step
    for name in names:
        if name == "backpack":
            continue
        kind = "exact" if name == PASSES else "hutchinson" if name == HUTCHINSON_4 else name
        options = estimator_options(kind, max_memory_mb)
        if name == PASSES:
            options["products"] = False
        if kind == "exact":
            options["strict"] = False  # the GGN diagonal of any architecture (the Hessian's where they coincide)
        if name == HUTCHINSON_4:
            options["num_probes"] = 4
        estimator = get_estimator(kind, **options)

        def run(estimator: Any = estimator) -> dict[str, torch.Tensor]:
            sums: dict[str, torch.Tensor] = {}  # filled with zeros by `accumulate`; default generator: seed 0
            count = estimator.accumulate(model, x, y, sums)
            for value in sums.values():  # in place: a copy would add a parameter-sized block to the peak memory
                value.div_(count)
            return sums

        methods[name] = run
    if "backpack" in names and have_backpack():
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact

        bp_model = extend(copy.deepcopy(model), use_converter=True).eval()
        bp_loss = extend(nn.CrossEntropyLoss())
        bp_names = [name for name, _ in bp_model.named_parameters()]
        our_names = [name for name, _ in model.named_parameters()]

        def run_backpack() -> dict[str, torch.Tensor]:
            bp_model.zero_grad(set_to_none=True)
            loss = bp_loss(bp_model(x), y)
            with backpack(DiagGGNExact()):
                loss.backward()
            # the converter may rename parameters; they keep their order
            return {ours: p.diag_ggn_exact for ours, p in zip(our_names, bp_model.parameters(), strict=True)}

        assert len(bp_names) == len(our_names)
        methods["backpack"] = run_backpack
    return methods


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(
    methods: dict[str, Callable], repeats: int, device: torch.device, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    for fn in methods.values():  # warm-up (twice: the estimators size their buffers on the first call)
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():  # interleaved, so that load changes hit every method alike
            sync(device)
            start = clock()
            fn()
            sync(device)
            times[name].append(clock() - start)
    return times


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|a - b| / max|b| (each tensor normalised by its own largest entry)."""
    worst = 0.0
    for name, ref in b.items():
        scale = ref.abs().max().item()
        if scale > 0:
            worst = max(worst, (a[name].double() - ref.double()).abs().max().item() / scale)
    return worst


def top_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], fraction: float = 0.01) -> float:
    """Share of the top-``fraction`` parameters (by value, over all parameters) of ``b`` that are also top in ``a``."""
    fa = torch.cat([v.reshape(-1) for v in a.values()]).double().cpu()
    fb = torch.cat([b[name].reshape(-1) for name in a]).double().cpu()
    k = max(1, round(fraction * fa.numel()))
    ta = set(torch.topk(fa, k).indices.tolist())
    tb = set(torch.topk(fb, k).indices.tolist())
    return len(ta & tb) / k


def memory_probe(
    model_name: str,
    method: str,
    device_name: str,
    batch: int | None,
    threads: int | None,
    max_memory_mb: float | None = None,
) -> None:
    """Child process: print the memory increase (bytes) of one call of ``method``, as JSON."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    model, x, y = setup(model_name, device, batch)
    methods = make_methods(model, x, y, [method] if method != "fwd+bwd" else [], max_memory_mb)
    fn = methods[method]
    with torch.no_grad():
        model(x)  # allocator and thread pools warm, before the baseline
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        increase = torch.cuda.max_memory_allocated(device) - before
    else:
        before = reset_peak_rss()
        fn()
        increase = peak_rss() - before
    print(json.dumps({"bytes": int(increase)}))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the resident-set high-water mark (Linux ``clear_refs``) and return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux: fall back on ru_maxrss, which cannot be reset (the child starts small enough)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 1024 * (_status_kib("VmRSS") or 0)


def peak_rss() -> int:
    """Resident-set high-water mark in bytes (``VmHWM``; ``ru_maxrss`` where /proc is unavailable)."""
    hwm = _status_kib("VmHWM")
    return 1024 * hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(
    model_name: str,
    methods: list[str],
    device: str,
    batch: int | None,
    threads: int | None,
    max_memory_mb: float | None = None,
    repeats: int = 3,
) -> dict[str, int]:
    """Peak memory increase of one call of every method: the median over ``repeats`` fresh subprocesses each."""
    out = {}
    for method in methods:
        command = [sys.executable, __file__, "--_memory-probe", model_name, method, "--device", device]
        if batch:
            command += ["--batch-size", str(batch)]
        if threads:
            command += ["--threads", str(threads)]
        if max_memory_mb is not None:
            command += ["--max-memory-mb", repr(max_memory_mb)]
        values = []
        for _ in range(max(1, repeats)):
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            values.append(json.loads(result.stdout.strip().splitlines()[-1])["bytes"])
        out[method] = int(statistics.median(values))
    return out


#: The figure ``--figure`` draws, and the committed results it reads (``docs/performance.md`` shows it).
FIGURE = ROOT / "docs" / "figures" / "estimators.png"
FIGURE_SOURCES = ("benchmarks/results/profile_speed.json", "benchmarks/results/profile_speed_transformers.json")


def estimators_figure(results: list[dict[str, Any]]) -> Any:
    """Each estimator's time as × one training step, per model (log scale), from results files of this script;
    under each model, ``exact``'s largest relative difference from BackPACK where BackPACK computes the model."""
    from lightning_unlearn.evaluation.figures import pyplot

    plt = pyplot()

    names = ("exact", "mc", "fisher", "hutchinson", HUTCHINSON_4, "backpack")
    models = [m for r in results for m in r["models"].values()]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - len(names) / 2 + 0.5) * width for j, m in enumerate(models) if name in m["methods"]]
        ys = [m["methods"][name]["ratio"] for m in models if name in m["methods"]]
        label = {HUTCHINSON_4: "hutchinson (k=4)", "backpack": "BackPACK DiagGGNExact"}.get(name, name)
        ax.bar(xs, ys, width, label=label)
    labels = []
    for m in models:
        diff = m.get("backpack_max_rel_diff")
        labels.append(textwrap.fill(m["label"], 22) + (f"\nvs BackPACK {diff:.0e}" if diff is not None else ""))
    ax.set_xticks(range(len(models)), labels, fontsize=6.5)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("time, × one training step", fontsize=8)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Hessian-diagonal estimators on one batch (CPU, 2 threads)", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after the warm-up (default: 5)")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)} (default: all)"
    )
    parser.add_argument(
        "--estimators",
        default="exact,mc,fisher,hutchinson",
        help=f"comma-separated estimators (default: the four with k=1; also {HUTCHINSON_4!r}: Hutchinson, 4 probes)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch size (128 CNN, 32 ResNet)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--max-memory-mb",
        type=float,
        default=None,
        help="memory budget of exact/mc/fisher in MiB (default: their automatic budget, one training step's memory)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: CPU time of this process (all threads), less sensitive to other "
        "processes on a shared machine (use with --threads 1 on CPU)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the (slower) peak-memory measurements")
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=3,
        help="fresh subprocesses per peak-memory figure, of which the median is reported (default: 3)",
    )
    parser.add_argument("--no-backpack", action="store_true", help="skip BackPACK even if it is installed")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also time 'exact passes': exact without its per-sample products (forward and backward passes only)",
    )
    parser.add_argument(
        "--out", default="benchmarks/results/profile_speed.json", help="JSON output file (written atomically)"
    )
    parser.add_argument(
        "--figure",
        action="store_true",
        help=f"only draw {FIGURE.relative_to(ROOT)} from the committed results files {list(FIGURE_SOURCES)}",
    )
    parser.add_argument("--_memory-probe", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.figure:
        figure = estimators_figure([json.loads((ROOT / f).read_text()) for f in FIGURE_SOURCES if (ROOT / f).is_file()])
        atomic_write(FIGURE, lambda handle: figure.savefig(handle, format="png", dpi=110, metadata={"Software": None}))
        print(f"figure: {FIGURE}")
        return {}
    if args._memory_probe:
        memory_probe(*args._memory_probe, args.device, args.batch_size, args.threads, args.max_memory_mb)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    estimators = [e for e in args.estimators.split(",") if e]
    unknown = [e for e in estimators if e not in (*ESTIMATOR_NAMES, HUTCHINSON_4)]
    if unknown:
        parser.error(f"unknown estimators {unknown}; choose from {[*ESTIMATOR_NAMES, HUTCHINSON_4]}")
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models):
        parser.error(f"`--models` must be from {list(MODELS)}, got {models}")
    use_backpack = not args.no_backpack and have_backpack()
    names = estimators + ([PASSES] if args.phases else []) + (["backpack"] if use_backpack else [])
    results: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "clock": "wall time (perf_counter)" if args.clock == "wall" else "process CPU time (process_time)",
        "backpack": use_backpack,
        "max_memory_mb": args.max_memory_mb,
        "step": "forward + mean cross-entropy + backward to parameter .grad, eval mode",
        "memory_method": None
        if args.no_memory
        else (
            "torch.cuda.max_memory_allocated increase"
            if device.type == "cuda"
            else "peak RSS (VmHWM, reset before the call) minus RSS before one call, each method in a fresh "
            f"subprocess, median of {args.memory_repeats}"
        ),
        "models": {},
    }
    for model_name in models:
        model, x, y = setup(model_name, device, args.batch_size)
        methods = make_methods(model, x, y, names, args.max_memory_mb)
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        times = time_methods(methods, args.repeats, device, clock)
        step = statistics.median(times["fwd+bwd"])
        entry: dict[str, Any] = {
            "label": MODELS[model_name]["label"],
            "batch": int(x.shape[0]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "methods": {},
        }
        for name, ts in times.items():
            entry["methods"][name] = {
                "ms": 1e3 * statistics.median(ts),
                "ratio": statistics.median(ts) / step,
                "times_ms": [1e3 * t for t in ts],
            }
        diagonals = {name: fn() for name, fn in methods.items() if name not in ("fwd+bwd", PASSES)}
        if "exact" in diagonals and "mc" in diagonals:
            entry["mc_top1_overlap_with_exact"] = top_overlap(diagonals["mc"], diagonals["exact"])
        if "exact" in diagonals and HUTCHINSON_4 in diagonals:
            exact_ms, hutchinson_ms = entry["methods"]["exact"]["ms"], entry["methods"][HUTCHINSON_4]["ms"]
            entry["exact_over_hutchinson4_time"] = exact_ms / hutchinson_ms
            # Hutchinson estimates the Hessian diagonal, exact computes the GGN's: on a transformer they differ, so this
            # is the distance between the two quantities on one batch, not only Hutchinson's sampling error
            difference = max_relative_difference(diagonals[HUTCHINSON_4], diagonals["exact"])
            entry["hutchinson4_rel_diff_from_exact"] = difference
        if "exact" in diagonals and "backpack" in diagonals:
            entry["backpack_max_rel_diff"] = max_relative_difference(diagonals["exact"], diagonals["backpack"])
            entry["exact_over_backpack_time"] = entry["methods"]["exact"]["ms"] / entry["methods"]["backpack"]["ms"]
            # per repeat (the two ran back to back, so load changes hit both): how far the ratio moves
            paired = zip(times["exact"], times["backpack"], strict=True)
            entry["exact_over_backpack_paired"] = [exact / backpack for exact, backpack in paired]
        if not args.no_memory:
            memory = measure_memory(
                model_name,
                [name for name in methods if name != PASSES],
                args.device,
                args.batch_size,
                args.threads,
                args.max_memory_mb,
                args.memory_repeats,
            )
            base = max(1, memory["fwd+bwd"])
            for name, value in memory.items():
                entry["methods"][name]["peak_mib"] = value / 2**20
                entry["methods"][name]["memory_ratio"] = value / base
        results["models"][model_name] = entry
        del model, methods, diagonals
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(format_markdown(results))
    print(f"\nwritten to {args.out}")
    return results


def format_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"device {results['device']}, torch {results['torch']}, {results['threads']} threads, "
        f"{results['clock']}, median of {results['repeats']} repeats; "
        f"memory: {results['memory_method'] or 'not measured'}",
        "",
        "| model | method | time (ms) | × fwd+bwd | peak mem (MiB) | mem × fwd+bwd |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for entry in results["models"].values():
        for name, m in entry["methods"].items():
            label = {"mc": "mc (k=1)", "hutchinson": "hutchinson (k=1)", HUTCHINSON_4: "hutchinson (k=4)",
                     "backpack": "BackPACK DiagGGNExact"}.get(  # fmt: skip
                name, name
            )
            mem = f"{m['peak_mib']:.0f}" if "peak_mib" in m else "-"
            mem_ratio = f"{m['memory_ratio']:.2f}" if "memory_ratio" in m else "-"
            lines.append(
                f"| {entry['label']} (batch {entry['batch']}) | {label} | {m['ms']:.1f} | {m['ratio']:.2f} | "
                f"{mem} | {mem_ratio} |"
            )
    lines.append("")
    for entry in results["models"].values():
        notes = []
        if "exact_over_backpack_time" in entry:
            paired = entry.get("exact_over_backpack_paired") or [entry["exact_over_backpack_time"]]
            notes.append(
                f"exact / BackPACK time = {entry['exact_over_backpack_time']:.2f} "
                f"(per repeat {min(paired):.2f}–{max(paired):.2f})"
            )
            notes.append(f"max relative difference vs BackPACK = {entry['backpack_max_rel_diff']:.1e}")
        if "mc_top1_overlap_with_exact" in entry:
            notes.append(f"mc (k=1) top-1 % overlap with exact = {entry['mc_top1_overlap_with_exact']:.2f}")
        methods = entry["methods"]
        if PASSES in methods and "exact" in methods:
            passes, exact = methods[PASSES]["ratio"], methods["exact"]["ratio"]
            notes.append(f"exact = {passes:.2f}× step in forward/backward passes + {exact - passes:.2f}× in products")
        if notes:
            lines.append(f"- {entry['label']}: " + "; ".join(notes))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
