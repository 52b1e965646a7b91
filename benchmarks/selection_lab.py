"""The selection lab: every parameter selection under every applicable method, per forgetting scenario, over seeds.

Which parameters should an unlearning request update? For each scenario (poisons the model learns: a label flip and
a backdoor; class-wise forgetting; random-sample forgetting; on request, the ResNet-18 arm's 70 % label flip) and
seed this script reuses the trained and retrained models of ``benchmarks/reproduce.py`` (training them if missing, in
the same ``--runs`` folder), then runs one request per (selection, method) pair — exactly what ``unlearn.py`` runs,
with ``--model.selection`` / ``--model.method`` replaced — and evaluates it like every reproduction row: the attacked
metric, ToW against the retrained model, the MIA scores, the relearning attack, seconds and cost as a fraction of
retraining.

A pair is skipped (and listed as such) when it cannot apply: methods that need corrected labels (first- and
second-order, which replace the forget samples' labels) in scenarios that have none (class-wise and random-sample
forgetting remove samples: there the first-order *removal* update runs instead), and the ``Validated`` selection
with methods that do not search a one-step update's size (the iterative ones and SSD).

Everything is resumable per request (``<runs>/<scenario>/seed<k>/lab_rows.json``; the before/reference evaluation is
taken from the reproduction's ``rows.json`` when there is one); a seed the results file records keeps its rows, as in
the reproduction (``--overwrite`` replaces it). The iterative methods run with their configs'
learning rates unless ``--lr-grid`` asks for the validation search of the reproduction (five times the cost).

Usage::

    python benchmarks/selection_lab.py mnist_label_flip --seeds 0 1 2          # one scenario, 3 seeds
    python benchmarks/selection_lab.py --seeds 0 --methods first_order ssd      # every MNIST scenario, two methods
    python benchmarks/selection_lab.py fashion_resnet18_label_flip_70 --seeds 2 --methods first_order  # ResNet-18
    python benchmarks/selection_lab.py --tables                                # rebuild the tables only

Writes ``benchmarks/results/selection_lab/<scenario>.json`` and ``.md`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce  # noqa: E402

from lightning_unlearn.reporting import format_table  # noqa: E402
from lightning_unlearn.utils import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "selection_lab"
CACHE = "lab_rows.json"


@dataclass(frozen=True)
class Method:
    """A method of the lab: the request config it starts from and what it needs."""

    config: str
    one_step: bool
    needs_corrected_labels: bool
    searches_step: bool = False  # a one-step update whose step is searched on validation (what Validated compares)
    args: tuple[str, ...] = ()


#: Selections by label: the ``--model.selection`` value (class path and arguments); ``{seed}`` is the run's seed.
SELECTIONS: dict[str, dict[str, Any]] = {
    "smallest-diagonal layer": {"class_path": "lightning_unlearn.selection.SmallestLayer"},
    "largest-diagonal layer": {"class_path": "lightning_unlearn.selection.LargestLayer"},
    "last layer": {"class_path": "lightning_unlearn.selection.LastLayer"},
    "top 1 % diagonal": {
        "class_path": "lightning_unlearn.selection.TopKParameters",
        "init_args": {"fraction": 0.01, "largest": True},
    },
    "saliency top 1 %": {"class_path": "lightning_unlearn.selection.Saliency", "init_args": {"fraction": 0.01}},
    "saliency top 50 % (SalUn)": {"class_path": "lightning_unlearn.selection.Saliency", "init_args": {"fraction": 0.5}},
    "Fisher ratio (SSD, α = 10)": {
        "class_path": "lightning_unlearn.selection.FisherRatio",
        "init_args": {"alpha": 10.0, "importance": "batch", "batch_size": 128},
    },
    "random layer": {"class_path": "lightning_unlearn.selection.RandomLayer", "init_args": {"seed": "{seed}"}},
    # the control of the element-wise selections above: as many entries as "top 1 %", drawn at random
    "random 1 % entries": {
        "class_path": "lightning_unlearn.selection.RandomEntries",
        "init_args": {"fraction": 0.01, "seed": "{seed}"},
    },
    "all parameters": {"class_path": "lightning_unlearn.selection.AllLayers"},
    "validated": {"class_path": "lightning_unlearn.selection.Validated"},
}

#: Methods by name: the request config each row starts from (its selection is replaced).
METHODS: dict[str, Method] = {
    "first_order": Method("first_order_all", one_step=True, needs_corrected_labels=True, searches_step=True),
    # the same update, its step scored on validation plus the forget set with its corrected labels (weight 1)
    "first_order_forget": Method(
        "first_order_all",
        one_step=True,
        needs_corrected_labels=True,
        searches_step=True,
        args=("--model.method.init_args.forget_weight", "1"),
    ),
    "first_order_removal": Method(
        "first_order_removal", one_step=True, needs_corrected_labels=False, searches_step=True
    ),
    "second_order": Method("second_order_diag", one_step=True, needs_corrected_labels=True, searches_step=True),
    "finetune": Method("finetune_all", one_step=False, needs_corrected_labels=False),
    "random_label": Method("random_label", one_step=False, needs_corrected_labels=False),
    # the same update, its step searched on validation reweighted to the retain set's classes (a forgotten class: 0)
    "first_order_removal_retain": Method(
        "first_order_removal",
        one_step=True,
        needs_corrected_labels=False,
        searches_step=True,
        args=("--model.method.init_args.validation_weights", "retain"),
    ),
    "ssd": Method("ssd", one_step=True, needs_corrected_labels=False),  # one shot, nothing searched
    "l1_sparse": Method("l1_sparse", one_step=False, needs_corrected_labels=False),
    "scrub": Method("scrub", one_step=False, needs_corrected_labels=False),
}
#: The matrix of issue 18 (the other methods run on request: ``--methods l1_sparse scrub``).
DEFAULT_METHODS = [
    "first_order",
    "first_order_forget",
    "first_order_removal",
    "first_order_removal_retain",
    "second_order",
    "finetune",
    "random_label",
    "ssd",
]

#: Scenarios: a setting of ``benchmarks/reproduce.py`` and whether its forget set has corrected labels.
SCENARIOS: dict[str, bool] = {
    "mnist_label_flip": True,
    "mnist_backdoor": True,
    "mnist_classwise": False,
    "mnist_random10": False,
    # the ResNet-18 arm's setting that bites (hours a seed on a CPU: run on request, never by default)
    "fashion_resnet18_label_flip_70": True,
}
#: What runs when no scenario is named: the MNIST CNN's.
DEFAULT_SCENARIOS = [name for name in SCENARIOS if reproduce.SETTINGS[name].group != "resnet"]


def applicable(method: Method, selection: str, corrected: bool) -> str | None:
    """Why the pair cannot run (None: it can)."""
    if method.needs_corrected_labels and not corrected:
        return "needs corrected labels"
    if selection == "validated" and not method.searches_step:
        return "validated compares searched one-step updates"
    return None


def rows(
    seed: int, corrected: bool, methods: list[str], selections: list[str], lr_grid: bool = False
) -> tuple[list[Any], dict[str, str]]:
    """The requests of one seed (``reproduce.Row`` each) and the skipped pairs with their reason; with ``lr_grid``
    the iterative methods search their learning rate on validation (the reproduction's grid)."""
    out, skipped = [], {}
    for method_name in methods:
        method = METHODS[method_name]
        for label in selections:
            key = f"{method_name} × {label}"
            reason = applicable(method, label, corrected)
            if reason:
                skipped[key] = reason
                continue
            selection = json.loads(json.dumps(SELECTIONS[label]).replace('"{seed}"', str(seed)))
            args = (*method.args, "--model.selection", json.dumps(selection))
            if lr_grid and not method.one_step:
                args += ("--model.lr_grid", reproduce.LR_GRID)
            out.append(reproduce.Row(key, method.config, args, key=key))
    return out, skipped


def seed_cache(runs: Path, scenario: str, seed: int) -> None:
    """Start the lab's cache from the reproduction's evaluation of the same models (before, reference, calibration)."""
    folder = runs / scenario / f"seed{seed}"
    lab, reproduction = folder / CACHE, folder / "rows.json"
    if lab.is_file() or not reproduction.is_file():
        return
    shared = {k: v for k, v in json.loads(reproduction.read_text()).items() if k not in ("rows", "sweep")}
    atomic_write_text(lab, json.dumps(shared | {"rows": {}}, indent=1))


def _paired_vs_last_layer(per_seed: list[dict[str, Any]], method: str, label: str) -> str:
    """ToW of the row minus that of the same method on the last layer, seed by seed: mean ± std and the seeds where
    the row is closer to retraining ("–" for the last layer itself or with fewer than two paired seeds)."""
    if label == "last layer":
        return "–"
    diffs = []
    for result in per_seed:
        mine = reproduce._row_metrics(result, f"{method} × {label}").get("tow")
        last = reproduce._row_metrics(result, f"{method} × last layer").get("tow")
        if mine is not None and last is not None:
            diffs.append(mine - last)
    if len(diffs) < 2:
        return "–"
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    return f"{mean:+.4f} ± {std:.4f} ({sum(d > 0 for d in diffs)}/{len(diffs)} better)"


def table(scenario: str, results: dict[str, Any]) -> str:
    seeds = sorted(results["seeds"], key=int)
    per_seed = [results["seeds"][s] for s in seeds]
    kind = reproduce._kind(results["seeds"])
    keys = ["attacked", "test", "tow", "mia", "relearn", "cost"]
    lines = [
        f"### {reproduce.SETTINGS[scenario].label}",
        "",
        f"Seeds {', '.join(seeds)} (n = {len(seeds)}); mean ± std over seeds. Regenerate: "
        f"`python benchmarks/selection_lab.py {scenario} --seeds {' '.join(seeds)}`.",
        "",
        reproduce.effect_summary(results["seeds"]),
        "",
    ]
    body = []
    for method in METHODS:
        for label in SELECTIONS:
            key = f"{method} × {label}"
            metrics = [reproduce._row_metrics(r, key) for r in per_seed]
            metrics = [m for m in metrics if m]
            if not metrics:
                continue
            row = {"method": method, "selection": label}
            for k in keys:
                row[reproduce._header(kind, k)] = reproduce._mean_std(
                    [m.get(k) for m in metrics], reproduce.COLUMNS[k][1]
                )
            row["Δ ToW vs last layer"] = _paired_vs_last_layer(per_seed, method, label)
            row["n"] = str(len(metrics))
            body.append(row)
    lines.append(format_table(body) if body else "(no request finished yet)")
    empty: dict[str, list[str]] = {}
    for seed in seeds:
        for key in results["seeds"][seed].get("empty", {}):
            empty.setdefault(key, []).append(seed)
    if empty:
        lines += ["", "Selected no parameter (nothing to update; the request left the model as it was): "
                  + "; ".join(f"{key} (seeds {', '.join(s)})" for key, s in empty.items()) + "."]  # fmt: skip
    skipped = results.get("skipped", {})
    if skipped:
        reasons: dict[str, list[str]] = {}
        for key, reason in skipped.items():
            reasons.setdefault(reason, []).append(key)
        lines += ["", "Not applicable: " + "; ".join(f"{r}: {', '.join(k)}" for r, k in reasons.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", default=DEFAULT_SCENARIOS, help=f"of {list(SCENARIOS)} (default: {DEFAULT_SCENARIOS})"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"of {list(METHODS)}")
    # argparse %-formats help strings: the labels' "%" must be doubled
    selections = str(list(SELECTIONS)).replace("%", "%%")
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), help=f"of {selections}")
    parser.add_argument("--runs", default="runs/reproduce", help="the reproduction's runs folder (models are shared)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the results files and tables")
    parser.add_argument("--lr-grid", action="store_true", help="iterative methods: search the lr on validation")
    parser.add_argument("--tables", action="store_true", help="only rebuild the tables from the results files")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the seeds the results file records (default: add rows)"
    )
    args = parser.parse_args(argv)
    for name, values, known in (
        ("scenarios", args.scenarios, SCENARIOS),
        ("--methods", args.methods, METHODS),
        ("--selections", args.selections, SELECTIONS),
    ):
        bad = [v for v in values if v not in known]
        if bad:
            parser.error(f"unknown {name} {bad}; choose from {list(known)}")
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenarios:
        path = folder / f"{scenario}.json"
        results = json.loads(path.read_text()) if path.is_file() else {"scenario": scenario, "seeds": {}}
        if not args.tables:
            setting = replace(reproduce.SETTINGS[scenario], sweep=False)  # the layer sweep is the reproduction's
            for seed in args.seeds:
                todo, skipped = rows(seed, SCENARIOS[scenario], args.methods, args.selections, args.lr_grid)
                seed_cache(Path(args.runs), scenario, seed)
                result = reproduce.run_seed(
                    scenario,
                    setting,
                    seed,
                    Path(args.runs),
                    todo,
                    cache_name=CACHE,
                    recorded=results["seeds"].get(str(seed)),
                    overwrite=args.overwrite,
                )
                if path.is_file():  # read again: another run may have written the file while this seed ran
                    results = json.loads(path.read_text())
                results["seeds"][str(seed)] = result
                results["skipped"] = results.get("skipped", {}) | skipped
                results["lr_grid"] = args.lr_grid
                atomic_write_text(path, json.dumps(results, indent=1))
        if results["seeds"]:
            atomic_write_text(path.with_suffix(".md"), table(scenario, results))
    parts = []
    for scenario in SCENARIOS:
        path = folder / f"{scenario}.md"
        if path.is_file():
            parts.append(path.read_text())
    atomic_write_text(
        folder / "summary.md", "# The selection lab (generated by `benchmarks/selection_lab.py`)\n\n" + "\n".join(parts)
    )
    print("\n".join(parts))


if __name__ == "__main__":
    main()
