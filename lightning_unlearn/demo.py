"""``lightning-unlearn demo`` (what ``make demo`` runs): the whole pipeline on real MNIST, offline, on any device.

1. train the MNIST CNN on MNIST with a label flip 9 → 4 (3,500 of the ~4,990 training images of class 9 relabelled
   4, ``configs/mnist_cnn_label_flip.yaml``); the ``SharpnessProfiler`` profiles the exact Hessian diagonal after fit;
2. retrain from scratch without the flipped samples (the reference), and state the poison's harm (class-9 test
   accuracy, poisoned vs retrained) and fit (how much of the forget set the poisoned model learnt);
3. unlearn with ``Auto`` (the default request: method, selection and step chosen by the forgetting target's criterion,
   without the retrained model), then the paper's SA first-order (smallest-diagonal layer, step on the validation
   loss), first-order on the last layer, first-order on all layers and fine-tuning all layers for an epoch;
4. print one table: accuracies, % restored of the class-9 accuracy and ToW (relative to the retrained model), the
   membership-inference (SVC) score, the relearning attack's recovery (area under its curve, with a learning rate
   calibrated on the validation split) of every model, and seconds.

Everything runs on ``--accelerator`` / ``--devices`` (default: the best available device, one of it): training,
retraining and every request through their Trainers, the evaluations outside them on the same device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lightning_unlearn.evaluation.cost import accelerator_device, device_label
from lightning_unlearn.evaluation.suite import EvaluationOptions, evaluate_model, poison_effect
from lightning_unlearn.experiment import train, unlearn
from lightning_unlearn.reference import evaluate_reference
from lightning_unlearn.reporting import format_table
from lightning_unlearn.run import TrainingRun
from lightning_unlearn.utils import atomic_write, atomic_write_text

CONFIG = "mnist_cnn_label_flip.yaml"
REQUESTS = {
    "Auto (the default request)": "auto",
    "SA first-order (smallest layer)": "sa_first_order",
    "first-order, last layer": "first_order_last_layer",
    "first-order, all layers": "first_order_all",
    "fine-tune all, 1 epoch": "finetune_all",
}


TABLE, REPORTS, FIGURE = "demo_table.md", "demo_reports.json", "demo.png"


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any training, an ``--out`` that is not a folder, or that holds an earlier demo's table or
    reports (unless ``overwrite``); the run directories inside are new versions either way."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"lightning-unlearn demo: `--out` {str(out)!r} exists and is not a folder.")
    earlier = [name for name in (TABLE, REPORTS, FIGURE) if (out / name).exists()]
    if earlier and not overwrite:
        raise SystemExit(
            f"lightning-unlearn demo: `--out` {str(out)!r} already holds {' and '.join(earlier)} of an earlier demo; "
            "pass `--overwrite` to replace them, or choose another `--out`."
        )


def row(name: str, metrics: dict[str, float], report: dict[str, Any] | None = None) -> dict[str, Any]:
    report = report or {}
    method = report.get("method", {})
    tow = report.get("comparison", {}).get("tow")
    return {
        "model": name,
        "params": f"{report['selection']['num_selected']:,}" if report else None,
        "test %": metrics.get("test/acc"),
        "class 9 %": metrics.get("test/acc_attacked"),
        "other %": metrics.get("test/acc_other"),
        "fit %": metrics.get("forget/acc"),
        "% restored (9)": _restored(report, name),
        "ToW": None if tow is None else f"{tow:.4f}",
        "KL test": _distance(report, "test"),
        "MIA-SVC %": metrics.get("mia/svc"),
        "MIA SalUn conf. %": metrics.get("mia/salun_confidence"),
        "relearn AUC %": metrics.get("relearn/auc"),
        "update s": method.get("seconds_update", report["timings"]["fit_wall_seconds"]) if report else None,
        "search s": method.get("seconds_search"),
        "step": f"{method['step']:.1e}" if method.get("step") is not None else None,
    }


def _distance(report: dict[str, Any], split: str) -> str | None:
    """The mean KL divergence of the outputs from the retrained model's on a split (per sample, then averaged)."""
    value = report.get("comparison", {}).get(f"distance/{split}/kl")
    return None if value is None else f"{value:.4f}"


