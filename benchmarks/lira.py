"""Does the forget set still look like training data? Online LiRA against the poisoned, unlearned and retrained models.

The likelihood-ratio attack of Carlini et al. ("Membership Inference Attacks From First Principles", S&P 2022), online
form, with the statistics of :mod:`lightning_unlearn.evaluation.lira` (formulas and anchor files there):

1. A fixed **candidate pool** is drawn from the ``--before`` run's splits (seeded): its whole forget set (with the
   labels the model was trained with), as many held-out **non-members** from the test split (``--nonmembers``,
   default: as many as forget samples), and retain samples as filler up to ``--pool`` candidates.
2. ``--shadows`` N shadow models (N >= 2; the paper: >= 16 for online LiRA) each train on a random half of the pool,
   every candidate in exactly N/2 of them, with the ``--before`` run's own recipe read from its ``config.yaml``
   (architecture, optimizer, batch size; ``--epochs``, default its epochs), on clean data: the pool as it is, plain
   PyTorch, CPU or ``--device``. Each shadow's ``φ = log(p/(1−p))`` on the forget and non-member candidates is saved
   atomically in ``--work`` as it finishes: an interrupted run resumes where it stopped.
3. Every target model (``--before`` = the poisoned original, ``--after`` = unlearned checkpoints, ``--retrained`` =
   the reference) is scored on the forget set (members of the original) against the held-out non-members: the online
   attack (per-candidate IN/OUT Gaussians), its fixed-variance variant, and the global threshold on ``φ`` alone; ROC-AUC
   and TPR at 1 % FPR each. A model that forgot should look like ``retrained`` (AUC near 0.5 for random-sample
   forgetting; for a poison, whatever the retrained model gives its mislabelled samples). As a yardstick, each shadow
   in turn is also attacked with the others (its IN against its OUT candidates): the attack's power in this recipe.

Usage::

    python benchmarks/lira.py --before runs/reproduce/mnist_label_flip/seed0/poisoned/version_0 \\
        --retrained runs/reproduce/mnist_label_flip/seed0/retrained/version_0 \\
        --after first_order=runs/.../unlearn/firstorder_validated/version_0/unlearned.ckpt --shadows 16
    python benchmarks/lira.py --tables          # rebuild the table from the results file

Writes ``benchmarks/results/lira.json`` and ``.md``; a results file of another configuration (other runs, targets,
pool, shadows, epochs or seed) is refused unless ``--overwrite``. Cost: N trainings on ``--pool``/2 samples each
(MNIST CNN, 20,000-candidate pool, 5 epochs: a few minutes each on two CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_unlearn.evaluation.lira import balanced_keep, lira_scores, logit_confidence, roc_summary  # noqa: E402
from lightning_unlearn.models.registry import build_model  # noqa: E402
from lightning_unlearn.reporting import format_table  # noqa: E402
from lightning_unlearn.run import TrainingRun  # noqa: E402
from lightning_unlearn.utils import atomic_write, atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ATTACKS = {"online": False, "online_fixed_variance": True}
FPR = 0.01


def recipe(run: TrainingRun, epochs: int | None) -> dict[str, Any]:
    """The run's training recipe from its ``config.yaml``: network, optimizer, batch size, epochs."""
    path = run.directory / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"lira.py: `--before` {str(run.directory)!r} has no config.yaml: the shadows need its recipe.")
    config = yaml.safe_load(path.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    if model.get("lr_scheduler") or data.get("augment"):
        raise SystemExit("lira.py: the run uses a learning-rate scheduler or augmentation, which the shadows lack.")
    optimizer = model.get("optimizer") or {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}
    hparams = run.state()["hyper_parameters"]
    return {
        "architecture": model["architecture"],
        "arch_kwargs": model.get("arch_kwargs") or {},
        "num_classes": hparams.get("num_classes", 10),
        "in_channels": hparams.get("in_channels", 1),
        "image_size": hparams.get("image_size", 28),
        "optimizer": optimizer,
        "batch_size": data["batch_size"],
        "epochs": epochs if epochs is not None else config["trainer"]["max_epochs"],
    }


def _stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, *_ = next(iter(DataLoader(dataset, batch_size=max(len(dataset), 1))))
    return images, labels.long()


def candidate_pool(run: TrainingRun, size: int, nonmembers: int | None, seed: int) -> dict[str, Any]:
    """The pool: ``[forget | non-members (test) | retain filler]`` images and labels, with the sizes and the positions
    each part was drawn from (forget: the record's order; the others at random, seeded)."""
    dm = run.datamodule()
    dm.setup("fit")
    forget_set, retain_set = dm.forget_dataloader().dataset, dm.retain_dataloader().dataset
    test_set = dm.test_dataloader()[0].dataset
    n_forget = len(forget_set)
    n_out = min(n_forget if nonmembers is None else nonmembers, len(test_set))
    n_fill = size - n_forget - n_out
    if n_forget == 0 or n_out == 0 or n_fill < 0 or n_fill > len(retain_set):
        raise SystemExit(
            f"lira.py: `--pool` {size} must hold the {n_forget} forget samples and {n_out} non-members and at most "
            f"{len(retain_set)} retain samples besides (both sets non-empty)."
        )
    g = torch.Generator().manual_seed(seed)
    test_pos = torch.randperm(len(test_set), generator=g)[:n_out].sort().values
    fill_pos = torch.randperm(len(retain_set), generator=g)[:n_fill].sort().values
    parts = [
        _stack(forget_set),
        _stack(Subset(test_set, test_pos.tolist())),
        _stack(Subset(retain_set, fill_pos.tolist())),
    ]
    return {
        "images": torch.cat([p[0] for p in parts]),
        "labels": torch.cat([p[1] for p in parts]),
        "sizes": {"forget": n_forget, "nonmembers": n_out, "filler": n_fill},
        "test_positions": test_pos.tolist(),
        "filler_positions": fill_pos.tolist(),
    }


def phi_of(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str) -> torch.Tensor:
    """``φ`` of ``net`` on every image (eval mode, no gradients), float64 on the CPU."""
    net.eval().to(device)
    with torch.no_grad():
        logits = torch.cat([net(x.to(device)).cpu() for x in images.split(1000)])
    return logit_confidence(logits, labels)


def train_shadow(images: torch.Tensor, labels: torch.Tensor, rec: dict[str, Any], seed: int, device: str) -> Any:
    """One shadow network trained on ``images`` with the recipe (plain loop, seeded init and batch order)."""
    torch.manual_seed(seed)
    net = build_model(
        rec["architecture"], rec["num_classes"], rec["in_channels"], rec["image_size"], **rec["arch_kwargs"]
    )
    net.to(device).train()
    module, name = rec["optimizer"]["class_path"].rsplit(".", 1)
    optimizer = getattr(importlib.import_module(module), name)(net.parameters(), **rec["optimizer"]["init_args"])
    order = torch.Generator().manual_seed(seed)
    for _ in range(rec["epochs"]):
        for batch in torch.randperm(len(labels), generator=order).split(rec["batch_size"]):
            loss = F.cross_entropy(net(images[batch].to(device)), labels[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net


def shadow_scores(
    args: argparse.Namespace, pool: dict[str, Any], rec: dict[str, Any], fingerprint: str
) -> torch.Tensor:
    """``(N, candidates scored)`` φ of every shadow, trained here or read back from ``--work`` (same fingerprint)."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    keep = balanced_keep(args.shadows, len(pool["labels"]), args.seed)
    scored = pool["sizes"]["forget"] + pool["sizes"]["nonmembers"]
    rows = []
    for k in range(args.shadows):
        path = work / f"shadow_{k:03d}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved["fingerprint"] == fingerprint:
                rows.append(saved["phi"])
                continue
            if not args.overwrite:
                raise SystemExit(f"lira.py: {path} is another configuration's shadow; pass --overwrite to replace it.")
        start = time.perf_counter()
        chosen = keep[k]
        net = train_shadow(pool["images"][chosen], pool["labels"][chosen], rec, args.seed * 1000 + k, args.device)
        phi = phi_of(net, pool["images"][:scored], pool["labels"][:scored], args.device)
        record = {"fingerprint": fingerprint, "phi": phi, "seconds": time.perf_counter() - start}
        atomic_write(path, lambda handle, record=record: torch.save(record, handle))
        print(f"shadow {k + 1}/{args.shadows}: {record['seconds']:.1f} s", flush=True)
        rows.append(phi)
    return torch.stack(rows), keep[:, :scored]


def score_target(path: str, pool: dict[str, Any], phi: torch.Tensor, keep: torch.Tensor, device: str) -> dict:
    """Every attack's AUC and TPR at 1 % FPR for the model at ``path``: forget candidates vs non-members."""
    n_forget, n_out = pool["sizes"]["forget"], pool["sizes"]["nonmembers"]
    net = TrainingRun.from_path(path).load_classifier().net
    target = phi_of(net, pool["images"][: n_forget + n_out], pool["labels"][: n_forget + n_out], device)
    out: dict[str, Any] = {"path": str(path)}
    for attack, fixed in ATTACKS.items():
        score = lira_scores(phi, keep, target, fixed_variance=fixed)
        out[attack] = roc_summary(score[:n_forget], score[n_forget:], FPR)
    out["global_threshold"] = roc_summary(target[:n_forget], target[n_forget:], FPR)
    out["mean_phi"] = {"forget": target[:n_forget].mean().item(), "nonmembers": target[n_forget:].mean().item()}
    return out


def shadow_check(phi: torch.Tensor, keep: torch.Tensor) -> dict[str, Any] | None:
    """The attack's power in the shadows' own regime: each shadow in turn is the target, the others the shadows; its
    IN candidates against its OUT ones (forget and non-member candidates alike), averaged over the shadows. An AUC
    near 0.5 here means the recipe memorises single samples too little for any target's numbers to say much. None
    with fewer than 4 shadows (a candidate would lack an IN or OUT model among the others)."""
    if len(phi) < 4:
        return None
    out: dict[str, Any] = {}
    for attack, fixed in ATTACKS.items():
        runs = []
        for k in range(len(phi)):
            others = [j for j in range(len(phi)) if j != k]
            score = lira_scores(phi[others], keep[others], phi[k], fixed_variance=fixed)
            runs.append(roc_summary(score[keep[k]], score[~keep[k]], FPR))
        out[attack] = {key: sum(r[key] for r in runs) / len(runs) for key in ("auc", "tpr_at_fpr")}
    return out


def targets_of(args: argparse.Namespace) -> dict[str, str]:
    targets = {"before": args.before}
    for i, item in enumerate(args.after):
        name, _, path = item.partition("=") if "=" in item else (str(i), "", item)
        targets[f"after: {name}"] = path
    if args.retrained:
        targets["retrained"] = args.retrained
    return targets


def table(results: dict[str, Any]) -> str:
    config, sizes = results["config"], results["pool"]
    rows = [
        {"target": name, "attack": attack, "AUC": entry[attack]["auc"], "TPR @ 1 % FPR": entry[attack]["tpr_at_fpr"]}
        for name, entry in results["targets"].items()
        for attack in (*ATTACKS, "global_threshold")
    ]
    head = (
        f"Online LiRA, {config['shadows']} shadow models ({config['recipe']['architecture']}, "
        f"{config['recipe']['epochs']} epochs) on random halves of a {sum(sizes.values()):,}-candidate pool: "
        f"{sizes['forget']:,} forget samples "
        f"(members of `before`) vs {sizes['nonmembers']:,} held-out test samples; seed {config['seed']}. "
        f"`{results['command']}`"
    )
    check = results.get("shadow_check")
    if check:
        rows += [
            {"target": "shadows (leave-one-out)", "attack": attack, "AUC": v["auc"], "TPR @ 1 % FPR": v["tpr_at_fpr"]}
            for attack, v in check.items()
        ]
        head += (
            " Last rows: each shadow in turn as the target, its own IN vs OUT candidates (mean over shadows): what the"
            " attack can see in this recipe at all."
        )
    return head + "\n\n" + format_table(rows, floatfmt=".4f") + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the poisoned (original) training run or checkpoint: its splits make the pool")
    parser.add_argument("--after", nargs="*", default=[], help="unlearned checkpoints, each PATH or NAME=PATH")
    parser.add_argument("--retrained", help="the reference retrained without the forget set")
    parser.add_argument("--shadows", type=int, default=16, help="shadow models (default 16)")
    parser.add_argument("--epochs", type=int, default=None, help="shadow training epochs (default: the run's)")
    parser.add_argument(
        "--pool", type=int, default=20000, help="candidates; each shadow trains on half (default 20000)"
    )
    parser.add_argument("--nonmembers", type=int, default=None, help="held-out test candidates (default: |forget|)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pool, the halves and the shadows' training")
    parser.add_argument("--device", default="cpu", help="where the shadows train and score (cpu, cuda)")
    parser.add_argument("--work", default="runs/lira", help="folder of the per-shadow scores (resumable)")
    parser.add_argument("--out", default=str(RESULTS / "lira.json"))
    parser.add_argument("--overwrite", action="store_true", help="replace another configuration's results/shadows")
    parser.add_argument("--tables", action="store_true", help="only rebuild the table from the results file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.tables:
        if not out.is_file():
            parser.error(f"--tables: no results file {str(out)!r} (run the benchmark first, or pass --out)")
        results = json.loads(out.read_text())
    else:
        if not args.before:
            parser.error("--before is required (the poisoned run), unless --tables")
        if args.shadows < 2 or (args.epochs is not None and args.epochs < 1):
            parser.error(f"--shadows must be >= 2 and --epochs >= 1, got {args.shadows} and {args.epochs}")
        run = TrainingRun.from_path(args.before)
        rec = recipe(run, args.epochs)
        config = {
            "before": str(run.checkpoint.resolve()),
            "shadows": args.shadows,
            "pool": args.pool,
            "seed": args.seed,
        }
        config |= {"nonmembers": args.nonmembers, "recipe": rec}
        fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        targets = targets_of(args)
        missing = [f"{name}: {path}" for name, path in targets.items() if not Path(path).exists()]
        if missing:
            raise SystemExit(f"lira.py: no such target model ({'; '.join(missing)}); nothing was trained.")
        config["targets"] = {name: str(Path(path).resolve()) for name, path in targets.items()}
        if out.is_file() and not args.overwrite and json.loads(out.read_text()).get("config") != config:
            raise SystemExit(f"lira.py: {out} holds another configuration's results; pass --overwrite to replace them.")
        pool = candidate_pool(run, args.pool, args.nonmembers, args.seed)
        phi, keep = shadow_scores(args, pool, rec, fingerprint)
        results = {
            "config": config,
            "command": "python benchmarks/lira.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "pool": pool["sizes"],
            "targets": {name: score_target(path, pool, phi, keep, args.device) for name, path in targets.items()},
            "shadow_check": shadow_check(phi, keep),
        }
        atomic_write_text(out, json.dumps(results, indent=1))
    text = table(results)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    return results


if __name__ == "__main__":
    main()
