"""Plain-text tables of results: a training run's accuracies and an unlearning report (what the commands print)."""

from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None, floatfmt: str = ".2f") -> str:
    """A plain-text (GitHub markdown) table of ``rows``; missing cells are blank."""
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return format(value, floatfmt)
        return "" if value is None else str(value)

    grid = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in grid)) if grid else len(col) for i, col in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, grid)])


def accuracy_rows(metrics: dict[str, float], splits: list[str]) -> list[dict[str, Any]]:
    """Rows ``split | overall | attacked class | other classes`` from the logged ``<split>/acc*`` metrics."""
    rows = []
    for split in splits:
        if split == "triggered":  # the backdoor's triggered test images: their accuracy is the attack success rate
            rows.append({"split": "triggered test (ASR)", "acc %": metrics.get("test/asr")})
            continue
        row = {"split": split, "acc %": metrics.get(f"{split}/acc")}
        if f"{split}/acc_attacked" in metrics:
            row["attacked class %"] = metrics[f"{split}/acc_attacked"]
            row["other classes %"] = metrics.get(f"{split}/acc_other")
        rows.append(row)
    return rows


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``metric | before | after | retrained | % restored`` of an unlearning report (accuracies and attack
    scores in %, AUCs in [0, 1])."""
    rows = []
    for key, before in report["before"].items():
        if "@" in key:  # a point of the relearning attack's recovery curve (summarised by relearn/auc)
            continue
        row = {"metric": key, "before": before, "after": report["after"].get(key)}
        if "reference" in report:
            row["retrained"] = report["reference"].get(key)
            row["% restored"] = report.get("restored", {}).get(key.replace("/", "_restored/", 1))
        rows.append(row)
    return rows


def print_report(report: dict[str, Any]) -> None:
    method, selection = report["method"], report["selection"]
    effect = report.get("poison_effect")
    if effect is not None:
        print(f"\nWhat there is to unlearn: {effect['statement']}")
    print(
        f"\nUnlearning with {method['method']} on {selection['strategy']} "
        f"({selection['num_selected']:,} parameters: {', '.join(selection['layers']) or 'element-wise'}):"
    )
    print(format_table(report_rows(report)))
    comparison = {k: v for k, v in report.get("comparison", {}).items() if "_restored/" not in k and v is not None}
    if comparison:
        print("vs retrained: " + ", ".join(f"{k}={v:.4f}" for k, v in comparison.items()))
    chosen = {k: v for k, v in method.items() if k in ("step", "damping_relative", "epochs", "solver", "evaluations")}
    timings = {k: v for k, v in method.items() if k.startswith("seconds")}
    print(f"chosen: {chosen}  timings (s): " + ", ".join(f"{k}={v:.3f}" for k, v in timings.items()))
    print(f"report: {report.get('output_dir')}/report.json")
