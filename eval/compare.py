"""`python -m eval compare A/results.json B/results.json ...`: base vs. finetuned at a glance.

Prints one table (rows: task/metric, columns: runs, plus B - A when there are two runs) and, when MDQA
results are among them, writes the overlaid accuracy-vs-position plot.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tyro

from eval.datafiles import DataError
from eval.results import load_results


@dataclasses.dataclass(kw_only=True)
class CompareArgs:
    """Compare results.json files of several runs."""

    results: tyro.conf.Positional[tuple[Path, ...]]
    """results.json files (or directories holding one)."""
    labels: tuple[str, ...] | None = None
    """Names for the runs, in order (default: each run's label)."""
    out: Path = Path(".")
    """Directory for mdqa_compare.png (written only when MDQA results are given)."""


def headline_metrics(results: dict) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} of the scalar metrics worth a row; MDQA adds one row per gold position."""
    metrics = results["metrics"]
    rows = {}
    for name, value in metrics.items():
        if isinstance(value, int | float) and not name.endswith("_stderr") and not isinstance(value, bool):
            rows[name] = (value, metrics.get(f"{name}_stderr"))
    if results["task"] == "mdqa":
        for pos, m in sorted(metrics["by_gold_position"].items(), key=lambda kv: int(kv[0])):
            rows[f"gold at {pos}"] = (m["best_subspan_em"], m.get("best_subspan_em_stderr"))
        if "oracle" in metrics:
            rows["oracle"] = (metrics["oracle"]["best_subspan_em"], metrics["oracle"].get("best_subspan_em_stderr"))
    return rows


def _cell(entry: tuple[float, float | None] | None) -> str:
    if entry is None:
        return "-"
    value, stderr = entry
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def format_table(runs: list[dict], labels: list[str]) -> str:
    """Values in percent (± standard error), one column per run."""
    per_run = [headline_metrics(r) for r in runs]
    keys: list[tuple[str, str]] = []
    for run, metrics in zip(runs, per_run, strict=True):
        keys += [(run["task"], m) for m in metrics if (run["task"], m) not in keys]
    header = ["task", "metric (%)", *labels] + (["B - A"] if len(runs) == 2 else [])
    body = []
    for task, metric in keys:
        entries = [m.get(metric) if r["task"] == task else None for r, m in zip(runs, per_run, strict=True)]
        row = [task, metric, *map(_cell, entries)]
        if len(runs) == 2:
            row.append(f"{100 * (entries[1][0] - entries[0][0]):+.1f}" if None not in entries else "-")
        body.append(row)
    counts = ["", "examples", *(str(r["num_examples"]) for r in runs)] + ([""] if len(runs) == 2 else [])
    table = [header, *body, counts]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare(args: CompareArgs) -> str:
    if not args.results:
        raise DataError("give at least one results.json")
    runs = [load_results(p) for p in args.results]
    if args.labels is not None:
        if len(args.labels) != len(runs):
            raise DataError(f"{len(args.labels)} --labels for {len(runs)} results files")
        runs = [{**r, "label": label} for r, label in zip(runs, args.labels, strict=True)]
    table = format_table(runs, [r["label"] for r in runs])
    print(table)
    mdqa_runs = [r for r in runs if r["task"] == "mdqa"]
    if mdqa_runs:
        from eval.plots import plot_mdqa

        path = plot_mdqa(mdqa_runs, Path(args.out) / "mdqa_compare.png")
        print(f"\nwrote {path}")
    return table
