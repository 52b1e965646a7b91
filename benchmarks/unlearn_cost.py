"""Cost of one unlearning request vs fine-tuning and retraining, measured side by side in one run.

On the real-MNIST targeted setting (2,500 of class 9, ``configs/mnist_cnn_targeted.yaml``), in one process with the
same thread count, it times:

* **retraining** from scratch without the poisoned samples (the full recipe: 5 epochs, ``fit`` only);
* the **profile**: the exact Hessian diagonal of the whole training set (one-time, shared by every request);
* one **request** of SA first-order (smallest-diagonal layer) and of first-order on the last layer: selection +
  update + step-size search on the validation split (the evaluation before/after is not part of the request);
* **fine-tuning** all layers for one epoch on the retain set (the paper's baseline), through the same request path.

Each request is timed ``--repeats`` times (median); every figure is printed as a ratio to retraining.

    .venv/bin/python benchmarks/unlearn_cost.py [--run RUN_DIR] [--repeats 3]

Writes ``benchmarks/results/unlearn_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lightning_unlearn.curvature import profile_model  # noqa: E402
from lightning_unlearn.evaluation.cost import accelerator_device, device_label, synchronize  # noqa: E402
from lightning_unlearn.evaluation.suite import ACCURACY_ONLY  # noqa: E402
from lightning_unlearn.experiment import train, unlearn  # noqa: E402
from lightning_unlearn.reporting import format_table  # noqa: E402
from lightning_unlearn.run import TrainingRun  # noqa: E402
from lightning_unlearn.utils import atomic_write_text  # noqa: E402

CONFIG = "mnist_cnn_targeted.yaml"
REQUESTS = {
    "SA first-order request (smallest layer)": "sa_first_order",
    "first-order request, last layer": "first_order_last_layer",
    "fine-tune all, 1 epoch": "finetune_all",
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="poisoned training run to unlearn (default: train one)")
    parser.add_argument("--out", default="runs/unlearn_cost", help="folder for the runs this benchmark trains")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each request (median)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results/unlearn_cost.json"))
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every Trainer (default cpu)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    hardware = ("--trainer.accelerator", args.accelerator)
    device = accelerator_device(args.accelerator)

    run_dir = Path(args.run) if args.run else train([CONFIG], out, *hardware, name="poisoned", resume=True)[0]
    print("== retraining from scratch (timed)", flush=True)
    _, retrained = train(
        [CONFIG, "retrain.yaml"], out, *hardware, "--test_after_fit", "false", name=f"retrain_{time.time_ns()}"
    )
    retrain_seconds = retrained["seconds"]

    print("== profile (exact, whole training set)", flush=True)
    training_run = TrainingRun.from_path(run_dir)
    datamodule = training_run.datamodule()
    datamodule.setup("fit")
    net = training_run.load_classifier().net.to(device)
    synchronize(device)
    start = time.perf_counter()
    profile_model(net, datamodule.profile_dataloader(), "exact", device=device)
    synchronize(device)
    profile_seconds = time.perf_counter() - start

    seconds: dict[str, list[float]] = {}
    details: dict[str, dict] = {}
    for _ in range(args.repeats):
        for label, config in REQUESTS.items():
            print(f"== {label}", flush=True)
            report = unlearn(config, run_dir, *hardware, evaluation=ACCURACY_ONLY, before={})
            seconds.setdefault(label, []).append(report["cost"]["seconds"])
            method = report["method"]
            details[label] = {
                k: method.get(k) for k in ("seconds_update", "seconds_search", "validation_cached", "step")
            } | {"selection_seconds": report["timings"]["selection_seconds"]}

    rows = [
        {"what": "retrain from scratch (5 epochs)", "seconds": retrain_seconds, "× retraining": 1.0},
        {"what": "profile, exact (one-time)", "seconds": profile_seconds, "× retraining": 0.0},
    ]
    rows[1]["× retraining"] = profile_seconds / retrain_seconds
    for label, values in seconds.items():
        median = statistics.median(values)
        rows.append({"what": label, "seconds": median, "× retraining": median / retrain_seconds})
    table = format_table(rows, floatfmt=".3f")
    print("\n" + table)
    result = {
        "device": device_label(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "run": str(run_dir),
        "repeats": args.repeats,
        "retrain_seconds": retrain_seconds,
        "profile_seconds": profile_seconds,
        "requests": {label: {"seconds": values, "details": details[label]} for label, values in seconds.items()},
        "table": table,
    }
    atomic_write_text(Path(args.output), json.dumps(result, indent=1))
    print(f"\nwritten: {args.output}")
    return result


if __name__ == "__main__":
    main()
