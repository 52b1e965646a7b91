"""Auto against every method and against oracle-tuned rows, per forgetting scenario, over seeds (issue 29).

For each scenario and seed this reuses (or trains) the poisoned and retrained models of ``benchmarks/reproduce.py``
(the same ``--runs`` folder), states the poison's harm and fit, then runs:

* **Auto** — the default request (``configs/unlearn/auto.yaml``, the scenario's forgetting target), which chooses
  method, selection and step by the forgetting target's criterion without a retrained model;
* **every method with its default selection**, each choice scored by the same criterion (one-step steps,
  iterative learning rates and epochs from ``--model.lr_grid``), and the paper's SA row as the paper ran it (the
  step on the validation loss);
* **oracle-tuned rows** — the protocol most papers use: hyper-parameters chosen by the retrained model's ToW over a
  small grid (one-step updates: every direction × a 25-point step grid refined around the best, on the last layer and
  on all layers; fine-tuning and NegGrad+: every learning rate of the grid). A ceiling, never a default.

Columns: harm and fit first, then the attacked metric, test accuracy, ToW, the per-sample output distance to the
retrained model (KL divergence and margin gap on the forget set and the test set), MIA (OPTML's SVC score), and cost:
seconds, **training-epoch equivalents** (the request's seconds over one epoch of training measured in the same
process, ``epoch_seconds``) and × retraining.

``klom`` runs KLoM (Georgiev et al. 2024): an ensemble of ``--seeds`` trainings per side on one poison record
(poison seed 0, training seeds varied), Auto on each poisoned model, and per sample the KL divergence between the
margin distributions of the unlearned and the retrained ensembles (each fitted by a normal distribution; margin =
correct-class logit minus the largest other), reported as mean and quantiles on the forget, validation and test sets.

Everything is resumable (``<runs>/<setting>/seed<k>/auto_rows.json``; KLoM per training seed); results files in
``benchmarks/results/auto/``. Usage::

    python benchmarks/auto.py mnist --seeds 0 1 2 3 4                 # the six MNIST scenarios
    python benchmarks/auto.py mnist_label_flip --seeds 0 --rows auto   # one scenario, one row
    python benchmarks/auto.py resnet --seeds 0 1 2                    # the ResNet-18 arm
    python benchmarks/auto.py klom mnist_label_flip --seeds 0 1 2 3 4 5 6 7
    python benchmarks/auto.py --tables                                # rebuild the tables only
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce  # noqa: E402
import torch  # noqa: E402

from lightning_unlearn.evaluation.distance import ReferenceMetrics, margins, split_outputs  # noqa: E402
from lightning_unlearn.evaluation.suite import ATTACKED_METRICS, EvaluationOptions, compare  # noqa: E402
from lightning_unlearn.experiment import train, unlearn  # noqa: E402
from lightning_unlearn.reporting import format_table  # noqa: E402
from lightning_unlearn.run import TrainingRun  # noqa: E402
from lightning_unlearn.selection import AllLayers, EmptySelectionError, LastLayer  # noqa: E402
from lightning_unlearn.unlearn import FirstOrderRemoval, UnlearnModule  # noqa: E402
from lightning_unlearn.unlearn.methods.auto import TARGET_DIRECTIONS, forget_gradients  # noqa: E402
from lightning_unlearn.utils import atomic_write, atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "auto"
CACHE = "auto_rows.json"
#: The figure ``--tables`` draws from the committed results (``docs/results.md`` shows it).
FIGURE = ROOT / "docs" / "figures" / "auto_cost_tow.png"
#: Where ``docs/results.md`` holds this benchmark's tables.
DOC_MARKERS = ("<!-- auto tables: start -->", "<!-- auto tables: end -->")
#: Evaluation of every model: accuracies, MIA (the SalUn scores averaged over 5 subsamples of 2,000, which keeps a
#: request's evaluation well below its own cost here), no relearning attack.
EVALUATION = (("mia_samples", 2000), ("mia_subsample_repeats", 5), ("relearn", False))
LR_GRID = "[0.0001, 0.001, 0.01, 0.1]"
ORACLE_LRS = (1e-4, 1e-3, 1e-2, 1e-1)
ORACLE_STEPS = [10 ** (-7 + 6 * i / 24) for i in range(25)]  # 1e-7 … 1e-1


@dataclass(frozen=True)
class Scenario:
    """A scenario: a setting of the reproduction and the request's forgetting target (None: the record's)."""

    setting: str
    target: str | None = None
    group: str = "mnist"

    @property
    def label(self) -> str:
        base = reproduce.SETTINGS[self.setting].label
        return base + (f" — target {self.target!r} (corrected labels not used)" if self.target else "")


SCENARIOS: dict[str, Scenario] = {
    "mnist_label_flip": Scenario("mnist_label_flip"),
    "mnist_backdoor": Scenario("mnist_backdoor"),
    "mnist_backdoor_trigger": Scenario("mnist_backdoor", "trigger_removed"),
    "mnist_classwise": Scenario("mnist_classwise"),
    "mnist_random10": Scenario("mnist_random10"),
    "mnist_noise": Scenario("mnist_noise", "unseen"),
    "resnet_label_flip_70": Scenario("fashion_resnet18_label_flip_70", group="resnet"),
    "resnet_backdoor": Scenario("fashion_resnet18_backdoor", group="resnet"),
}


@dataclass(frozen=True)
class Row:
    """A request row: ``configs/unlearn/<config>.yaml`` with arguments, for the scenarios it applies to."""

    label: str
    config: str
    args: tuple[str, ...] = ()
    corrected_only: bool = False  # needs the corrected labels (the target 'corrected')
    removal_only: bool = False  # the removal form, where there are no corrected labels to use


TARGET = ("--model.method.init_args.criterion", "target")
LAST = ("--model.selection", "lightning_unlearn.selection.LastLayer")
TARGET_LR = ("--model.lr_grid", LR_GRID, "--model.lr_criterion", "target")
ROWS: dict[str, Row] = {
    "auto": Row("Auto (the default request)", "auto"),
    "first_order_last": Row("first-order, last layer", "first_order_last_layer", TARGET, corrected_only=True),
    "removal_last": Row("first-order removal, last layer", "first_order_removal", (*TARGET, *LAST)),
    "sa_paper": Row("SA first-order, flattest layer (the paper: step on validation loss)", "sa_first_order",
                    corrected_only=True),
    "sa_paper_removal": Row("SA first-order removal, flattest layer (step on validation loss)", "first_order_removal",
                            removal_only=True),
    "second_order": Row("second-order (diag), flattest layer", "second_order_diag", TARGET, corrected_only=True),
    "finetune": Row("fine-tune all, 1 epoch (lr and epochs by the criterion)", "finetune_all", TARGET_LR),
    "neggrad_plus": Row("NegGrad+, all layers (lr and epochs by the criterion)", "neggrad_plus_all", TARGET_LR),
    "random_label": Row("random label, all layers (SalUn's recipe)", "random_label"),
    "ssd": Row("SSD (Fisher ratio, α = 10, λ = 1)", "ssd"),
}  # fmt: skip
ORACLE_ROWS = {
    "oracle_one_step_last": "oracle-tuned: one-step, last layer (direction and step by ToW)",
    "oracle_one_step_all": "oracle-tuned: one-step, all layers (direction and step by ToW)",
    "oracle_finetune": "oracle-tuned: fine-tune all, 1 epoch (lr by ToW)",
    "oracle_neggrad_plus": "oracle-tuned: NegGrad+, all layers, 1 epoch (lr by ToW)",
}
DEFAULT_ROWS = [*ROWS, *ORACLE_ROWS]


def applies(row: Row, scenario: Scenario, corrected: bool) -> bool:
    """Whether a row runs in a scenario (``corrected``: its target uses corrected labels)."""
    if row.corrected_only and not corrected:
        return False
    return not (row.removal_only and corrected)


# --------------------------------------------------------------------------------------------------------- running
def epoch_seconds(run_dir: Path) -> float:
    """One epoch of training the run's model from scratch on its data (its own optimizer's default), measured in this
    process without validation or logging: the unit of cost."""
    import lightning.pytorch as pl

    from lightning_unlearn.models.classifier import ClassifierModule

    training_run = TrainingRun.from_path(run_dir)
    hparams = training_run.state()["hyper_parameters"]
    model = ClassifierModule(**{k: v for k, v in hparams.items() if not str(k).startswith("_")})
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=training_run.datamodule())
    return time.perf_counter() - start


def reference_with_outputs(result: dict[str, Any], retrain_dir: Path, run_dir: Path) -> ReferenceMetrics:
    """The seed's reference metrics with the retrained model's outputs (per-sample distances of every row)."""
    datamodule = _fit_data(TrainingRun.from_path(run_dir))
    reference = ReferenceMetrics(result["reference"])
    reference.outputs = split_outputs(TrainingRun.from_path(retrain_dir).load_classifier().net, datamodule)
    return reference


def _summary(report: dict[str, Any], epoch: float, retrain: float | None) -> dict[str, Any]:
    seconds = report["cost"]["seconds"]
    method = report["method"]
    return {
        "after": report["after"],
        "comparison": report.get("comparison", {}),
        "target": report.get("target", {}),
        "seconds": seconds,
        "epochs": seconds / epoch,
        "x_retrain": None if not retrain else seconds / retrain,
        "selection": {k: report["selection"].get(k) for k in ("strategy", "layers", "num_selected", "chosen")},
        "method": {k: v for k, v in method.items() if isinstance(v, (int, float, str)) or v is None},
        "budget": method.get("budget"),
        "lr_search": report["method"].get("lr_search"),
    }


def run_requests(
    name: str,
    scenario: Scenario,
    seed: int,
    runs: Path,
    rows: list[str],
    overlays: tuple[str, ...] = (),
    redo: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One seed of one scenario: every requested row (resumable); the rows in ``redo`` are run again even where the
    cache holds them (after a change of the method they measure), and the training epoch their cost is stated in is
    measured again in the same process."""
    setting = replace(reproduce.SETTINGS[scenario.setting], evaluation=EVALUATION, sweep=False)
    folder = runs / scenario.setting / f"seed{seed}"
    cache_name = f"{CACHE[:-5]}_{name}.json" if scenario.target else CACHE
    base = reproduce.run_seed(scenario.setting, setting, seed, runs, [], overlays, cache_name=cache_name)
    cache = folder / cache_name
    result = json.loads(cache.read_text())
    run_dir, retrain_dir = folder / "poisoned" / "version_0", folder / "retrained" / "version_0"
    for key in redo:
        result["rows"].pop(key, None)
        result.get("empty", {}).pop(key, None)
    if redo:  # the epoch is measured again in this process, side by side with the rows run again
        result["epoch_seconds"] = None
    if result.get("epoch_seconds") is None:
        result["epoch_seconds"] = epoch_seconds(run_dir)
        atomic_write_text(cache, json.dumps(result, indent=1))
    epoch = result["epoch_seconds"]
    retrain = result.get("retrain_seconds") or base.get("retrain_seconds") or _retrain_seconds(folder)
    for row in result["rows"].values():  # rows measured before the retraining time was known here
        if retrain and row.get("x_retrain") is None and row.get("seconds") is not None:
            row["x_retrain"] = row["seconds"] / retrain
    reference = reference_with_outputs(result, retrain_dir, run_dir)
    options = EvaluationOptions(**result["options"])
    datamodule = TrainingRun.from_path(run_dir).datamodule()
    corrected = scenario.target in (None, "corrected") and datamodule.has_corrected_labels
    target_args = ("--model.forgetting_target", scenario.target) if scenario.target else ()
    for key in rows:
        if key in result["rows"] or key in result.get("empty", {}):
            continue
        print(f"== {name} seed {seed}: {key}", flush=True)
        if key in ORACLE_ROWS:
            result["rows"][key] = oracle_row(key, run_dir, result, reference, epoch, retrain, corrected, target_args,
                                             options)  # fmt: skip
        else:
            row = ROWS[key]
            if not applies(row, scenario, corrected):
                continue
            try:
                report = unlearn(
                    row.config, run_dir, *row.args, *target_args, reference=reference, before=result["before"],
                    evaluation=options, calibration=result.get("calibration"), force=True,
                )  # fmt: skip
            except EmptySelectionError as error:
                result.setdefault("empty", {})[key] = str(error)
                atomic_write_text(cache, json.dumps(result, indent=1))
                continue
            result["rows"][key] = _summary(report, epoch, retrain)
        atomic_write_text(cache, json.dumps(result, indent=1, default=float))
    return result


