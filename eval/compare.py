"""`python -m eval compare A/results.json B/results.json ...`: base vs. finetuned at a glance.

Prints one summary table for any mix of tasks (rows: task/metric: MDQA per gold position and document
count with oracle and closed book, FLenQA per context length, synthetic retrieval, MMLU, HellaSwag, GSM8K,
TriviaQA, NQ-Open; columns: models by label, then each model minus the first) and writes the overlaid MDQA,
FLenQA and synthetic plots. Runs that share a label are repeats of one setting (the seeds of the paper's
grid): their column holds the mean and the standard deviation over them, and their plotted line the mean with
error bars.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import tyro

from eval import metrics as M
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
    out: Path | None = None
    """Directory for mdqa_compare.png / flenqa_compare.png / synthetic_compare.png (written when MDQA / FLenQA /
    synthetic results are given; default: compare/ beside the results folders, in the folder that holds them)."""


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


def _cell(entries: list[tuple[float, float | None]], runs: int) -> str:
    """One run: value ± its standard error; several (one label): mean ± standard deviation over them. `runs`
    is how many of the label's runs scored the task: a cell fewer of them filled says how many (`(n=1)`)."""
    if not entries:
        return "-"
    if len(entries) == 1:
        value, spread = entries[0]
    else:
        value, spread = M.mean_sd([v for v, _ in entries])
    return (f"{100 * value:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")
            + (f" (n={len(entries)})" if len(entries) < runs else ""))


def _mean(entries: list[tuple[float, float | None]]) -> float | None:
    return M.mean_sd([v for v, _ in entries])[0]


def format_table(runs: list[dict], labels: list[str]) -> str:
    """One table for any mix of tasks: a column per label (a model), a row per task and metric, values in
    percent, then for each label after the first its difference of means to the first (`ft - base`, in
    points). Runs sharing a label fill one column: its runs of a task are repeats (seeds), shown as mean ±
    standard deviation, a single run as value ± standard error; the header counts the repeats (`n=3`), a cell
    scored by fewer of them says so (`(n=1)`: one seed scored that gold position), and the header marks runs
    that scored only their first examples (`limit N`). The overall rows of MDQA and FLenQA pool the gold
    positions / context sizes a run scored (`POOLED`), so they get no difference where two labels' runs scored
    different ones (say, one model at all five positions, another at two): only the per-subset rows compare."""
    columns: list[str] = []
    cells: dict[tuple[str, str, str], list[tuple[float, float | None]]] = {}
    counts: dict[tuple[str, str], int] = {}
    examples: dict[str, int] = {}
    members: dict[str, list[dict]] = {}
    pooled: dict[tuple[str, str], set[tuple[str, ...]]] = {}
    keys: list[tuple[str, str]] = []
    for run, label in zip(runs, labels, strict=True):
        key = task_key(run)
        if label not in columns:
            columns.append(label)
        members.setdefault(label, []).append(run)
        counts[(label, key)] = counts.get((label, key), 0) + 1
        for metric, entry in headline_metrics(run).items():
            cells.setdefault((label, key, metric), []).append(entry)
            if (key, metric) not in keys:
                keys.append((key, metric))
        examples[label] = examples.get(label, 0) + run["num_examples"]
        if run["task"] in POOLED:
            subsets = run["metrics"][_GROUPS[run["task"]][0]]
            pooled.setdefault((label, key), set()).add(tuple(sorted(subsets, key=int)))

    def order(k: tuple[str, str]) -> tuple[int, int, str, tuple[int, int]]:
        base = k[0].split("/")[0]
        return (TASK_ORDER.index(base) if base in TASK_ORDER else len(TASK_ORDER), _doc_count(k[0]), k[0],
                _metric_rank(k[1]))

    def heading(label: str) -> str:
        repeats = sorted({n for (c, _), n in counts.items() if c == label})
        notes = [f"n={repeats[0]}" if len(repeats) == 1 else f"n={repeats[0]}-{repeats[-1]}"] if repeats[-1] > 1 else []
        notes += [note] if (note := plots.limit_note(members[label])) else []
        return label + (f" ({', '.join(notes)})" if notes else "")

    keys = sorted(keys, key=order)  # stable: a task's plain metrics keep their order
    first = columns[0]
    others = columns[1:]
    header = ["task", "metric (%)", *map(heading, columns), *(f"{c} - {first}" for c in others)]
    body = []
    unmatched = False
    for key, metric in keys:
        entries = [cells.get((c, key, metric), []) for c in columns]
        means = [_mean(e) for e in entries]
        diffs = []
        for c, m in zip(others, means[1:], strict=True):
            if m is None or means[0] is None:
                diffs.append("-")
            elif _metric_rank(metric) == (0, 0) and len(pooled.get((first, key), set())
                                                         | pooled.get((c, key), set())) > 1:
                diffs.append("-")  # pools different gold positions / context sizes: not comparable
                unmatched = True
            else:
                diffs.append(f"{100 * (m - means[0]):+.1f}")
        texts = [_cell(e, counts.get((c, key), 0)) for c, e in zip(columns, entries, strict=True)]
        body.append([key, metric, *texts, *diffs])
    totals = ["", "examples", *(str(examples[c]) for c in columns)] + [""] * len(others)
    table = [header, *body, totals]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(n > 1 for n in counts.values()):
        lines.append("± is the standard error over a run's examples, or for n runs of one label (n=...) the "
                     "standard deviation over them (n - 1 in the denominator); differences are of the means")
    if unmatched:
        lines.append("an overall MDQA / FLenQA metric pools the gold positions / context sizes a run scored: no "
                     "difference where the runs scored different ones (compare the `gold at` / `tokens` rows)")
    if any(plots.limit_note([r]) for r in runs):
        lines.append("limit N: that run scored only its first N examples (per gold position for MDQA, per "
                     "subject for MMLU): --limit")
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


