"""How close does the one-step search land to the retrained model? Old search vs new search vs an oracle.

On the runs of ``benchmarks/reproduce.py`` (default: the MNIST label flip 9 → 4, where the poison costs class 9 tens
of points), for each seed and each selection (the flattest layer, the last layer, and the ``Validated`` selection):

* **old**: the search of the first reproduction: highest validation *accuracy* on the half-decade grid
  (``FirstOrder(criterion="acc")``);
* **new**: the default search: validation *loss*, grid + extension + golden-section refinement
  (``FirstOrder(criterion="loss")``);
* **oracle**: the step with the best ToW against the retrained model on a dense log grid (``--oracle-points`` steps
  from 1e-7 to 1e-2, plus the steps the old and new searches chose, so it is at least as good as either), refined on
  a 16 times finer grid between the best step's two neighbours (ToW moves by hundredths between neighbouring grid
  steps: the forget set's labels flip together). It looks at the forget/retain/test accuracies of the retrained
  model, which no request can: a ceiling, never used to choose anything. For ``Validated`` it is the best oracle over
  its candidates.

ToW is the RUM form (forget, retain, test accuracies against the retrained model). The request's cost (gradient,
search, the validated comparison) is measured against retraining from scratch, side by side in the same process.

Usage::

    python benchmarks/step_search.py --seeds 0 1 2 3 4        # after `python benchmarks/reproduce.py mnist_label_flip`
    python benchmarks/step_search.py --tables                 # rebuild the table from the results file

Writes ``benchmarks/results/step_search.json`` and ``.md`` (resumable per seed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_unlearn.evaluation.suite import compare, evaluate_splits  # noqa: E402
from lightning_unlearn.experiment import train  # noqa: E402
from lightning_unlearn.reporting import format_table  # noqa: E402
from lightning_unlearn.run import TrainingRun  # noqa: E402
from lightning_unlearn.selection import LastLayer, SmallestLayer, Validated  # noqa: E402
from lightning_unlearn.unlearn import FirstOrder, UnlearnModule  # noqa: E402
from lightning_unlearn.unlearn.methods.one_step import forget_gradient  # noqa: E402
from lightning_unlearn.unlearn.module import unlearn_trainer  # noqa: E402
from lightning_unlearn.utils import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SELECTIONS = {"flattest layer": SmallestLayer, "last layer": LastLayer, "validated": Validated}


def request(run: Path, selection: Any, criterion: str) -> tuple[UnlearnModule, float]:
    """One first-order request; returns the module (unlearned) and its wall time (gradient + search)."""
    # evaluate=False: the before/after evaluation inside the fit is not part of a request's cost (measured below)
    module = UnlearnModule(str(run), FirstOrder(criterion=criterion), selection, eval_batch_size=2000, evaluate=False)
    start = time.perf_counter()
    unlearn_trainer(accelerator="cpu", max_epochs=module.max_epochs).fit(module)
    return module, time.perf_counter() - start


def forget_direction(module: UnlearnModule, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The first-order direction ``Σ_{i∈D_f} [∇ℓ(x_i, y_true_i) − ∇ℓ(x_i, y_poisoned_i)]`` w.r.t. ``params``, the
    network in ``eval()`` mode (what ``FirstOrder`` steps along)."""
    direction = [torch.zeros_like(p) for p in params]
    module.net.eval()
    for x, y_poisoned, y_true, _ in module.datamodule.forget_pairs_dataloader(batch_size=1000):
        for d, g in zip(direction, forget_gradient(module.net, x, y_poisoned, y_true, params), strict=True):
            d += g
    return direction


def oracle(
    module: UnlearnModule,
    names: list[str],
    masks: dict[str, torch.Tensor] | None,
    steps: list[float],
    before: dict[str, float],
    reference: dict[str, float],
    refine: int = 8,
) -> dict[str, float]:
    """The best ToW along the first-order direction of ``names`` (restricted to ``masks``) over ``steps`` (the
    searches' own chosen steps among them, so the oracle is at least as good as each), then over ``2·refine − 1``
    steps log-spaced between the best step's two neighbours; "no change" (step 0) included."""
    net, dm = module.net, module.datamodule
    params = dict(module.named_parameters())  # the masks name parameters as the module does (net.<name>)
    chosen = [params[n] for n in names]
    original = [p.detach().clone() for p in chosen]
    direction = forget_direction(module, chosen)
    if masks is not None:
        direction = [
            d * masks[n].to(d.dtype) if n in masks else torch.zeros_like(d)
            for n, d in zip(names, direction, strict=True)
        ]
    scores = {0.0: compare(before, before, reference)["tow"]}

    @torch.no_grad()
    def score(step: float) -> float:
        if step not in scores:
            for p, p0, d in zip(chosen, original, direction, strict=True):
                p.copy_(p0 - step * d)
            scores[step] = compare(before, evaluate_splits(net, dm), reference)["tow"]
        return scores[step]

    grid = sorted(set(steps))
    for step in grid:
        score(step)
    # refine: ToW changes by hundredths between neighbouring grid steps (the forget set's labels flip together), so
    # the best grid step's neighbourhood is searched again on a grid `refine` times finer
    best = max(grid, key=lambda t: scores[t])
    i = grid.index(best)
    low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for k in range(1, 2 * refine):
        score(low * (high / low) ** (k / (2 * refine)))
    with torch.no_grad():
        for p, p0 in zip(chosen, original, strict=True):
            p.copy_(p0)
    step = max(scores, key=lambda t: (scores[t], -t))
    return {"step": step, "tow": scores[step], "evaluations": len(scores)}