def _retrain_seconds(folder: Path) -> float | None:
    """The retraining time of the setting's models, from the scenario that trained them (a scenario with its own
    target, e.g. the backdoor without its labels, reuses the models and their cache's timings)."""
    main = folder / CACHE
    return json.loads(main.read_text()).get("retrain_seconds") if main.is_file() else None


def _tow(before: dict[str, float], after: dict[str, float], reference: dict[str, float]) -> float:
    return compare(before, after, reference)["tow"]


def oracle_row(
    key: str,
    run_dir: Path,
    result: dict[str, Any],
    reference: ReferenceMetrics,
    epoch: float,
    retrain: float | None,
    corrected: bool,
    target_args: tuple[str, ...],
    options: EvaluationOptions,
) -> dict[str, Any]:
    """An oracle-tuned row: hyper-parameters chosen by the retrained model's ToW."""
    from step_search import evaluate_splits

    before = result["before"]
    if key in ("oracle_finetune", "oracle_neggrad_plus"):
        config = "finetune_all" if key == "oracle_finetune" else "neggrad_plus_all"
        best, seconds = None, 0.0
        for lr in ORACLE_LRS:
            sgd = ("--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", str(lr),
                   "--model.optimizer.momentum", "0.9")  # fmt: skip
            report = unlearn(config, run_dir, *sgd, *target_args, reference=reference, before=before,
                             evaluation=options, force=True)  # fmt: skip
            seconds += report["cost"]["seconds"]
            candidate = _summary(report, epoch, retrain) | {"lr": lr}
            if best is None or candidate["comparison"]["tow"] > best["comparison"]["tow"]:
                best = candidate
        return best | {"grid_seconds": seconds, "grid_epochs": seconds / epoch}
    # one-step: every applicable direction × the step grid, refined around the best step, scored by ToW
    selection = LastLayer() if key == "oracle_one_step_last" else AllLayers()
    target = next((a for a in target_args[1:]), None)
    # the module only prepares the selection and the data here (nothing runs its method): the removal method needs no
    # corrected labels, so every scenario prepares the same way
    module = UnlearnModule(str(run_dir), FirstOrderRemoval(criterion="fixed", steps=[1.0]), selection, evaluate=False,
                           forgetting_target=target)  # fmt: skip
    module.prepare()
    dm = module.datamodule
    directions = TARGET_DIRECTIONS[module.forgetting_target.target]
    params = dict(module.named_parameters())
    names = [n for n in module.mask.trainable]
    chosen = [params[n] for n in names]
    original = [p.detach().clone() for p in chosen]
    start = time.perf_counter()
    sums = {d: [torch.zeros_like(p) for p in chosen] for d in directions}
    module.net.eval()
    for x, y, y_true, _ in dm.forget_pairs_dataloader(batch_size=1000):
        grads = forget_gradients(module.net, x, y, y_true, directions, chosen, torch.ones(len(y)))
        for d in directions:
            for total, g in zip(sums[d], grads[d], strict=True):
                total += g
    scores: dict[tuple[str, float], float] = {}

    @torch.no_grad()
    def score(direction: str, step: float) -> float:
        if (direction, step) not in scores:
            for p, p0, g in zip(chosen, original, sums[direction], strict=True):
                p.copy_(p0 - step * g)
            scores[(direction, step)] = _tow(before, evaluate_splits(module.net, dm), reference)
        return scores[(direction, step)]

    for direction in directions:
        for step in ORACLE_STEPS:
            score(direction, step)
        grid = sorted(s for d, s in scores if d == direction)
        top = max(grid, key=lambda s: scores[(direction, s)])
        i = grid.index(top)
        low, high = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        for k in range(1, 16):
            score(direction, low * (high / low) ** (k / 16))
    (direction, step), tow = max(scores.items(), key=lambda item: (item[1], -item[0][1]))
    with torch.no_grad():
        for p, p0, g in zip(chosen, original, sums[direction], strict=True):
            p.copy_(p0 - step * g)
    after = evaluate_splits(module.net, dm)
    seconds = time.perf_counter() - start
    return {
        "after": after,
        "comparison": compare(before, after, reference),
        "seconds": None,  # the oracle's grid is not a request's cost
        "grid_seconds": seconds,
        "grid_epochs": seconds / epoch,
        "direction": direction,
        "step": step,
        "evaluations": len(scores),
    }


