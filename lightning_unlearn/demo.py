"""``lightning-unlearn demo`` (what ``make demo`` runs): the whole pipeline on real MNIST, offline, on CPU.

1. train the MNIST CNN on MNIST with 2,500 class-9 training labels poisoned; the ``SharpnessProfiler`` profiles the
   exact Hessian diagonal after fit;
2. retrain from scratch without the poisoned samples (the reference);
3. unlearn with SA first-order (smallest-diagonal layer), first-order on the last layer, first-order on all layers and
   fine-tuning all layers for an epoch;
4. print one table: accuracies, % restored and ToW (relative to the retrained model), the membership-inference
   (SVC) score and the relearning attack of every model, and seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lightning_unlearn.cli import format_table
from lightning_unlearn.evaluation.suite import EvaluationOptions, evaluate_model
from lightning_unlearn.experiment import train, unlearn
from lightning_unlearn.pipeline import reference_metrics
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.utils import atomic_write_text

REQUESTS = {
    "SA first-order (smallest layer)": "sa_first_order",
    "first-order, last layer": "first_order_last_layer",
    "first-order, all layers": "first_order_all",
    "fine-tune all, 1 epoch": "finetune_all",
}


def row(name: str, metrics: dict[str, float], report: dict[str, Any] | None = None) -> dict[str, Any]:
    report = report or {}
    method = report.get("method", {})
    tow = report.get("comparison", {}).get("tow")
    return {
        "model": name,
        "params": f"{report['selection']['num_selected']:,}" if report else None,
        "test %": metrics.get("test/acc"),
        "class 9 %": metrics.get("test/acc_target"),
        "other %": metrics.get("test/acc_other"),
        "forget→poisoned %": metrics.get("forget/acc"),
        "% restored (9)": report.get("restored", {}).get("test_restored/acc_target"),
        "ToW": None if tow is None else f"{tow:.4f}",
        "MIA-SVC %": metrics.get("mia/svc"),
        "relearn %": metrics.get("relearn/forget_acc_after"),
        "update s": method.get("seconds_update", report["timings"]["fit_wall_seconds"]) if report else None,
        "search s": method.get("seconds_search"),
        "step": f"{method['step']:.1e}" if method.get("step") is not None else None,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="lightning-unlearn demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="Folder for the run directories (default: runs/demo).")
    args = parser.parse_args(argv)
    out = Path(args.out)

    print("== 1/3 training on poisoned MNIST (+ Hessian-diagonal profile)")
    run_dir, _ = train(["mnist_cnn_targeted.yaml"], out)
    print("== 2/3 retraining without the poisoned samples (reference)")
    retrain_dir, _ = train(["mnist_cnn_targeted.yaml", "retrain.yaml"], out)
    print("== 3/3 unlearning")
    options = EvaluationOptions()
    training_run = TrainingRun.from_path(run_dir)
    datamodule = training_run.datamodule()
    reference = reference_metrics(retrain_dir, datamodule, options)
    before = evaluate_model(training_run.load_classifier().net, datamodule, options)
    reports = {}
    for name, config in REQUESTS.items():
        print(f"-- {name}")
        reports[name] = unlearn(config, run_dir, reference=reference, before=before, evaluation=options)

    rows = [row("poisoned (before)", before), row("retrained (reference)", reference)]
    rows += [row(name, report["after"], report) for name, report in reports.items()]
    table = format_table(rows)
    print(f"\nReal MNIST, 2,500 of class 9 poisoned; run: {run_dir}; reference: {retrain_dir}\n")
    print(table)
    atomic_write_text(out / "demo_table.md", table + "\n")
    atomic_write_text(out / "demo_reports.json", json.dumps(reports, indent=1, default=str))
    print(
        f"\nTable: {out / 'demo_table.md'}; reports: {out / 'demo_reports.json'}; "
        f"TensorBoard: .venv/bin/tensorboard --logdir {out}"
    )
    return rows


if __name__ == "__main__":
    main()