POOLED = ("mdqa", "flenqa")
"""Tasks whose overall metrics pool subsets the user picks (MDQA's --positions, FLenQA's --ctx-sizes), unlike
synthetic retrieval, whose position ranges are the data's."""

_GROUPS = {"mdqa": ("by_gold_position", "best_subspan_em", "a number", str.isdigit),
           "flenqa": ("by_ctx_size", "accuracy", "a number", str.isdigit),
           "synthetic": ("by_gold_position", "value_em", "a range such as 1-4",
                         lambda k: re.fullmatch(r"\d+-\d+", k) is not None)}
"""What the plots read of each task: (group, score, what a group key is, the check of a key)."""


def check_metrics(path: Path, results: dict) -> None:
    """The metrics the table and plots read, so that a hand-edited or foreign file is refused by name."""
    metrics, task = results["metrics"], results["task"]
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: 'metrics' must be an object")
    if task not in _GROUPS:
        return
    group, name, what, valid = _GROUPS[task]
    entries = metrics.get(group)
    if not isinstance(entries, dict):
        raise DataError(f"{path}: {task} results without metrics.{group}")
    for key in entries:
        if not valid(key):
            raise DataError(f"{path}: metrics.{group}: {key!r} is not {what}")
    checked = {f"{group}.{k}": v for k, v in entries.items()}
    if task == "mdqa":
        checked.update({k: metrics[k] for k in ("oracle", "closedbook") if k in metrics})
    for key, entry in checked.items():
        value = entry.get(name) if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DataError(f"{path}: metrics.{key} has no number '{name}'")


def default_out(results: tuple[Path, ...]) -> Path:
    """compare/ beside the results folders: in the deepest folder that holds all of them (results/base/ and
    results/ft/ give results/compare/), never the current directory by accident."""
    folders = [Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent for p in results]
    return Path(os.path.commonpath([f.parent for f in folders])) / "compare"


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
    for path in write_plots(runs, args.out or default_out(args.results)):
        print(f"\nwrote {path}")
    return table


def write_plots(runs: list[dict], out: Path) -> list[Path]:
    """mdqa_compare.png (one per document count, mdqa_compare_<N>docs.png, when there are several),
    flenqa_compare.png and synthetic_compare.png, overlaying every model (label) of the task."""
    paths = []
    mdqa_groups: dict[str, list[dict]] = {}
    for r in runs:
        if r["task"] == "mdqa":
            mdqa_groups.setdefault(task_key(r), []).append(r)
    for key, group in mdqa_groups.items():
        name = "mdqa_compare.png" if len(mdqa_groups) == 1 else f"mdqa_compare_{_doc_count(key)}docs.png"
        paths.append(plots.plot_mdqa(group, out / name))
    for task, plot in (("flenqa", plots.plot_flenqa), ("synthetic", plots.plot_synthetic)):
        of_task = [r for r in runs if r["task"] == task]
        if of_task:
            paths.append(plot(of_task, out / f"{task}_compare.png"))
    return paths