# ---------------------------------------------------------------------------------------------------------- KLoM
def klom_seed(name: str, scenario: Scenario, seed: int, runs: Path) -> dict[str, Any]:
    """One training seed of the KLoM ensembles (poison seed 0): the retrained, the Auto-unlearned and the poisoned
    model's margins on the forget, validation and test splits of the poisoned run (cached)."""
    setting = reproduce.SETTINGS[scenario.setting]
    folder = runs / "klom" / name / f"seed{seed}"
    cache = folder / "margins.pt"
    if cache.is_file():
        out = torch.load(cache, weights_only=True)
        if "poisoned/forget" not in out:  # a cache from before the poisoned side was recorded
            poisoned = TrainingRun.from_path(folder / "poisoned" / "version_0")
            out |= _margins("poisoned", poisoned.load_classifier().net, _fit_data(poisoned))
            atomic_write(cache, lambda handle: torch.save(out, handle))
        return out
    seeds = ("--seed_everything", str(seed), "--data.poison.seed", "0")
    run_dir, _ = train(list(setting.configs), folder, *setting.overrides, *seeds, name="poisoned", resume=True)
    retrain_dir, _ = train([*setting.configs, "retrain.yaml"], folder, *setting.overrides, *seeds, name="retrained",
                           resume=True)  # fmt: skip
    target_args = ("--model.forgetting_target", scenario.target) if scenario.target else ()
    report = unlearn("auto", run_dir, *target_args, evaluation=EvaluationOptions(mia=False, relearn=False), force=True)
    datamodule = _fit_data(TrainingRun.from_path(run_dir))
    out = {}
    for label, run in (("unlearned", Path(report["output_dir"]) / "unlearned.ckpt"), ("retrained", retrain_dir),
                       ("poisoned", run_dir)):  # fmt: skip
        out |= _margins(label, TrainingRun.from_path(run).load_classifier().net, datamodule)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda handle: torch.save(out, handle))
    return out


