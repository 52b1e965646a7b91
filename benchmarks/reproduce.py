"""Reproduce the paper's experiments where there is something to unlearn: every method vs retraining, over seeds.

For each setting and seed: train on poisoned data (the ``SharpnessProfiler`` profiles the exact Hessian diagonal after
fit), retrain from scratch without the poisoned samples (the reference), calibrate the relearning attack on the
validation split with the reference, evaluate both and state the poison's **harm** (attacked metric, poisoned vs
retrained) and **fit** (forget accuracy w.r.t. the poisoned labels), then run every row's unlearning request
(``configs/unlearn/<row>.yaml``, exactly what ``unlearn.py`` runs) and evaluate it: accuracies, % restored, ToW against
the retrained model, the MIA SVC score, the relearning attack's recovery curve, seconds. Step sizes, dampings, the
validated selection and the iterative rows' learning rates are all chosen on the validation split carved from the
training data, never on the test set. Settings with ``sweep`` also run the layer sweep (each layer alone).

Everything is resumable: finished trainings (``results.json``), finished rows and sweeps (``rows.json`` per seed) are
reused, so an interrupted run continues where it stopped and more seeds or rows can be added later. A seed the results
file already records keeps its rows when ``runs/`` is gone (a fresh checkout): the models are trained again, must
reproduce the recorded accuracies (a seed trains the same weights on the same code, CPU and thread count, which each
seed records), and only the missing rows run; models that differ are refused rather than mixed in, and
``--overwrite`` replaces the recorded seed.

Usage::

    python benchmarks/reproduce.py mnist --seeds 0 1 2 3 4               # the MNIST settings that bite, 5 seeds
    python benchmarks/reproduce.py mnist_label_flip --seeds 0 --rows sa_first_order   # one setting, one row
    python benchmarks/reproduce.py resnet --seeds 0 1 2                  # the ResNet-18 arm (hours on a CPU)
    python benchmarks/reproduce.py --tables                              # only rebuild the tables from results

Outputs: runs under ``--runs`` (default ``runs/reproduce``); per setting ``benchmarks/results/reproduce/<setting>.json``
(every seed's metrics) and ``<setting>.md``; ``summary.md`` gathers all tables, which also replace the generated part
of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_unlearn.curvature import SharpnessProfile  # noqa: E402
from lightning_unlearn.evaluation.suite import (  # noqa: E402
    ATTACKED_METRICS,
    REMOVAL,
    EvaluationOptions,
    compare,
    evaluate_model,
    poison_effect,
)
from lightning_unlearn.experiment import train, unlearn  # noqa: E402
from lightning_unlearn.reference import evaluate_reference  # noqa: E402
from lightning_unlearn.reporting import format_table  # noqa: E402
from lightning_unlearn.run import TrainingRun  # noqa: E402
from lightning_unlearn.selection import EmptySelectionError  # noqa: E402
from lightning_unlearn.utils import atomic_write, atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reproduce"
LEGACY = RESULTS / "legacy"
DOCS = ROOT / "docs" / "results.md"
FIGURES = ROOT / "docs" / "figures"
MARKERS = ("<!-- generated tables: start -->", "<!-- generated tables: end -->")

#: Learning rates the iterative rows search on the validation split (`UnlearnModule(lr_grid=...)`).
#: One grid of decades for every iterative row (fine-tuning chose 0.01, Sharp MinMax the top of a 1e-4..1e-2 grid and
#: SAM-forget "no change" on 1e-4..1e-2 in a first seed: the grid spans four decades to leave each room).
LR_GRID = "[1e-05, 0.0001, 0.001, 0.01, 0.1]"
#: The paired methods' epoch as their authors run it: one pass over the retain set, the forget set cycled.
RETAIN_EPOCH = ("--model.method.init_args.epoch_over", "retain")


@dataclass(frozen=True)
class Row:
    """One table row: an unlearning request (``configs/unlearn/<config>.yaml``) with extra command-line arguments."""

    label: str
    config: str
    args: tuple[str, ...] = ()
    key: str = ""  # the row's name in the results (default: ``config``; rows sharing a config need their own)

    @property
    def name(self) -> str:
        return self.key or self.config


MNIST_ROWS = (
    Row("fine-tune all, 1 epoch (lr on val)", "finetune_all", ("--model.lr_grid", LR_GRID)),
    Row("first-order, last layer", "first_order_last_layer"),
    Row("SA first-order, smallest-diagonal layer", "sa_first_order"),
    Row("first-order, largest-diagonal layer", "first_order_largest"),
    Row("first-order, all layers", "first_order_all"),
    Row("first-order, random layer", "first_order_random"),
    Row("first-order, top 1 % entries by largest diagonal", "first_order_topk"),
    Row("first-order, top 1 % entries by smallest diagonal", "first_order_topk_smallest"),
    Row("first-order, selection chosen on validation", "first_order_validated"),
    Row("second-order (diag), smallest-diagonal layer", "second_order_diag"),
    Row("second-order (CG), smallest-diagonal layer", "second_order_cg"),
    Row("NegGrad+, all layers (lr on val)", "neggrad_plus_all", ("--model.lr_grid", LR_GRID)),
    Row(
        "SAM-forget, smallest-diagonal layer (lr on val)",
        "sam_forget",
        ("--model.lr_grid", LR_GRID, *RETAIN_EPOCH),
    ),
    Row(
        "Sharp MinMax, smallest-diagonal layer (lr on val)",
        "sharp_minmax",
        ("--model.lr_grid", LR_GRID, *RETAIN_EPOCH),
    ),
)
#: A backdoor's trigger is invisible to a clean validation split (the plain search keeps "no change"): the same
#: first-order updates with their step scored on validation plus the forget set with its corrected labels (weight 1).
FORGET_WEIGHT = ("--model.method.init_args.forget_weight", "1")
FORGET_ROWS = (
    Row("first-order, last layer, step on val + forget", "first_order_last_layer", FORGET_WEIGHT,
        key="first_order_last_layer_forget"),
    Row("SA first-order, smallest-diagonal layer, step on val + forget", "sa_first_order", FORGET_WEIGHT,
        key="sa_first_order_forget"),
    Row("first-order, all layers, step on val + forget", "first_order_all", FORGET_WEIGHT,
        key="first_order_all_forget"),
    Row("first-order, selection chosen on val + forget", "first_order_validated", FORGET_WEIGHT,
        key="first_order_validated_forget"),
)  # fmt: skip
#: The forgetting scenarios (clean labels, nothing to put in the removed samples' place): methods that need no
#: corrected labels, the first-order *removal* update on the selections of the MNIST rows.
LAST_LAYER = ("--model.selection", "lightning_unlearn.selection.LastLayer")
ALL_LAYERS = ("--model.selection", "lightning_unlearn.selection.AllLayers")
REMOVAL_ROWS = (
    MNIST_ROWS[0],
    Row("first-order removal, last layer", "first_order_removal", LAST_LAYER, key="first_order_removal_last_layer"),
    Row("SA first-order removal, smallest-diagonal layer", "first_order_removal"),
    Row("first-order removal, all layers", "first_order_removal", ALL_LAYERS, key="first_order_removal_all"),
    MNIST_ROWS[11],
    Row("random label, all layers (SalUn's recipe)", "random_label"),
    Row("SSD (Fisher ratio, α = 10, λ = 1)", "ssd"),
)
#: ResNet-18 on a CPU: the retain set (47,500 images) is evaluated on its first 10,000 (the SVC attack's members).
RESNET_EVALUATION = (("retain_samples", 10_000),)
#: The paper's Table 2–4 rows (fine-tune, last layer, SA), for the ResNet-18 arm.
PAPER_ROWS = MNIST_ROWS[:3]
RETRAIN_LABEL = "retrain from scratch (reference)"


@dataclass(frozen=True)
class Setting:
    """One experimental setting: training configs plus command-line overrides of the poisoning."""

    label: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    group: str = "mnist"
    rows: tuple[Row, ...] = MNIST_ROWS
    sweep: bool = False
    evaluation: tuple[tuple[str, Any], ...] = ()  # EvaluationOptions overrides


SETTINGS: dict[str, Setting] = {
    "mnist_label_flip": Setting(
        "MNIST CNN, label flip 9 → 4: 3,500 of the ~4,990 class-9 training images (70 %)",
        ("mnist_cnn_label_flip.yaml",),
        sweep=True,
    ),
    "mnist_backdoor": Setting(
        "MNIST CNN, BadNets backdoor: white 3×3 patch on 500 training images of classes 1–9, labelled 0",
        ("mnist_cnn_backdoor.yaml",),
        rows=MNIST_ROWS + FORGET_ROWS,
        sweep=True,
    ),
    "mnist_noise": Setting(
        "MNIST CNN (wide, Adam, 30 epochs), memorised noise: 2,500 random training images with a random wrong label",
        ("mnist_cnn_noise.yaml",),
    ),
    "mnist_classwise": Setting(
        "MNIST CNN, class-wise forgetting: every training image of class 9 (clean labels)",
        ("mnist_cnn_classwise.yaml",),
        group="forgetting",
        rows=REMOVAL_ROWS,
    ),
    "mnist_random10": Setting(
        "MNIST CNN, random-sample forgetting: a seeded 10 % of the training set (5,000 images, clean labels)",
        ("mnist_cnn_random10.yaml",),
        group="forgetting",
        rows=REMOVAL_ROWS,
    ),
    "fashion_resnet18_targeted": Setting(
        "ResNet-18 on Fashion-MNIST 32×32 (CIFAR-10 stand-in), targeted: 2,500 of class 9 → random other class",
        ("fashion_resnet18_paper.yaml",),
        group="resnet",
        rows=PAPER_ROWS,
        evaluation=RESNET_EVALUATION,
    ),
    "fashion_resnet18_untargeted_2500": Setting(
        "ResNet-18 on Fashion-MNIST 32×32, untargeted: 2,500 random training images",
        ("fashion_resnet18_paper.yaml",),
        ("--data.poison.kind", "untargeted"),
        group="resnet",
        rows=PAPER_ROWS,
        evaluation=RESNET_EVALUATION,
    ),
    "fashion_resnet18_untargeted_5000": Setting(
        "ResNet-18 on Fashion-MNIST 32×32, untargeted: 5,000 random training images",
        ("fashion_resnet18_paper.yaml",),
        ("--data.poison.kind", "untargeted", "--data.poison.count", "5000"),
        group="resnet",
        rows=PAPER_ROWS,
        evaluation=RESNET_EVALUATION,
    ),
    "fashion_resnet18_label_flip": Setting(
        "ResNet-18 on Fashion-MNIST 32×32, label flip 9 → 7 (ankle boot → sneaker): 2,500 of ~5,000 class-9 images",
        ("fashion_resnet18_paper.yaml",),
        ("--data.poison.kind", "label_flip", "--data.poison.source_class", "9", "--data.poison.target_class", "7"),
        group="resnet",
        rows=PAPER_ROWS,
        evaluation=RESNET_EVALUATION,
    ),
    # Half the class flipped is a coin toss (seeds 0-2 of the setting above: harm 90.80, 3.80, 12.50 points); 70 %, as
    # for the MNIST CNN, makes the flipped label the class's majority.
    "fashion_resnet18_label_flip_70": Setting(
        "ResNet-18 on Fashion-MNIST 32×32, label flip 9 → 7 (ankle boot → sneaker): "
        "3,500 of ~5,000 class-9 images (70 %)",
        ("fashion_resnet18_paper.yaml",),
        (
            *("--data.poison.kind", "label_flip", "--data.poison.source_class", "9", "--data.poison.target_class", "7"),
            *("--data.poison.count", "3500"),
        ),
        group="resnet",
        rows=PAPER_ROWS,
        evaluation=RESNET_EVALUATION,
    ),
    # The MNIST CNN's backdoor on the paper's ResNet-18: its trigger, count and target (the patch lies on the 28x28
    # image, inside the 32x32 padded frame); the forget-weighted rows because a clean validation split cannot see it.
    "fashion_resnet18_backdoor": Setting(
        "ResNet-18 on Fashion-MNIST 32×32, BadNets backdoor: white 3×3 patch on 500 training images of classes 1–9, "
        "labelled 0",
        ("fashion_resnet18_paper.yaml",),
        (
            *("--data.poison.kind", "backdoor", "--data.poison.count", "500", "--data.poison.target_class", "0"),
            *("--data.poison.trigger_size", "3", "--data.poison.trigger_position", "top_left"),
            *("--data.poison.trigger_margin", "1", "--data.poison.trigger_value", "255"),
        ),
        group="resnet",
        rows=PAPER_ROWS + FORGET_ROWS[:2],
        evaluation=RESNET_EVALUATION,
    ),
}
#: The first reproduction's settings (commit 3f7a68f): the paper's own MNIST settings, in which the poisoned CNN never
#: learnt the poison. Only their harm and fit are reported (their unlearning rows came from earlier code).
LEGACY_SETTINGS = {
    "mnist_targeted": "MNIST CNN, targeted: 2,500 of class 9 → random other class",
    "mnist_untargeted_2500": "MNIST CNN, untargeted: 2,500 random samples (5 %)",
    "mnist_untargeted_5000": "MNIST CNN, untargeted: 5,000 random samples (10 %)",
    "mnist_pairflip_2500": "MNIST CNN, pair-flip (0↔9, 1↔8, …): 2,500 random samples",
    "mnist_untargeted_20pct": "MNIST CNN, untargeted: 20 % (10,000 samples)",
    "mnist_untargeted_40pct": "MNIST CNN, untargeted: 40 % (20,000 samples)",
}
#: Pairs compared seed by seed (paired differences): SA first-order against each of these rows.
COMPARED_WITH = ("first_order_last_layer", "first_order_largest", "finetune_all", "first_order_all")
#: The paired comparisons (row minus row, seed by seed): SA against the others, and so again where the step also sees
#: the corrected forget set (settings without those rows skip them).
PAIRS = tuple(("sa_first_order", other) for other in COMPARED_WITH) + tuple(
    ("sa_first_order_forget", other) for other in ("first_order_last_layer_forget", "first_order_all_forget")
)


# --------------------------------------------------------------------------------------------------------- running
def run_seed(
    name: str,
    setting: Setting,
    seed: int,
    runs: Path,
    rows: list[Row],
    overlays: tuple[str, ...] = (),
    cache_name: str = "rows.json",
    recorded: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train, retrain and unlearn one seed of one setting; returns ``{"before", "reference", "rows", ...}``.

    Finished rows are kept in ``<runs>/<setting>/seed<k>/<cache_name>`` (another benchmark over the same trained
    models keeps its rows in a file of its own). ``recorded`` is what the results file already holds for this seed:
    the result keeps its rows, and the models trained now must be the ones it was measured on (the same accuracies of
    the poisoned and the retrained model), else :class:`RecordedSeedMismatchError`: rows of different models are never
    mixed in one seed. With ``overwrite`` the recorded seed is ignored (and replaced by the caller)."""
    folder = runs / name / f"seed{seed}"
    cache = folder / cache_name
    recorded = None if overwrite else recorded
    if recorded and not cache.is_file() and _has_everything(recorded, rows, setting):
        print(f"== {name} seed {seed}: every requested row is recorded already", flush=True)
        return recorded
    result: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {"rows": {}}
    seeds = ("--seed_everything", str(seed), "--data.poison.seed", str(seed))
    configs = [*setting.configs, *overlays]
    run_dir, trained = train(configs, folder, *setting.overrides, *seeds, name="poisoned", resume=True)
    retrain_dir, retrained = train(
        [*configs, "retrain.yaml"], folder, *setting.overrides, *seeds, name="retrained", resume=True
    )
    for key, value in (("train_seconds", trained["seconds"]), ("retrain_seconds", retrained["seconds"])):
        if result.get(key) is None:
            result[key] = value
    result.setdefault("machine", machine())
    profile_file = TrainingRun.from_path(run_dir).profile_path
    if profile_file.is_file():
        profile = SharpnessProfile.load(profile_file)
        result["profile_seconds"] = profile.metadata.get("seconds")
        result["layers"] = {s.name: s.mean for s in profile.layer_stats()}

    if "before" not in result or "reference" not in result:
        training_run = TrainingRun.from_path(run_dir)
        datamodule = training_run.datamodule()
        options = EvaluationOptions(**dict(setting.evaluation))
        options, reference, calibration = evaluate_reference(retrain_dir, datamodule, options)
        result["options"] = options.to_dict()
        result["calibration"] = calibration
        result["reference"] = reference
        result["before"] = evaluate_model(training_run.load_classifier().net, datamodule, options)
        result["kind"] = datamodule.spec.kind
        result["effect"] = poison_effect(result["before"], reference, datamodule.spec.kind)
    if recorded:
        result = adopt_recorded(recorded, result, f"{name} seed {seed}")
    atomic_write_text(cache, json.dumps(result, indent=1))
    print(f"== {name} seed {seed}: {result['effect']['statement']}", flush=True)
    # a cache written before the SalUn scores were averaged over subsamples measured one subsample: rows added to it
    # are measured the same way, so that every row of a seed compares like with like
    options = EvaluationOptions(**{"mia_subsample_repeats": 1, **result["options"]})
    for row in rows:
        if row.name in result["rows"] or row.name in result.get("empty", {}):
            continue
        extra = ("--model.selection.init_args.seed", str(seed)) if row.config == "first_order_random" else ()
        print(f"== {name} seed {seed}: {row.name}", flush=True)
        try:
            report = unlearn(
                row.config,
                run_dir,
                *row.args,
                *extra,
                reference=result["reference"],
                before=result["before"],
                evaluation=options,
                calibration=result["calibration"],
            )
        except EmptySelectionError as error:  # a measured outcome (nothing to update), not a failure of the run
            print(f"== {name} seed {seed}: {row.name}: {error}", flush=True)
            result.setdefault("empty", {})[row.name] = str(error)
            atomic_write_text(cache, json.dumps(result, indent=1))
            continue
        result["rows"][row.name] = {
            "after": report["after"],
            "comparison": report.get("comparison", {}),
            "seconds": report["cost"]["seconds"],
            "peak_mib": report["cost"]["peak_mib"],
            "selection": {k: report["selection"].get(k) for k in ("strategy", "layers", "num_selected", "chosen")},
            "method": {k: v for k, v in report["method"].items() if isinstance(v, (int, float, str)) or v is None},
        }
        atomic_write_text(cache, json.dumps(result, indent=1))
    if setting.sweep and "sweep" not in result:
        from lightning_unlearn.sweep import layer_sweep

        print(f"== {name} seed {seed}: layer sweep", flush=True)
        out = folder / "sweep_first_order"
        sweep = layer_sweep(str(run_dir), str(retrain_dir), out=str(out), overwrite=True)
        result["sweep"] = {k: sweep[k] for k in ("metric", "spearman", "layers")}
        atomic_write_text(cache, json.dumps(result, indent=1))
    return result


