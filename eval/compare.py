"""`python -m eval compare A/results.json B/results.json ...`: base vs. finetuned at a glance.

Prints one summary table for any mix of tasks (rows: task/metric: MDQA per gold position and document
count with oracle and closed book, FLenQA per context length, synthetic retrieval, MMLU, HellaSwag, GSM8K,
TriviaQA, NQ-Open; columns: models by label, plus B - A for two) and writes the overlaid MDQA and FLenQA
plots.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tyro

from eval import plots
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
    """Directory for mdqa_compare.png / flenqa_compare.png (written when MDQA / FLenQA results are given)."""


TASK_ORDER = ("mdqa", "flenqa", "synthetic", "mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open")
"""Row order of the summary: the paper's MDQA and FLenQA, synthetic retrieval, then Table 2's benchmarks."""


def task_key(results: dict) -> str:
    """The row group of a run (one token): MDQA by document count, FLenQA with/without chain of thought."""
    task, settings = results["task"], results.get("settings", {})
    if task == "mdqa" and isinstance(settings.get("num_documents"), int):
        return f"mdqa/{settings['num_documents']}"
    if task == "flenqa":
        return "flenqa/cot" if settings.get("cot") else "flenqa"
    return task


def _entry(m: dict, name: str) -> tuple[float, float | None]:
    return m[name], m.get(f"{name}_stderr")


NOT_PERCENT = {"flenqa": ("coverage",)}
"""Scalar metrics that are no fraction and stay out of the percent table (FLenQA's `coverage` counts facts;
`coverage_rate` is the same as a fraction)."""


def headline_metrics(results: dict) -> dict[str, tuple[float, float | None]]:
    """{metric: (value, stderr)} of the scalar metrics worth a row; MDQA adds one row per gold position
    (and oracle, closed book), FLenQA one row per context size."""
    metrics = results["metrics"]
    skip = NOT_PERCENT.get(results["task"], ())
    rows = {}
    for name, value in metrics.items():
        if (isinstance(value, int | float) and not name.endswith("_stderr") and not isinstance(value, bool)
                and name not in skip):
            rows[name] = (value, metrics.get(f"{name}_stderr"))
    if results["task"] == "mdqa":
        for pos, m in sorted(metrics["by_gold_position"].items(), key=lambda kv: int(kv[0])):
            rows[f"gold at {pos}"] = _entry(m, "best_subspan_em")
        for name, row in (("oracle", "oracle"), ("closedbook", "closed-book")):
            if name in metrics:
                rows[row] = _entry(metrics[name], "best_subspan_em")
    if results["task"] == "flenqa":
        for ctx, m in sorted(metrics.get("by_ctx_size", {}).items(), key=lambda kv: int(kv[0])):
            rows[f"{ctx} tokens"] = _entry(m, "accuracy")
    return rows


def _cell(entry: tuple[float, float | None] | None) -> str:
    if entry is None:
        return "-"
    value, stderr = entry
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def format_table(runs: list[dict], labels: list[str]) -> str:
    """One table for any mix of tasks: a column per label (a model), a row per task and metric, values in
    percent (± standard error), plus B - A when there are two columns. Runs sharing a label fill one
    column (e.g. every task evaluated on the base model); a label with two runs of the same task (and
    document count) gets a numbered column of its own."""
    columns: list[str] = []
    cells: dict[tuple[str, str, str], tuple[float, float | None]] = {}
    examples: dict[str, int] = {}
    keys: list[tuple[str, str]] = []
    for run, label in zip(runs, labels, strict=True):
        key, column, copy = task_key(run), label, 1
        while any(k[0] == column and k[1] == key for k in cells):
            copy += 1
            column = f"{label}#{copy}"
        if column not in columns:
            columns.append(column)
        for metric, entry in headline_metrics(run).items():
            cells[(column, key, metric)] = entry
            if (key, metric) not in keys:
                keys.append((key, metric))
        examples[column] = examples.get(column, 0) + run["num_examples"]

    def order(k: tuple[str, str]) -> tuple[int, int, str, tuple[int, int]]:
        base = k[0].split("/")[0]
        return (TASK_ORDER.index(base) if base in TASK_ORDER else len(TASK_ORDER), _doc_count(k[0]), k[0],
                _metric_rank(k[1]))

    keys = sorted(keys, key=order)  # stable: a task's plain metrics keep their order
    two = len(columns) == 2
    header = ["task", "metric (%)", *columns] + (["B - A"] if two else [])
    body = []
    for key, metric in keys:
        entries = [cells.get((c, key, metric)) for c in columns]
        row = [key, metric, *map(_cell, entries)]
        if two:
            row.append(f"{100 * (entries[1][0] - entries[0][0]):+.1f}" if None not in entries else "-")
        body.append(row)
    counts = ["", "examples", *(str(examples[c]) for c in columns)] + ([""] if two else [])
    table = [header, *body, counts]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _metric_rank(metric: str) -> tuple[int, int]:
    """Rows of one task: its plain metrics first, then the gold positions / context sizes in numeric order
    (whichever model has them), then oracle and closed book."""
    words = metric.split()
    if metric.startswith("gold at ") and words[-1].isdigit():
        return 1, int(words[-1])
    if len(words) == 2 and words[1] == "tokens" and words[0].isdigit():
        return 1, int(words[0])
    return {"oracle": (2, 0), "closed-book": (3, 0)}.get(metric, (0, 0))


def _doc_count(key: str) -> int:
    tail = key.split("/")[-1]
    return int(tail) if tail.isdigit() else 0


_GROUPS = {"mdqa": ("by_gold_position", "best_subspan_em"), "flenqa": ("by_ctx_size", "accuracy")}


def check_metrics(path: Path, results: dict) -> None:
    """The metrics the table and plots read, so that a hand-edited or foreign file is refused by name."""
    metrics, task = results["metrics"], results["task"]
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: 'metrics' must be an object")
    if task not in _GROUPS:
        return
    group, name = _GROUPS[task]
    entries = metrics.get(group)
    if not isinstance(entries, dict):
        raise DataError(f"{path}: {task} results without metrics.{group}")
    for key in entries:
        if not key.isdigit():
            raise DataError(f"{path}: metrics.{group}: {key!r} is not a number")
    checked = {f"{group}.{k}": v for k, v in entries.items()}
    if task == "mdqa":
        checked.update({k: metrics[k] for k in ("oracle", "closedbook") if k in metrics})
    for key, entry in checked.items():
        value = entry.get(name) if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(f"{path}: metrics.{key} has no number '{name}'")


def compare(args: CompareArgs) -> str:
    if not args.results:
        raise DataError("give at least one results.json")
    runs = [load_results(p) for p in args.results]
    for path, run in zip(args.results, runs, strict=True):
        check_metrics(path, run)
    if args.labels is not None:
        if len(args.labels) != len(runs):
            raise DataError(f"{len(args.labels)} --labels for {len(runs)} results files")
        runs = [{**r, "label": label} for r, label in zip(runs, args.labels, strict=True)]
    table = format_table(runs, [r["label"] for r in runs])
    print(table)
    for path in write_plots(runs, Path(args.out)):
        print(f"\nwrote {path}")
    return table


def write_plots(runs: list[dict], out: Path) -> list[Path]:
    """mdqa_compare.png (one per document count, mdqa_compare_<N>docs.png, when there are several) and
    flenqa_compare.png, overlaying every run of the task."""
    paths = []
    mdqa_groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["task"] == "mdqa":
            mdqa_groups.setdefault(task_key(r), []).append(r)
    for key, group in mdqa_groups.items():
        name = "mdqa_compare.png" if len(mdqa_groups) == 1 else f"mdqa_compare_{_doc_count(key)}docs.png"
        paths.append(plots.plot_mdqa(group, out / name))
    flenqa_runs = [r for r in runs if r["task"] == "flenqa"]
    if flenqa_runs:
        paths.append(plots.plot_flenqa(flenqa_runs, out / "flenqa_compare.png"))
    return paths