def _fit_data(run: TrainingRun) -> Any:
    """The run's data module, set up for fitting (its forget, validation and test splits)."""
    datamodule = run.datamodule()
    datamodule.setup("fit")
    return datamodule


def _margins(label: str, net: torch.nn.Module, datamodule: Any) -> dict[str, torch.Tensor]:
    """``net``'s margins on the forget, validation and test splits, keyed ``<label>/<split>``."""
    outputs = split_outputs(net, datamodule)
    return {f"{label}/{split}": margins(logits, labels).float() for split, (logits, labels) in outputs.items()}


def _kl_normal(u: torch.Tensor, r: torch.Tensor, floor: float) -> dict[str, float]:
    """Mean and quantiles over samples of ``KL(N(u) ‖ N(r))``, each side a normal fit of one sample's margins over
    an ensemble (rows: models; standard deviations floored at ``floor``)."""
    mu_u, mu_r = u.mean(0), r.mean(0)
    sd_u, sd_r = u.std(0).clamp_min(floor), r.std(0).clamp_min(floor)
    kl = torch.log(sd_r / sd_u) + (sd_u**2 + (mu_u - mu_r) ** 2) / (2 * sd_r**2) - 0.5
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"mean": float(kl.mean()), "median": float(q[0]), "q90": float(q[1]), "q99": float(q[2]),
            "samples": int(kl.numel()), "models_per_side": len(u)}  # fmt: skip