def machine() -> dict[str, Any]:
    """Where a seed is trained (its weights depend on the CPU's kernels and the thread count, not only on the seed)."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((li.split(":", 1)[1].strip() for li in cpuinfo.read_text().splitlines() if "model name" in li), cpu)
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


class RecordedSeedMismatchError(RuntimeError):
    """The results file holds a seed measured on models other than the ones trained now."""


def _has_everything(recorded: dict[str, Any], rows: list[Row], setting: Setting) -> bool:
    done = set(recorded.get("rows", {})) | set(recorded.get("empty", {}))
    return all(row.name in done for row in rows) and (not setting.sweep or "sweep" in recorded)


def adopt_recorded(recorded: dict[str, Any], result: dict[str, Any], where: str) -> dict[str, Any]:
    """``result`` (a seed's evaluation of the models trained now, maybe with rows) with the rows, empty requests and
    sweep of ``recorded`` that it lacks — only if both describe the same models: every accuracy of the poisoned and
    the retrained model equal to 1e-6 points (training is deterministic on one code, CPU and thread count)."""
    differences = [
        f"{part} {key}: recorded {recorded[part][key]!r}, now {value!r}"
        for part in ("before", "reference")
        for key, value in result[part].items()
        if key.endswith(("/acc", "/asr"))
        and (key not in recorded.get(part, {}) or abs(recorded[part][key] - value) > 1e-6)
    ]
    if differences:
        raise RecordedSeedMismatchError(
            f"{where}: the results file records this seed from other models than the ones trained now "
            f"({'; '.join(differences[:3])}); its rows would be mixed with rows of different models. A seed trains "
            "the same weights only on the same code, CPU and thread count (floating-point rounding differs between "
            f"kernels): recorded on {recorded.get('machine', 'an unrecorded machine')}, now on {result['machine']}. "
            "Pass --overwrite to replace the recorded seed, use new seeds, or --results elsewhere."
        )
    merged = dict(result)
    merged["rows"] = recorded.get("rows", {}) | result.get("rows", {})
    if recorded.get("empty") or result.get("empty"):
        merged["empty"] = recorded.get("empty", {}) | result.get("empty", {})
    if "sweep" in recorded and "sweep" not in result:
        merged["sweep"] = recorded["sweep"]
    return merged


# ---------------------------------------------------------------------------------------------------------- tables
def _values(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean_std(values: list[float | None], digits: int = 2) -> str:
    values = _values(values)
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _kind(results: dict[str, dict[str, Any]]) -> str:
    return next(iter(results.values())).get("kind", "untargeted")


def _row_metrics(seed_result: dict[str, Any], config: str | None) -> dict[str, float | None]:
    """The table's numbers of one row (``None``: the retrained reference; ``"before"``: the poisoned model)."""
    before, reference = seed_result["before"], seed_result["reference"]
    if config is None:
        metrics, seconds = reference, seed_result.get("retrain_seconds")
        comparison = compare(before, reference, reference)
    elif config == "before":
        metrics, seconds = before, None
        comparison = compare(before, before, reference)
    else:
        row = seed_result["rows"].get(config)
        if row is None:
            return {}
        metrics, comparison, seconds = row["after"], row["comparison"], row["seconds"]
    key = ATTACKED_METRICS.get(seed_result.get("kind", "untargeted"), ("test/acc", -1, ""))[0]
    retrain = seed_result.get("retrain_seconds")
    return {
        "attacked": metrics.get(key),
        "other": metrics.get("test/acc_other"),
        "test": metrics.get("test/acc"),
        "fit": metrics.get("forget/acc"),
        "forget_true": metrics.get("forget_true/acc"),
        "restored": comparison.get(key.replace("/", "_restored/", 1)),
        "restored_fit": comparison.get("forget_restored/acc"),
        "tow": comparison.get("tow"),
        "mia": metrics.get("mia/svc"),
        "mia_salun": metrics.get("mia/salun_confidence"),
        "relearn": metrics.get("relearn/auc"),
        "seconds": seconds,
        "cost": None if seconds is None or not retrain else seconds / retrain,
    }


COLUMNS = {  # key → (header, digits)
    "attacked": ("attacked %", 2),
    "other": ("other classes %", 2),
    "test": ("test %", 2),
    "fit": ("fit %", 2),
    "forget_true": ("forget, true labels %", 2),
    "restored": ("% restored", 1),
    "restored_fit": ("% restored (fit)", 1),
    "tow": ("ToW", 4),
    "mia": ("MIA-SVC %", 2),
    "mia_salun": ("MIA SalUn conf. %", 2),
    "relearn": ("relearn AUC %", 2),
    "seconds": ("seconds", 2),
    "cost": ("× retrain", 4),
}


def _columns(kind: str) -> list[str]:
    attacked = {"label_flip": "class %", "targeted": "class %", "backdoor": "ASR %", "classwise": "class %"}.get(kind)
    keys = ["attacked", "other", "test"] if attacked else ["test"]
    keys += ["fit", "forget_true", "restored", "restored_fit", "tow", "mia", "mia_salun", "relearn", "seconds", "cost"]
    return keys


#: Short names of the attacked metrics (:data:`ATTACKED_METRICS`), for the column headers of every kind.
METRIC_WORDS = {"test/asr": "ASR", "test/acc": "test", "test/acc_attacked": "class", "forget/acc": "forget"}


def _header(kind: str, key: str) -> str:
    if key in ("attacked", "restored"):
        word = METRIC_WORDS[ATTACKED_METRICS.get(kind, ("test/acc",))[0]]  # the metric _row_metrics reads
        if key == "restored":
            return f"% restored ({word})"
        return "attacked class %" if word == "class" else f"{word} %"
    return COLUMNS[key][0]


def effect_summary(results: dict[str, dict[str, Any]]) -> str:
    """Harm and fit over seeds, in words."""
    effects = [r["effect"] for r in results.values()]
    first = effects[0]
    if first.get("metric") is None:
        return "No poison: nothing to unlearn."
    harm = _mean_std([e["harm"] for e in effects])
    plain = sum(bool(e["plain"]) for e in effects)
    above = sum(e["harm"] >= e["noise"] for e in effects)  # plain also counts a memorised fit below the harm's noise
    if _kind(results) in REMOVAL:  # a clean forget set: the gap to forget, trained vs retrained
        text = (
            f"**Gap to forget** {harm} points ({first['label']}: {_mean_std([e['poisoned'] for e in effects])} % "
            f"trained on it vs {_mean_std([e['retrained'] for e in effects])} % retrained without it); **fit** "
            f"{_mean_std([e['fit'] for e in effects])} % (forget-set accuracy; retrained "
            f"{_mean_std([e['fit_retrained'] for e in effects])} %). The gap exceeds the noise level "
            f"({first['noise']:g} points) in {above}/{len(effects)} seeds."
        )
        if above < len(effects):
            text += " Where it does not, accuracy cannot show the forgetting: membership inference is the evidence."
        return text
    text = (
        f"**Harm** {harm} points ({first['label']}: {_mean_std([e['poisoned'] for e in effects])} % poisoned vs "
        f"{_mean_std([e['retrained'] for e in effects])} % retrained); **fit** "
        f"{_mean_std([e['fit'] for e in effects])} % (forget accuracy w.r.t. the poisoned labels; retrained "
        f"{_mean_std([e['fit_retrained'] for e in effects])} %). The harm exceeds the noise level "
        f"({first['noise']:g} points) in {above}/{len(effects)} seeds."
    )
    memorised = [e for e in effects if e["plain"] and e["harm"] < e["noise"]]
    if memorised:
        text += (
            f" In {len(memorised)} seed(s) below it the memorised poison is what there is to unlearn (fit "
            f"{_mean_std([e['memorisation'] for e in memorised])} points above the retrained model's)."
        )
    if plain < len(effects):
        text += " Where neither, no unlearning result can show that the poison's effect was removed."
    return text


def setting_table(name: str, results: dict[str, dict[str, Any]]) -> str:
    """Harm and fit, the markdown table (mean ± std over seeds) and the paired comparisons of one setting."""
    setting = SETTINGS[name]
    seeds = sorted(results, key=int)
    kind = _kind(results)
    keys = _columns(kind)

    def line(label: str, per_seed: list[dict[str, float | None]]) -> dict[str, Any]:
        out = {"method": label}
        for key in keys:
            out[_header(kind, key)] = _mean_std([m.get(key) for m in per_seed], COLUMNS[key][1])
        return out

    first = "trained model (before)" if kind in REMOVAL else "poisoned model (before)"
    table_rows = [line(first, [_row_metrics(results[s], "before") for s in seeds])]
    for row in setting.rows:
        per_seed = [_row_metrics(results[s], row.name) for s in seeds]
        if any(per_seed):
            table_rows.append(line(row.label, [m for m in per_seed if m]))
    table_rows.append(line(RETRAIN_LABEL, [_row_metrics(results[s], None) for s in seeds]))
    profile = [r.get("profile_seconds") for r in results.values()]
    lrs = _chosen_learning_rates(results, setting)
    calibrated = _values([(r.get("calibration") or {}).get("lr") for r in results.values()])
    lines = [
        f"### {setting.label}",
        "",
        f"Seeds: {', '.join(seeds)} (n = {len(seeds)}); mean ± std over seeds. Regenerate: "
        f"`python benchmarks/reproduce.py {name} --seeds {' '.join(seeds)}`.",
        "",
        effect_summary(results),
        "",
        format_table(table_rows),
        "",
        f"One-time exact Hessian-diagonal profile of the training set (not in `seconds`): {_mean_std(profile, 1)} s; "
        f"retraining: {_mean_std([r.get('retrain_seconds') for r in results.values()], 1)} s. Relearning attack: "
        f"learning rate calibrated on the validation split per seed ({', '.join(f'{v:g}' for v in calibrated)}).",
    ]
    if lrs:
        lines += ["", "Learning rates chosen on the validation split: " + "; ".join(lrs) + "."]
    validated = _validated_choices(results)
    if validated:
        lines += ["", f"Validated selection chose: {validated}."]
    lines += ["", *paired_comparisons(results, kind)]
    return "\n".join(lines) + "\n"


def _chosen_learning_rates(results: dict[str, dict[str, Any]], setting: Setting) -> list[str]:
    out = []
    for row in setting.rows:
        chosen = [r["rows"][row.config]["method"].get("lr") for r in results.values() if row.config in r["rows"]]
        chosen = [c for c in chosen if c is not None]
        if chosen:
            out.append(f"{row.config} " + ", ".join(f"{c:g}" for c in chosen))
    return out


def _validated_choices(results: dict[str, dict[str, Any]]) -> str:
    chosen = [
        r["rows"]["first_order_validated"]["selection"].get("chosen")
        for r in results.values()
        if "first_order_validated" in r["rows"]
    ]
    counts: dict[str, int] = {}
    for c in chosen:
        counts[str(c)] = counts.get(str(c), 0) + 1
    return ", ".join(f"{label} in {n}/{len(chosen)} seeds" for label, n in counts.items())


def paired_comparisons(results: dict[str, dict[str, Any]], kind: str) -> list[str]:
    """Seed-by-seed differences of SA first-order against the other rows (:data:`PAIRS`; ToW and the attacked metric),
    with a paired t-test; "SA better" counts seeds where SA is closer to retraining (ToW) or less harmed (attacked
    metric)."""
    from scipy import stats

    direction = ATTACKED_METRICS.get(kind, ("test/acc", -1, ""))[1]
    rows = []
    for mine, other in PAIRS:
        for key, name, sign in (("tow", "ToW", 1), ("attacked", _header(kind, "attacked"), -direction)):
            diffs = []
            for r in results.values():
                a, b = _row_metrics(r, mine), _row_metrics(r, other)
                if a.get(key) is not None and b.get(key) is not None:
                    diffs.append(a[key] - b[key])
            if len(diffs) < 2:
                continue
            p = stats.ttest_rel(diffs, [0.0] * len(diffs)).pvalue if statistics.pstdev(diffs) > 0 else math.nan
            rows.append(
                {
                    "comparison": f"SA − {other}" if mine == "sa_first_order" else f"{mine} − {other}",
                    "metric": name,
                    "mean diff ± std": _mean_std(diffs, 4 if key == "tow" else 2),
                    "SA better in": f"{sum(sign * d > 0 for d in diffs)}/{len(diffs)} seeds",
                    "p (paired t)": "–" if math.isnan(p) else f"{p:.3g}",
                }
            )
    if not rows:
        return []
    return [
        f"Paired over seeds (SA first-order minus the other row; t-test on the {len(results)} differences):",
        "",
        format_table(rows),
    ]


def paper_table(name: str, results: dict[str, dict[str, Any]]) -> str:
    """The paper's Table 2–4 layout: other classes / target class / overall (a backdoor: ASR / overall), rows
    fine-tune, last layer, SA and any other row of the setting."""
    setting = SETTINGS[name]
    seeds = sorted(results, key=int)
    kind = _kind(results)
    targeted = kind in ("label_flip", "targeted")
    labels = [("poisoned model (before)", "before")] + [(r.label, r.name) for r in setting.rows]
    labels.append((RETRAIN_LABEL, None))
    rows = []
    for label, config in labels:
        per_seed = [_row_metrics(results[s], config) for s in seeds]
        row: dict[str, Any] = {"method": label}
        if targeted:
            row["other classes %"] = _mean_std([m.get("other") for m in per_seed])
            row["target class %"] = _mean_std([m.get("attacked") for m in per_seed])
        if kind == "backdoor":
            row["ASR %"] = _mean_std([m.get("attacked") for m in per_seed])
        row["overall %"] = _mean_std([m.get("test") for m in per_seed])
        row["paper (CIFAR-10)"] = "n/a offline"
        rows.append(row)
    return f"#### {setting.label} — the paper's layout\n\n" + format_table(rows) + "\n"


def harm_table(current: dict[str, dict[str, dict[str, Any]]], legacy: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Harm and fit of every setting, the first reproduction's included: what there was to unlearn."""
    rows = []
    for group, results_by_setting, labels in (
        ("now", current, {n: s.label for n, s in SETTINGS.items()}),
        ("first reproduction", legacy, LEGACY_SETTINGS),
    ):
        for name, results in results_by_setting.items():
            if not results:
                continue
            effects = [r.get("effect") or _legacy_effect(r, name) for r in results.values()]
            rows.append(
                {
                    "setting": labels[name],
                    "seeds": len(effects),
                    "attacked metric": effects[0].get("label", "–"),
                    "harm (points)": _mean_std([e.get("harm") for e in effects]),
                    "fit %": _mean_std([e.get("fit") for e in effects]),
                    "harm > noise": f"{sum(bool(e.get('plain')) for e in effects)}/{len(effects)}",
                    "measured": group,
                }
            )
    return (
        "### What there is to unlearn: harm and fit of every setting\n\n"
        "Harm = the attacked metric of the poisoned model against the retrained one (points; positive = the poison "
        "hurts); fit = the poisoned model's forget-set accuracy w.r.t. the poisoned labels; noise level 3 points. "
        "The first reproduction's settings (the paper's own MNIST settings, `benchmarks/results/reproduce/legacy/`) "
        "are listed for their harm and fit only.\n\n" + format_table(rows) + "\n"
    )


def _legacy_effect(result: dict[str, Any], name: str) -> dict[str, Any]:
    kind = "targeted" if "targeted" in name else "pairflip" if "pairflip" in name else "untargeted"
    return poison_effect(result["before"], result["reference"], kind)


# ----------------------------------------------------------------------------------------------------------- sweeps
def sweep_table(name: str, results: dict[str, dict[str, Any]]) -> str:
    """Per layer: mean diagonal and improvement of the attacked metric (mean ± std over seeds), Spearman per seed."""
    per_seed = {s: r["sweep"] for s, r in sorted(results.items(), key=lambda kv: int(kv[0])) if "sweep" in r}
    if not per_seed:
        return ""
    first = next(iter(per_seed.values()))
    layers = [row["layer"] for row in first["layers"]]
    rows = []
    for layer in layers:
        entries = [next(r for r in s["layers"] if r["layer"] == layer) for s in per_seed.values()]
        rows.append(
            {
                "layer": layer,
                "params": f"{entries[0]['params']:,}",
                "mean diagonal": _mean_std([e["mean_diagonal"] for e in entries], 5),
                "flattest in": f"{sum(_flattest(s) == layer for s in per_seed.values())}/{len(per_seed)} seeds",
                "improvement (points)": _mean_std([e["improvement"] for e in entries]),
                "ToW": _mean_std([e.get("tow") for e in entries], 4),
                "best layer in": f"{sum(_best(s) == layer for s in per_seed.values())}/{len(per_seed)} seeds",
            }
        )
    rhos = _values([s["spearman"] for s in per_seed.values()])
    figure = f"figures/layer_sweep_{name}.png"
    return (
        f"#### Layer sweep ({SETTINGS[name].label}; first-order update of each layer alone, step searched on "
        f"validation; improvement of {first['metric']})\n\n"
        + format_table(rows)
        + f"\n\nSpearman(mean diagonal, improvement) per seed: {', '.join(f'{r:.2f}' for r in rhos)}; "
        f"mean {_mean_std(rhos)}.\n\n![Layer sweep]({figure})\n"
    )


def sweep_figure(name: str, results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Improvement vs mean diagonal, every layer of every seed (the paper's Fig. 1 over seeds), saved as PNG."""
    sweeps = [r["sweep"] for r in results.values() if "sweep" in r]
    if not sweeps:
        return None
    from lightning_unlearn.evaluation.figures import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in [row["layer"] for row in sweeps[0]["layers"]]:
        points = [next(r for r in s["layers"] if r["layer"] == layer) for s in sweeps]
        ax.scatter([p["mean_diagonal"] for p in points], [p["improvement"] for p in points], label=layer, alpha=0.8)
    ax.set_xscale("log")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("mean Hessian diagonal of the layer (exact, training set)")
    ax.set_ylabel(f"improvement of {sweeps[0]['metric']} (points)")
    ax.set_title(f"{name}: each layer updated alone (first order), {len(sweeps)} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)
    return path


def _flattest(sweep: dict[str, Any]) -> str:
    return min(sweep["layers"], key=lambda r: r["mean_diagonal"])["layer"]


def _best(sweep: dict[str, Any]) -> str:
    return max(sweep["layers"], key=lambda r: r["improvement"])["layer"]


# ------------------------------------------------------------------------------------------------------ files, docs
def update_docs(summary: str, docs: Path = DOCS, markers: tuple[str, str] = MARKERS) -> None:
    """Replace the generated part of ``docs/results.md`` (between ``markers``) with ``summary``."""
    if not docs.is_file():
        return
    text = docs.read_text()
    start, end = text.find(markers[0]), text.find(markers[1])
    if start < 0 or end < start:
        return
    text = text[: start + len(markers[0])] + "\n\n" + summary.strip() + "\n\n" + text[end:]
    atomic_write_text(docs, text)


def load_results(name: str, folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    path = folder / f"{name}.json"
    return json.loads(path.read_text())["seeds"] if path.is_file() else {}


def write_results(name: str, results: dict[str, dict[str, Any]], folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    setting = SETTINGS[name]
    payload = {
        "setting": name,
        "label": setting.label,
        "rows": {row.label: {"config": row.config, "args": list(row.args)} for row in setting.rows},
        "seeds": results,
    }
    atomic_write_text(folder / f"{name}.json", json.dumps(payload, indent=1))
    atomic_write_text(folder / f"{name}.md", section(name, results))


def section(name: str, results: dict[str, dict[str, Any]]) -> str:
    parts = [setting_table(name, results)]
    if SETTINGS[name].group == "resnet":
        parts.append(paper_table(name, results))
    sweep = sweep_table(name, results)
    if sweep:
        parts.append(sweep)
    return "\n".join(parts)


def write_summary(folder: Path = RESULTS) -> Path:
    current = {name: load_results(name, folder) for name in SETTINGS}
    legacy = {name: load_results(name, LEGACY) for name in LEGACY_SETTINGS}
    parts = [harm_table(current, legacy)]
    for group, title in (
        ("mnist", "MNIST CNN"),
        ("forgetting", "MNIST CNN, forgetting scenarios (clean forget sets)"),
        ("resnet", "ResNet-18 (the paper's CIFAR-10 arm, on Fashion-MNIST)"),
    ):
        names = [n for n, s in SETTINGS.items() if s.group == group and current[n]]
        if names:
            parts.append(f"## {title}\n")
        for name in names:  # each setting's own table file too (its results file is written by the run of its seed)
            parts.append(section(name, current[name]))
            atomic_write_text(folder / f"{name}.md", parts[-1])
    if folder == RESULTS:
        for name, results in current.items():
            if results:
                sweep_figure(name, results, FIGURES / f"layer_sweep_{name}.png")
    body = "\n".join(parts)
    path = folder / "summary.md"
    atomic_write_text(path, "# Reproduction tables (generated by `benchmarks/reproduce.py --tables`)\n\n" + body)
    if folder == RESULTS:
        update_docs(body)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "settings",
        nargs="*",
        help=f"settings to run, or a group ('mnist', 'forgetting', 'resnet'): {', '.join(SETTINGS)}",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0–4)")
    parser.add_argument("--rows", nargs="+", default=None, help="row configs to run (default: the setting's rows)")
    parser.add_argument("--runs", default="runs/reproduce", help="folder for the training/unlearning runs")
    parser.add_argument("--tables", action="store_true", help="only rebuild the tables from the results files")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the results files and tables")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a seed the results file records (default: keep its rows, add the missing ones, and refuse if "
        "the models trained now differ from the recorded ones)",
    )
    parser.add_argument(
        "--overlay",
        nargs="+",
        default=[],
        help="extra training configs applied after the setting's (e.g. debug.yaml for a quick check; pass "
        "--results and --runs elsewhere then, so the committed tables stay untouched)",
    )
    args = parser.parse_args(argv)
    folder = Path(args.results)

    names = []
    for item in args.settings:
        group = [n for n, s in SETTINGS.items() if s.group == item]
        if not group and item not in SETTINGS:
            parser.error(
                f"unknown setting {item!r}; choose from {list(SETTINGS)} or a group ('mnist', 'forgetting', 'resnet')"
            )
        names += group or [item]
    known = {row.config for s in SETTINGS.values() for row in s.rows}
    bad_rows = [r for r in args.rows or [] if r not in known]
    if bad_rows:
        parser.error(f"unknown row(s) {bad_rows}; choose from {sorted(known)}")
    if not args.tables:
        for seed in args.seeds:
            for name in names:
                setting = SETTINGS[name]
                rows = [row for row in setting.rows if args.rows is None or row.config in args.rows]
                result = run_seed(
                    name,
                    setting,
                    seed,
                    Path(args.runs),
                    rows,
                    tuple(args.overlay),
                    recorded=load_results(name, folder).get(str(seed)),
                    overwrite=args.overwrite,
                )
                # Read the file again: a run of another seed may have written it in the hour this one took.
                results = load_results(name, folder)
                results[str(seed)] = result
                write_results(name, results, folder)
                print(f"== {name} seed {seed} done", flush=True)
    print(f"tables: {write_summary(folder)}")


if __name__ == "__main__":
    main()
