"""How many samples does a profile need? Layer ranking and top-1 % parameter set vs ``max_samples``.

Profiles a trained run with each budget (the first N training samples, as trained on) and compares each with the
profile of the whole training set: the layer ranking by mean diagonal (identical order? Spearman's rho), the layer the
``smallest`` and ``largest`` strategies would pick, the overlap of the top-1 % single parameters, and the relative
error of the per-layer means. Prints a markdown table and writes JSON.

    .venv/bin/python benchmarks/profile_convergence.py --run runs/demo/mnist_cnn_targeted/version_0 \
        --budgets 1000 5000 50000 --estimators exact mc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_unlearn.curvature import SharpnessProfile, profile_model  # noqa: E402
from lightning_unlearn.reporting import format_table  # noqa: E402
from lightning_unlearn.run import TrainingRun  # noqa: E402
from lightning_unlearn.sweep import spearman  # noqa: E402
from lightning_unlearn.utils import atomic_write_text  # noqa: E402


def top_overlap(p: SharpnessProfile, q: SharpnessProfile, fraction: float = 0.01) -> float:
    a, b = p.top_parameters(fraction), q.top_parameters(fraction)
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    return inter / sum(int(m.sum()) for m in a.values())


def compare(profile: SharpnessProfile, reference: SharpnessProfile, types: tuple[str, ...]) -> dict[str, object]:
    means = {s.name: s.mean for s in profile.layer_stats()}
    ref = {s.name: s.mean for s in reference.layer_stats()}
    names = list(ref)
    return {
        "same_order": profile.rank_layers(types=types) == reference.rank_layers(types=types),
        "spearman": spearman([means[n] for n in names], [ref[n] for n in names]),
        "smallest": profile.rank_layers(types=types)[0],
        "largest": profile.rank_layers(descending=True, types=types)[0],
        "top1%_overlap": top_overlap(profile, reference),
        "max_rel_err_layer_mean": max(abs(means[n] - ref[n]) / ref[n] for n in names),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="Training run directory (or checkpoint).")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1000, 5000, 50000])
    parser.add_argument("--estimators", nargs="+", default=["exact", "mc"])
    parser.add_argument("--out", default="benchmarks/results/profile_convergence.json")
    args = parser.parse_args(argv)

    run = TrainingRun.from_path(args.run)
    model = run.load_classifier()
    datamodule = run.datamodule()
    datamodule.setup("fit")
    loader = datamodule.profile_dataloader(batch_size=256)
    types = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    start = time.perf_counter()
    reference = profile_model(model, loader, "exact")
    reference_seconds = time.perf_counter() - start
    rows = []
    for estimator in args.estimators:
        for budget in args.budgets:
            start = time.perf_counter()
            profile = profile_model(model, loader, estimator, max_samples=budget, seed=0)
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "estimator": estimator,
                    "samples": profile.num_samples,
                    "seconds": seconds,
                    **compare(profile, reference, types),
                }
            )
    table = format_table(rows, floatfmt=".3f")
    print(
        f"Reference: exact on all {reference.num_samples} training samples ({reference_seconds:.1f} s); "
        f"layers by mean diagonal: {reference.rank_layers(types=types)}\n"
    )
    print(table)
    out = Path(args.out)
    atomic_write_text(
        out,
        json.dumps(
            {
                "run": str(run.directory),
                "reference_seconds": reference_seconds,
                "reference_ranking": reference.rank_layers(types=types),
                "rows": rows,
            },
            indent=1,
        ),
    )
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