def run_seed(runs: Path, seed: int, points: int) -> dict[str, Any]:
    folder = runs / f"seed{seed}"
    run, retrained = folder / "poisoned" / "version_0", folder / "retrained" / "version_0"
    probe = UnlearnModule(str(run), FirstOrder())
    dm = probe.datamodule
    dm.setup("fit")
    before = evaluate_splits(probe.net, dm)
    reference = evaluate_splits(TrainingRun.from_path(retrained).load_classifier().net, dm)
    steps = [10 ** (-7 + 5 * i / (points - 1)) for i in range(points)]
    out: dict[str, Any] = {"tow_before": compare(before, before, reference)["tow"], "selections": {}}
    for label, factory in SELECTIONS.items():
        entry: dict[str, Any] = {}
        for search, criterion in (("old", "acc"), ("new", "loss")):
            module, seconds = request(run, factory(), criterion)
            report = module.method.report()
            after = evaluate_splits(module.net, dm)
            entry[search] = {
                "tow": compare(before, after, reference)["tow"],
                "step": report["step"],
                "selection": report.get("selection", label),
                "evaluations": report["evaluations"],
                "seconds": seconds,
            }
        module = UnlearnModule(str(run), FirstOrder(), factory())
        module.prepare()
        if isinstance(module.selection, Validated):
            candidates = module.selection.candidates(module.profile)
        else:
            candidates = [(label, module.mask)]
        best = {"tow": -math.inf}
        searched = [entry[s]["step"] for s in ("old", "new") if entry[s]["step"] > 0]
        for candidate, mask in candidates:
            names = [n for n in mask.masks if bool(mask.masks[n].any())]
            result = oracle(module, names, mask.masks, steps + searched, before, reference) | {"selection": candidate}
            best = result if result["tow"] > best["tow"] else best
        entry["oracle"] = best
        out["selections"][label] = entry
        print(f"seed {seed} {label}: " + ", ".join(f"{k} {v['tow']:.4f}" for k, v in entry.items()), flush=True)
    return out


def retrain_seconds(config: str, runs: Path) -> float:
    """Wall time of retraining from scratch without the forget set (fit only), in this process."""
    start = time.perf_counter()
    quiet = ("--test_after_fit", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false")
    train([config, "retrain.yaml"], runs / "step_search_retrain", *quiet)
    return time.perf_counter() - start


def _mean_std(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    seeds = sorted(results["seeds"], key=int)
    per_seed = [results["seeds"][s] for s in seeds]
    # each seed's request is compared with the retraining timed in the same run (older results: one global timing)
    retrain = [r.get("retrain_seconds") or results.get("retrain_seconds") for r in per_seed]
    rows = []
    for label in SELECTIONS:
        entries = [r["selections"][label] for r in per_seed]
        new_gap = [e["oracle"]["tow"] - e["new"]["tow"] for e in entries]
        rows.append(
            {
                "selection": label,
                "old search ToW": _mean_std([e["old"]["tow"] for e in entries]),
                "new search ToW": _mean_std([e["new"]["tow"] for e in entries]),
                "oracle ToW (ceiling)": _mean_std([e["oracle"]["tow"] for e in entries]),
                "oracle − new": _mean_std(new_gap),
                "new − old": _mean_std([e["new"]["tow"] - e["old"]["tow"] for e in entries]),
                "new: evaluations": _mean_std([e["new"]["evaluations"] for e in entries], 1),
                "new: seconds": _mean_std([e["new"]["seconds"] for e in entries], 2),
                "new: × retrain": _mean_std(
                    [e["new"]["seconds"] / t for e, t in zip(entries, retrain, strict=True) if t]
                ),
            }
        )
    margin = [
        r["selections"]["validated"]["new"]["tow"]
        - max(r["selections"]["flattest layer"]["new"]["tow"], r["selections"]["last layer"]["new"]["tow"])
        for r in per_seed
    ]
    chosen = [r["selections"]["validated"]["new"]["selection"] for r in per_seed]
    lines = [
        f"Seeds {', '.join(seeds)} of `{results['runs']}`; mean ± std over seeds; ToW of the poisoned model "
        f"{_mean_std([r['tow_before'] for r in per_seed])}. Retraining (fit only, timed in the same run as each seed): "
        f"{_mean_std([t for t in retrain if t], 1)} s.",
        "",
        format_table(rows),
        "",
        f"Validated minus the better of flattest and last layer (new search), per seed: "
        f"{', '.join(f'{m:+.4f}' for m in margin)} (mean {_mean_std(margin)}); validated chose: {', '.join(chosen)}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/reproduce/mnist_label_flip", help="a setting's runs of reproduce.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--oracle-points", type=int, default=41, help="steps of the oracle's dense grid (1e-7..1e-2)")
    parser.add_argument("--config", default="mnist_cnn_label_flip.yaml", help="training config of the setting")
    parser.add_argument("--out", default=str(RESULTS / "step_search.json"))
    parser.add_argument("--tables", action="store_true", help="only rebuild the table from the results file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": args.runs, "seeds": {}}
    if not args.tables:
        todo = [seed for seed in args.seeds if str(seed) not in results["seeds"]]
        # retraining from scratch (fit only) is timed in this same process, next to the seeds it is compared with (a
        # resumed run measures it again: this machine's speed varies between runs)
        retrain = retrain_seconds(args.config, Path(args.runs)) if todo else None
        for seed in todo:
            results["seeds"][str(seed)] = run_seed(Path(args.runs), seed, args.oracle_points) | {
                "retrain_seconds": retrain
            }
            atomic_write_text(out, json.dumps(results, indent=1))
    atomic_write_text(out, json.dumps(results, indent=1))
    text = table(results)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
