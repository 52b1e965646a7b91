"""Reproduce the paper's experiments: every method vs retraining, over seeds, in the paper's table layout.

For each setting and seed: train on poisoned data (the ``SharpnessProfiler`` profiles the exact Hessian diagonal after
fit), retrain from scratch without the poisoned samples (the reference), evaluate both, then run every row's
unlearning request (``configs/unlearn/<row>.yaml``, exactly what ``unlearn.py`` runs) and evaluate it: accuracies,
% restored, ToW against the retrained model, the MIA SVC score, the relearning attack and seconds. Step sizes are
chosen on the validation split carved from the training data, never on the test set.

Everything is resumable: finished trainings (``results.json``) and finished rows (``rows.json`` per seed) are reused,
so an interrupted run continues where it stopped and more seeds can be added later.

Usage::

    python benchmarks/reproduce.py mnist_targeted --seeds 0 1 2 3 4     # one setting, 5 seeds
    python benchmarks/reproduce.py all --seeds 0 1 2 3 4                 # every MNIST setting
    python benchmarks/reproduce.py --tables                              # only rebuild the tables from results

Outputs: runs under ``--runs`` (default ``runs/reproduce``); per setting ``benchmarks/results/reproduce/<setting>.json``
(every seed's metrics) and ``<setting>.md`` (mean ± std table and the paired comparisons of SA first-order with the
last-layer update and fine-tuning); ``summary.md`` gathers all tables and the poison-rate sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_unlearn.cli import format_table  # noqa: E402
from lightning_unlearn.curvature import SharpnessProfile  # noqa: E402
from lightning_unlearn.evaluation.suite import EvaluationOptions, compare, evaluate_model  # noqa: E402
from lightning_unlearn.experiment import train, unlearn  # noqa: E402
from lightning_unlearn.pipeline import reference_metrics  # noqa: E402
from lightning_unlearn.run import TrainingRun  # noqa: E402
from lightning_unlearn.utils import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reproduce"


@dataclass(frozen=True)
class Setting:
    """One experimental setting: training configs plus command-line overrides of the poisoning."""

    label: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    rate: float | None = None  # poisoned share of the 50,000 training samples (for the poison-rate sweep)
    tags: tuple[str, ...] = field(default=("mnist",))


SETTINGS: dict[str, Setting] = {
    "mnist_targeted": Setting("MNIST CNN, targeted: 2,500 of class 9", ("mnist_cnn_targeted.yaml",)),
    "mnist_untargeted_2500": Setting(
        "MNIST CNN, untargeted: 2,500 random samples (5 %)", ("mnist_cnn_untargeted.yaml",), rate=0.05
    ),
    "mnist_untargeted_5000": Setting(
        "MNIST CNN, untargeted: 5,000 random samples (10 %)",
        ("mnist_cnn_untargeted.yaml",),
        ("--data.poison.count", "5000"),
        rate=0.10,
    ),
    "mnist_pairflip_2500": Setting(
        "MNIST CNN, pair-flip (0↔9, 1↔8, …): 2,500 random samples",
        ("mnist_cnn_untargeted.yaml",),
        ("--data.poison.kind", "pairflip"),
    ),
    "mnist_untargeted_20pct": Setting(
        "MNIST CNN, untargeted: 20 % (10,000 samples)",
        ("mnist_cnn_untargeted.yaml",),
        ("--data.poison.count", "10000"),
        rate=0.20,
    ),
    "mnist_untargeted_40pct": Setting(
        "MNIST CNN, untargeted: 40 % (20,000 samples)",
        ("mnist_cnn_untargeted.yaml",),
        ("--data.poison.count", "20000"),
        rate=0.40,
    ),
    "fashion_resnet18_targeted": Setting(
        "Fashion-MNIST ResNet-18 (stand-in for CIFAR-10), targeted: 2,500 of class 9",
        ("fashion_resnet18_targeted.yaml",),
        tags=("resnet",),
    ),
    "cifar10_resnet18_targeted": Setting(
        "CIFAR-10 ResNet-18, targeted: 2,500 of class 9 (needs the CIFAR-10 files, see README)",
        ("cifar10_resnet18_targeted.yaml",),
        tags=("resnet",),
    ),
}

#: Table rows: label → unlearning config (``configs/unlearn/<name>.yaml``); ``None`` = the retrained reference.
ROWS: dict[str, str | None] = {
    "fine-tune all, 1 epoch (baseline)": "finetune_all",
    "first-order, last layer": "first_order_last_layer",
    "SA first-order, smallest-diagonal layer": "sa_first_order",
    "first-order, largest-diagonal layer": "first_order_largest",
    "first-order, all layers": "first_order_all",
    "first-order, random layer": "first_order_random",
    "second-order (CG), smallest-diagonal layer": "second_order_cg",
    "SAM-forget, smallest-diagonal layer": "sam_forget",
    "Sharp MinMax, smallest-diagonal layer": "sharp_minmax",
    "retrain from scratch (reference)": None,
}
#: Pairs compared seed by seed (paired differences) in each setting's table.
COMPARISONS = (
    ("sa_first_order", "first_order_last_layer"),
    ("sa_first_order", "finetune_all"),
    ("sa_first_order", "first_order_largest"),
)


def run_seed(
    name: str, setting: Setting, seed: int, runs: Path, rows: list[str], overlays: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Train, retrain and unlearn one seed of one setting; returns ``{"before", "reference", "rows", ...}``."""
    folder = runs / name / f"seed{seed}"
    cache = folder / "rows.json"
    result: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {"rows": {}}
    seeds = ("--seed_everything", str(seed), "--data.poison.seed", str(seed))
    configs = [*setting.configs, *overlays]
    run_dir, trained = train(configs, folder, *setting.overrides, *seeds, name="poisoned", resume=True)
    retrain_dir, retrained = train(
        [*configs, "retrain.yaml"], folder, *setting.overrides, *seeds, name="retrained", resume=True
    )
    result.setdefault("train_seconds", trained["seconds"])
    result.setdefault("retrain_seconds", retrained["seconds"])
    if result["train_seconds"] is None:
        result["train_seconds"] = trained["seconds"]
    if result["retrain_seconds"] is None:
        result["retrain_seconds"] = retrained["seconds"]
    profile_file = TrainingRun.from_path(run_dir).profile_path
    if profile_file.is_file():
        profile = SharpnessProfile.load(profile_file)
        result["profile_seconds"] = profile.metadata.get("seconds")
        result["layers"] = {s.name: s.mean for s in profile.layer_stats()}

    options = EvaluationOptions()
    if "before" not in result or "reference" not in result:
        training_run = TrainingRun.from_path(run_dir)
        datamodule = training_run.datamodule()
        result["reference"] = reference_metrics(retrain_dir, datamodule, options)
        result["before"] = evaluate_model(training_run.load_classifier().net, datamodule, options)
        atomic_write_text(cache, json.dumps(result, indent=1))
    for config in rows:
        if config in result["rows"]:
            continue
        extra = ("--model.selection.init_args.seed", str(seed)) if config == "first_order_random" else ()
        print(f"== {name} seed {seed}: {config}", flush=True)
        report = unlearn(
            config, run_dir, *extra, reference=result["reference"], before=result["before"], evaluation=options
        )
        result["rows"][config] = {
            "after": report["after"],
            "comparison": report.get("comparison", {}),
            "seconds": report["cost"]["seconds"],
            "peak_mib": report["cost"]["peak_mib"],
            "selection": {k: report["selection"].get(k) for k in ("strategy", "layers", "num_selected")},
            "method": {k: v for k, v in report["method"].items() if isinstance(v, (int, float, str)) or v is None},
        }
        atomic_write_text(cache, json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------------------- tables
def _mean_std(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _row_metrics(seed_result: dict[str, Any], config: str | None) -> dict[str, float | None]:
    """The table's numbers of one row in one seed."""
    if config is None:
        metrics = seed_result["reference"]
        comparison = compare(seed_result["before"], metrics, metrics)
        seconds = seed_result.get("retrain_seconds")
    else:
        row = seed_result["rows"].get(config)
        if row is None:
            return {}
        metrics, comparison, seconds = row["after"], row["comparison"], row["seconds"]
    return {
        "target": metrics.get("test/acc_target"),
        "other": metrics.get("test/acc_other"),
        "test": metrics.get("test/acc"),
        "forget_true": metrics.get("forget_true/acc"),
        "restored": comparison.get("test_restored/acc_target", comparison.get("test_restored/acc")),
        "tow": comparison.get("tow"),
        "mia": metrics.get("mia/svc"),
        "relearn": metrics.get("relearn/forget_acc_after"),
        "seconds": seconds,
    }


def setting_table(name: str, results: dict[str, dict[str, Any]]) -> str:
    """The markdown table (mean ± std over seeds) and paired comparisons of one setting."""
    setting = SETTINGS[name]
    seeds = sorted(results, key=int)
    targeted = any("test/acc_target" in r["before"] for r in results.values())
    columns = ["method", "class 9 %", "other classes %"] if targeted else ["method"]
    columns += ["test %", "forget (true labels) %", "% restored", "ToW", "MIA-SVC %", "relearn %", "seconds"]
    keys = (["target", "other"] if targeted else []) + [
        "test",
        "forget_true",
        "restored",
        "tow",
        "mia",
        "relearn",
        "seconds",
    ]

    def line(label: str, per_seed: list[dict[str, float | None]]) -> dict[str, Any]:
        out = {"method": label}
        for column, key in zip(columns[1:], keys, strict=True):
            digits = 4 if key == "tow" else 1 if key == "seconds" else 2
            out[column] = _mean_std([m.get(key) for m in per_seed], digits)
        return out

    before = [
        {
            "target": r["before"].get("test/acc_target"),
            "other": r["before"].get("test/acc_other"),
            "test": r["before"].get("test/acc"),
            "forget_true": r["before"].get("forget_true/acc"),
            "mia": r["before"].get("mia/svc"),
            "relearn": r["before"].get("relearn/forget_acc_after"),
            "tow": compare(r["before"], r["before"], r["reference"])["tow"],  # the ToW of doing nothing
        }
        for r in results.values()
    ]
    table_rows = [line("poisoned model (before)", before)]
    for label, config in ROWS.items():
        per_seed = [_row_metrics(results[s], config) for s in seeds]
        if any(per_seed):
            table_rows.append(line(label, [m for m in per_seed if m]))
    profile = [r.get("profile_seconds") for r in results.values()]
    lines = [
        f"### {setting.label}",
        "",
        f"Seeds: {', '.join(seeds)} (n = {len(seeds)}); mean ± std over seeds. Regenerate: "
        f"`python benchmarks/reproduce.py {name} --seeds {' '.join(seeds)}`.",
        "",
        format_table(table_rows),
        "",
        f"One-time exact Hessian-diagonal profile of the training set (not in `seconds`): {_mean_std(profile, 1)} s.",
    ]
    lines += ["", *paired_comparisons(results, "tow", "ToW", targeted)]
    return "\n".join(lines) + "\n"


def paired_comparisons(results: dict[str, dict[str, Any]], key: str, label: str, targeted: bool) -> list[str]:
    """Seed-by-seed differences of SA first-order against the other rows, with a paired t-test."""
    from scipy import stats

    metric = "target" if targeted else "test"
    out = [f"Paired over seeds (SA first-order minus the other method; t-test on the {len(results)} differences):", ""]
    rows = []
    for a, b in COMPARISONS:
        for key_, name in ((key, label), (metric, "class 9 %" if targeted else "test %")):
            diffs = []
            for r in results.values():
                ma, mb = _row_metrics(r, a), _row_metrics(r, b)
                if ma.get(key_) is not None and mb.get(key_) is not None:
                    diffs.append(ma[key_] - mb[key_])
            if len(diffs) < 2:
                continue
            p = stats.ttest_rel(diffs, [0.0] * len(diffs)).pvalue if statistics.pstdev(diffs) > 0 else math.nan
            rows.append(
                {
                    "comparison": f"SA − {b}",
                    "metric": name,
                    "mean diff ± std": _mean_std(diffs, 4 if key_ == "tow" else 2),
                    "SA better in": f"{sum(d > 0 for d in diffs)}/{len(diffs)} seeds",
                    "p (paired t)": "–" if math.isnan(p) else f"{p:.3g}",
                }
            )
    return [*out, format_table(rows)] if rows else []


def rate_sweep_table(all_results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """ToW and overall test accuracy per poison rate (untargeted), for every row."""
    rated = sorted((SETTINGS[n].rate, n) for n in all_results if SETTINGS[n].rate is not None and all_results[n])
    if not rated:
        return ""
    rows = []
    before_row: dict[str, Any] = {"method": "poisoned model (before): test %"}
    for rate, name in rated:
        before_row[f"{rate:.0%}"] = _mean_std([r["before"]["test/acc"] for r in all_results[name].values()])
    rows.append(before_row)
    nothing: dict[str, Any] = {"method": "poisoned model (doing nothing): ToW"}
    for rate, name in rated:
        values = [compare(r["before"], r["before"], r["reference"])["tow"] for r in all_results[name].values()]
        nothing[f"{rate:.0%}"] = _mean_std(values, 4)
    rows.append(nothing)
    for label, config in ROWS.items():
        row: dict[str, Any] = {"method": f"{label}: ToW"}
        for rate, name in rated:
            values = [_row_metrics(r, config).get("tow") for r in all_results[name].values()]
            row[f"{rate:.0%}"] = _mean_std(values, 4)
        rows.append(row)
    seeds = {f"{rate:.0%}": len(all_results[name]) for rate, name in rated}
    return (
        "### Poison-rate sweep (untargeted; the 5 % and 10 % columns are the 2,500 and 5,000 settings)\n\n"
        f"Seeds per rate: {seeds}.\n\n" + format_table(rows) + "\n"
    )


def collect_sweeps(runs: Path, name: str = "mnist_targeted") -> dict[str, Any] | None:
    """Gather the per-seed layer sweeps (``lightning-unlearn sweep`` on each seed's run) of one setting."""
    sweeps = {}
    for path in sorted((runs / name).glob("seed*/sweep_first_order/sweep.json")):
        sweeps[path.parts[-3].removeprefix("seed")] = json.loads(path.read_text())
    return {"setting": name, "seeds": sweeps} if sweeps else None


def sweep_table(sweeps: dict[str, Any]) -> str:
    """Per layer: mean diagonal and improvement of the target-class accuracy (mean ± std over seeds), and the
    per-seed Spearman correlations."""
    per_seed = sweeps["seeds"]
    layers = [row["layer"] for row in next(iter(per_seed.values()))["layers"]]
    rows = []
    for layer in layers:
        entries = [next(r for r in s["layers"] if r["layer"] == layer) for s in per_seed.values()]
        rows.append(
            {
                "layer": layer,
                "params": f"{entries[0]['params']:,}",
                "mean diagonal": _mean_std([e["mean_diagonal"] for e in entries], 5),
                "smallest in": f"{sum(_smallest(s) == layer for s in per_seed.values())}/{len(per_seed)} seeds",
                "improvement (points)": _mean_std([e["improvement"] for e in entries]),
                "best layer in": f"{sum(_best(s) == layer for s in per_seed.values())}/{len(per_seed)} seeds",
            }
        )
    rhos = [s["spearman"] for s in per_seed.values()]
    finite = [r for r in rhos if r is not None and math.isfinite(r)]
    seeds = " ".join(per_seed)
    return (
        f"### Layer sweep ({SETTINGS[sweeps['setting']].label}; first-order update of each layer alone, step "
        "searched on validation)\n\n"
        f"Seeds: {seeds}. Per seed: `lightning-unlearn sweep runs/reproduce/{sweeps['setting']}/seed<k>/poisoned/"
        f"version_0 --reference runs/reproduce/{sweeps['setting']}/seed<k>/retrained/version_0 --out "
        f"runs/reproduce/{sweeps['setting']}/seed<k>/sweep_first_order`, then `python benchmarks/reproduce.py "
        "--tables`.\n\n"
        + format_table(rows)
        + f"\n\nSpearman(mean diagonal, improvement) per seed: {', '.join(f'{r:.2f}' for r in finite)}; "
        f"mean {_mean_std(finite)}.\n"
    )


def sweep_figure(sweeps: dict[str, Any], path: Path) -> Path:
    """Improvement vs mean diagonal, every layer of every seed (the paper's Fig. 1 over seeds), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from lightning_unlearn.utils import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    layers = [row["layer"] for row in next(iter(sweeps["seeds"].values()))["layers"]]
    for layer in layers:
        points = [next(r for r in s["layers"] if r["layer"] == layer) for s in sweeps["seeds"].values()]
        ax.scatter([p["mean_diagonal"] for p in points], [p["improvement"] for p in points], label=layer, alpha=0.8)
    ax.set_xscale("log")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("mean Hessian diagonal of the layer (exact, training set)")
    ax.set_ylabel("class-9 test accuracy gain (points)")
    ax.set_title(f"Layer sweep, {len(sweeps['seeds'])} seeds: each layer updated alone (first order)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    plt.close(fig)
    return path


def _smallest(sweep: dict[str, Any]) -> str:
    return min(sweep["layers"], key=lambda r: r["mean_diagonal"])["layer"]


def _best(sweep: dict[str, Any]) -> str:
    return max(sweep["layers"], key=lambda r: r["improvement"])["layer"]


DOCS = ROOT / "docs" / "results.md"
MARKERS = ("<!-- generated tables: start -->", "<!-- generated tables: end -->")


def update_docs(summary: str, docs: Path = DOCS) -> None:
    """Replace the generated part of ``docs/results.md`` (between the markers) with ``summary``."""
    if not docs.is_file():
        return
    text = docs.read_text()
    start, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if start < 0 or end < start:
        return
    text = text[: start + len(MARKERS[0])] + "\n\n" + summary.strip() + "\n\n" + text[end:]
    atomic_write_text(docs, text)


def load_results(name: str, folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    path = folder / f"{name}.json"
    return json.loads(path.read_text())["seeds"] if path.is_file() else {}


def write_results(name: str, results: dict[str, dict[str, Any]], folder: Path = RESULTS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"setting": name, "label": SETTINGS[name].label, "rows": ROWS, "seeds": results}
    atomic_write_text(folder / f"{name}.json", json.dumps(payload, indent=1))
    atomic_write_text(folder / f"{name}.md", setting_table(name, results))


def write_summary(folder: Path = RESULTS, runs: Path | None = None) -> Path:
    all_results = {name: load_results(name, folder) for name in SETTINGS}
    parts = [*[setting_table(n, r) for n, r in all_results.items() if r]]
    rates = rate_sweep_table(all_results)
    if rates:
        parts.append(rates)
    sweeps = collect_sweeps(runs) if runs is not None else None
    if sweeps is not None:
        atomic_write_text(folder / "sweep_mnist_targeted.json", json.dumps(sweeps, indent=1))
    elif (folder / "sweep_mnist_targeted.json").is_file():
        sweeps = json.loads((folder / "sweep_mnist_targeted.json").read_text())
    if sweeps is not None:
        parts.append(sweep_table(sweeps))
        if folder == RESULTS:
            sweep_figure(sweeps, ROOT / "docs" / "figures" / "layer_sweep_mnist_targeted.png")
    body = "\n".join(parts)
    path = folder / "summary.md"
    atomic_write_text(path, "# Reproduction tables (generated by `benchmarks/reproduce.py --tables`)\n\n" + body)
    if folder == RESULTS:
        update_docs(body)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "settings", nargs="*", help=f"settings to run, or 'all' (the MNIST ones): {', '.join(SETTINGS)}"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0–4)")
    parser.add_argument("--rows", nargs="+", default=None, help="row configs to run (default: all rows)")
    parser.add_argument("--runs", default="runs/reproduce", help="folder for the training/unlearning runs")
    parser.add_argument("--tables", action="store_true", help="only rebuild the tables from the results files")
    parser.add_argument(
        "--overlay",
        nargs="+",
        default=[],
        help="extra training configs applied after the setting's (e.g. debug.yaml for a quick check; results then "
        "go to --results, not the committed tables)",
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for the results files and tables")
    args = parser.parse_args(argv)
    folder = Path(args.results)

    names = [n for n in SETTINGS if "mnist" in SETTINGS[n].tags] if args.settings == ["all"] else args.settings
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)} or 'all'")
    rows = args.rows or [c for c in ROWS.values() if c is not None]
    bad_rows = [r for r in rows if r not in ROWS.values()]
    if bad_rows:
        parser.error(f"unknown row(s) {bad_rows}; choose from {[c for c in ROWS.values() if c]}")
    if not args.tables:
        for seed in args.seeds:
            for name in names:
                results = load_results(name, folder)
                results[str(seed)] = run_seed(name, SETTINGS[name], seed, Path(args.runs), rows, tuple(args.overlay))
                write_results(name, results, folder)
                print(f"== {name} seed {seed} done", flush=True)
    for name in SETTINGS:
        if load_results(name, folder):
            write_results(name, load_results(name, folder), folder)
    print(f"tables: {write_summary(folder, Path(args.runs))}")


if __name__ == "__main__":
    main()