def klom(per_seed: list[dict[str, torch.Tensor]], floor: float = 1e-3) -> dict[str, dict[str, Any]]:
    """Per split: KLoM of the unlearned ensemble (``KL(N_unlearned ‖ N_retrained)`` of each sample's margins), and
    beside it the same for the poisoned ensemble (before unlearning) and, as the noise floor, for one half of the
    retrained ensemble against the other (same number of models on both sides)."""
    out: dict[str, dict[str, Any]] = {}
    half = len(per_seed) // 2
    for split in ("forget", "val", "test"):
        side = {k: torch.stack([s[f"{k}/{split}"] for s in per_seed]).double() for k in ("unlearned", "retrained")}
        out[split] = _kl_normal(side["unlearned"], side["retrained"], floor)
        if all(f"poisoned/{split}" in s for s in per_seed):
            poisoned = torch.stack([s[f"poisoned/{split}"] for s in per_seed]).double()
            out[split]["poisoned"] = _kl_normal(poisoned, side["retrained"], floor)
        if half >= 2:
            out[split]["retrained_halves"] = _kl_normal(side["retrained"][:half], side["retrained"][half:], floor)
    return out


# ---------------------------------------------------------------------------------------------------------- tables
def _mean_std(values: list[float | None], digits: int) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def cost_figure(per_scenario: dict[str, dict[str, Any]]) -> Any:
    """ToW against cost (training-epoch equivalents, log scale) of every row with a measured cost, one panel per
    scenario, one dot per seed; ``Auto`` in red, the oracle-tuned rows hollow (their cost is the chosen run's only)."""
    from lightning_unlearn.evaluation.figures import pyplot

    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    names = list(per_scenario)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for seed in sorted(per_scenario[name], key=int):
            for key, row in per_scenario[name][seed]["rows"].items():
                tow, epochs = (row.get("comparison") or {}).get("tow"), row.get("epochs")
                if tow is None or not epochs:
                    continue
                oracle = key in ORACLE_ROWS
                color = "tab:red" if key == "auto" else "tab:blue"
                ax.scatter(epochs, tow, s=36 if key == "auto" else 22, facecolors="none" if oracle else color,
                           edgecolors=color, zorder=3 if key == "auto" else 2)  # fmt: skip
                ax.annotate(key.replace("oracle_", "oracle "), (epochs, tow), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlim(0.1, 20)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.05, 1.05)
        target = SCENARIOS[name].target
        title = SCENARIOS[name].label.split(":")[0] + (f", target {target}" if target else "")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("cost (training-epoch equivalents)", fontsize=7)
        ax.set_ylabel("ToW against the retrained model", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def table(name: str, results: dict[str, Any]) -> str:
    scenario = SCENARIOS[name]
    seeds = sorted(results, key=int)
    kind = results[seeds[0]].get("kind", "untargeted")
    key = ATTACKED_METRICS.get(kind, ("test/acc", -1, "test accuracy"))[0]
    lines = [f"### {scenario.label}", "", f"Seeds: {', '.join(seeds)} (n = {len(seeds)}); mean ± std over seeds.",
             f"Regenerate: `python benchmarks/auto.py {name} --seeds {' '.join(seeds)}`.", ""]  # fmt: skip
    lines.append(reproduce.effect_summary({s: results[s] for s in seeds}))
    lines.append("")
    rows = []

    def metrics(label: str, per: list[dict[str, Any]]) -> dict[str, Any]:
        comparison = [p.get("comparison", {}) for p in per]
        after = [p.get("after", {}) for p in per]
        return {
            "row": label,
            key.split("/")[-1] + " %": _mean_std([a.get(key) for a in after], 2),
            "test %": _mean_std([a.get("test/acc") for a in after], 2),
            "ToW": _mean_std([c.get("tow") for c in comparison], 4),
            "KL forget": _mean_std([c.get("distance/forget/kl") for c in comparison], 3),
            "KL test": _mean_std([c.get("distance/test/kl") for c in comparison], 4),
            "margin gap test": _mean_std([c.get("distance/test/margin_gap") for c in comparison], 3),
            "MIA-SVC %": _mean_std([a.get("mia/svc") for a in after], 2),
            "epochs": _mean_std([p.get("epochs") for p in per], 3),
            "× retrain": _mean_std([p.get("x_retrain") for p in per], 4),
        }

    before = [
        {"after": r["before"], "comparison": compare(r["before"], r["before"], r["reference"])}
        for r in (results[s] for s in seeds)
    ]
    reference = [{"after": results[s]["reference"], "comparison": {"tow": 1.0}} for s in seeds]
    rows.append(metrics("poisoned / trained model (before)", before))
    rows.append(metrics("retrained (reference)", reference))
    for row_key in [*ROWS, *ORACLE_ROWS]:
        per = [results[s]["rows"][row_key] for s in seeds if row_key in results[s].get("rows", {})]
        if per:
            label = ROWS[row_key].label if row_key in ROWS else ORACLE_ROWS[row_key]
            rows.append(metrics(f"{label} ({len(per)})" if len(per) < len(seeds) else label, per))
    lines.append(format_table(rows))
    epochs = [results[s].get("epoch_seconds") for s in seeds]
    lines += ["", f"One training epoch measured in the same process: {_mean_std(epochs, 2)} s. Oracle rows' grids are "
              "not request costs (they read the retrained model)."]  # fmt: skip
    return "\n".join(lines)


def load(name: str, folder: Path) -> dict[str, Any]:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", help=f"'klom', a group ('mnist', 'resnet') or scenarios: {list(SCENARIOS)}"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0–4)")
    parser.add_argument("--rows", nargs="+", default=None, help=f"rows to run (default all): {DEFAULT_ROWS}")
    parser.add_argument(
        "--redo", nargs="+", default=[], help="rows to run again although their results are cached (after a change)"
    )
    parser.add_argument("--runs", default="runs/reproduce", help="folder of the trained models (the reproduction's)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the results files and tables")
    parser.add_argument("--tables", action="store_true", help="only rebuild the tables from the results files")
    parser.add_argument(
        "--overlay", nargs="+", default=[], help="extra training configs (debug.yaml for a quick check; then pass "
        "--runs and --results elsewhere, so that the committed results stay untouched)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    items = list(args.scenarios)
    if items[:1] == ["klom"]:
        for name in items[1:]:
            per_seed = [klom_seed(name, SCENARIOS[name], seed, Path(args.runs)) for seed in args.seeds]
            results = load("klom", folder)
            results[name] = klom(per_seed) | {"seeds": args.seeds}
            atomic_write_text(folder / "klom.json", json.dumps(results, indent=1))
            print(json.dumps(results[name], indent=1), flush=True)
        return
    names = []
    for item in items:
        group = [n for n, s in SCENARIOS.items() if s.group == item]
        if not group and item not in SCENARIOS:
            parser.error(f"unknown scenario {item!r}; choose from {list(SCENARIOS)}, 'mnist', 'resnet' or 'klom'")
        names += group or [item]
    rows = args.rows or DEFAULT_ROWS
    unknown = [r for r in [*rows, *args.redo] if r not in DEFAULT_ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; choose from {DEFAULT_ROWS}")
    if not args.tables:
        for seed in args.seeds:
            for name in names:
                result = run_requests(
                    name, SCENARIOS[name], seed, Path(args.runs), rows, tuple(args.overlay), tuple(args.redo)
                )
                results = load(name, folder)
                results[str(seed)] = copy.deepcopy(result)
                atomic_write_text(folder / f"{name}.json", json.dumps(results, indent=1, default=float))
                print(f"== {name} seed {seed} done", flush=True)
    tables = [table(name, load(name, folder)) for name in SCENARIOS if load(name, folder)]
    atomic_write_text(folder / "summary.md", "\n\n".join(tables) + "\n")
    if folder == RESULTS:  # the committed results: docs/results.md shows them (between its markers)
        reproduce.update_docs("\n\n".join(f"#{t}" for t in tables), markers=DOC_MARKERS)  # headings one level down
        figure = cost_figure({name: load(name, folder) for name in SCENARIOS if load(name, folder)})
        atomic_write(FIGURE, lambda handle: figure.savefig(handle, format="png", dpi=110, metadata={"Software": None}))
        print(f"figure: {FIGURE}")
    print(f"tables: {folder / 'summary.md'}")


if __name__ == "__main__":
    main()