def _restored(report: dict[str, Any], name: str) -> float | None:
    if report:
        return report.get("restored", {}).get("test_restored/acc_attacked")
    return {"poisoned (before)": 0.0, "retrained (reference)": 100.0}.get(name)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="lightning-unlearn demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="Folder for the run directories (default: runs/demo).")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"Replace the {TABLE}, {REPORTS} and {FIGURE} of an earlier demo in --out (refused by default).",
    )
    parser.add_argument(
        "--accelerator",
        default="auto",
        help="Lightning accelerator of every Trainer: auto (default), cpu, gpu, cuda, mps.",
    )
    parser.add_argument(
        "--devices", default="1", help="Devices per Trainer (Lightning's `devices`; default 1: the demo is small)."
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    _check_out(out, args.overwrite)
    hardware = ("--trainer.accelerator", args.accelerator, "--trainer.devices", args.devices)
    device = accelerator_device(args.accelerator)
    print(f"Device: {device_label(device)}")

    print("== 1/3 training on poisoned MNIST: label flip 9 -> 4 (+ Hessian-diagonal profile)")
    run_dir, _ = train([CONFIG], out, *hardware)
    print("== 2/3 retraining without the flipped samples (reference)")
    retrain_name = ("--trainer.logger.init_args.name", "mnist_cnn_label_flip_retrain")
    retrain_dir, _ = train([CONFIG, "retrain.yaml"], out, *hardware, *retrain_name)
    training_run = TrainingRun.from_path(run_dir)
    datamodule = training_run.datamodule()
    options, reference, calibration = evaluate_reference(
        retrain_dir, datamodule, EvaluationOptions(), poisoned=training_run, device=device
    )
    before = evaluate_model(training_run.load_classifier().net, datamodule, options, device)
    effect = poison_effect(before, reference, datamodule.spec.kind)
    print(f"What there is to unlearn: {effect['statement']}")
    print("== 3/3 unlearning")
    reports = {}
    for name, config in REQUESTS.items():
        print(f"-- {name}")
        reports[name] = unlearn(
            config, run_dir, *hardware, reference=reference, before=before, evaluation=options, calibration=calibration
        )

    rows = [row("poisoned (before)", before), row("retrained (reference)", reference)]
    rows += [row(name, report["after"], report) for name, report in reports.items()]
    table = format_table(rows)
    print(f"\nReal MNIST, label flip 9 -> 4 on 3,500 training images; run: {run_dir}; reference: {retrain_dir}")
    print(f"{effect['statement']}")
    print(
        f"Relearning attack: {options.relearn_steps} SGD steps on {options.relearn_fraction:.0%} of the forget set, "
        f"lr {options.relearn_lr:g} (calibrated on the validation split: the retrained model stays at or below "
        f"{options.relearn_ceiling:g} % there); AUC = mean held-out forget accuracy (poisoned labels) over the attack."
    )
    print()
    print(table)
    atomic_write_text(out / TABLE, table + "\n", exclusive=not args.overwrite)
    payload = {
        "device": device_label(device),
        "poison_effect": effect,
        "relearn_calibration": calibration,
        "requests": reports,
    }
    atomic_write_text(out / REPORTS, json.dumps(payload, indent=1, default=str), exclusive=not args.overwrite)
    figure = demo_figure(rows)
    save = lambda handle: figure.savefig(handle, format="png", dpi=120)  # noqa: E731
    atomic_write(out / FIGURE, save, exclusive=not args.overwrite)
    print(
        f"\nTable: {out / TABLE}; figure: {out / FIGURE}; reports: {out / REPORTS}; "
        f"TensorBoard: .venv/bin/tensorboard --logdir {out}"
    )
    return rows


def demo_figure(rows: list[dict[str, Any]]) -> Any:
    """The demo's table as one figure: per request, the attacked class's test accuracy after unlearning (a bar)
    between the poisoned and the retrained model's (lines), labelled with its ToW against the retrained model."""
    from lightning_unlearn.evaluation.figures import pyplot

    plt = pyplot()

    key = "class 9 %"
    levels = {r["model"]: r[key] for r in rows[:2]}
    requests = rows[2:][::-1]  # the first request on top
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(requests) + 1.4))
    ys = range(len(requests))
    ax.barh(list(ys), [r[key] for r in requests], color="tab:blue", height=0.6)
    for y, r in zip(ys, requests, strict=True):
        ax.annotate(f"ToW {r['ToW']}", (r[key], y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(list(ys), [r["model"] for r in requests], fontsize=8)
    for (name, value), style in zip(levels.items(), ("--", "-"), strict=True):
        ax.axvline(value, color="grey", ls=style, lw=1, label=f"{name}: {value:.1f} %")
    ax.set_xlim(0, 118)
    ax.set_xlabel("test accuracy of class 9 (%), after unlearning")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=7, frameon=False)
    ax.set_title("Label flip 9 → 4 on MNIST: what each request restores", fontsize=10)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
