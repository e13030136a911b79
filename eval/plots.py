"""Accuracy plots: MDQA against the gold document's position (the paper's key figure), FLenQA against the
input length, synthetic retrieval against the gold dictionary's position; one line per model.

Runs that share a label (the seeds of one setting) are one line: the mean at each point, with error bars of
their standard deviation. A label whose runs scored only the first examples (`--limit`) says so in the legend.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path

import matplotlib

from eval.metrics import mean_sd

matplotlib.use("Agg")  # headless: TPU VMs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def _figure(runs: list[dict], task: str):
    """A fresh figure for results of one task; refuses an empty list or another task's results."""
    if not runs:
        raise ValueError(f"no {task} results to plot")
    for run in runs:
        if run.get("task") != task:
            raise ValueError(f"{run.get('label')!r} is a {run.get('task')!r} result, not {task}")
    return plt.subplots(figsize=(6.4, 4.2), dpi=120)


def groups(runs: list[dict], key: Callable[[dict], Hashable] = lambda r: r["label"]) -> list[list[dict]]:
    """The runs grouped by `key` (default: the label), in order of first appearance."""
    out: dict[Hashable, list[dict]] = {}
    for run in runs:
        out.setdefault(key(run), []).append(run)
    return list(out.values())


def limit_note(group: list[dict]) -> str | None:
    """"limit N" when the group's runs scored only their first N examples (--limit), else None."""
    limits = sorted({r.get("settings", {}).get("limit") for r in group} - {None})
    return "limit " + "/".join(map(str, limits)) if limits else None


def legend_label(group: list[dict], suffix: str = "") -> str:
    """The group's label, with how many runs it averages and any --limit."""
    notes = [f"mean of {len(group)}"] if len(group) > 1 else []
    notes += [note] if (note := limit_note(group)) else []
    return group[0]["label"] + suffix + (f" ({', '.join(notes)})" if notes else "")


def _curve(ax, group: list[dict], xs: list[float], score: Callable[[dict, float], float | None], **style):
    """One group's line: at each x the mean score (in %) of the runs that have one, error bars their standard
    deviation when there are several."""
    points = [(x, mean_sd([100 * v for r in group if (v := score(r, x)) is not None])) for x in xs]
    points = [(x, m, sd) for x, (m, sd) in points if m is not None]
    yerr = [sd or 0.0 for _, _, sd in points] if len(group) > 1 else None
    ax.errorbar([x for x, _, _ in points], [m for _, m, _ in points], yerr=yerr, marker="o", capsize=3,
                clip_on=False, **style)


def _save(fig, ax, path, xticks, xlabel: str, title: str, xticklabels=None) -> Path:
    """Axis labels, grid, legend and the 0-100 % accuracy axis shared by the plots, then the PNG."""
    ax.set_xticks(sorted(xticks))
    if xticklabels is not None:
        ax.set_xticklabels([xticklabels[x] for x in sorted(xticks)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_mdqa(runs: list[dict], path: Path, *, title: str | None = None) -> Path:
    """Plot accuracy (%) vs 1-based gold position for each MDQA results dict (or group of runs with one label)
    in `runs` and save a PNG. The oracle accuracy (gold document alone), when present, is a dotted line in the
    group's colour (its mean; a band of one standard deviation for several runs)."""
    fig, ax = _figure(runs, "mdqa")
    positions = sorted({int(p) for run in runs for p in run["metrics"]["by_gold_position"]})
    for i, group in enumerate(groups(runs)):
        color = f"C{i % 10}"
        _curve(ax, group, positions, lambda r, p: r["metrics"]["by_gold_position"].get(str(p), {}).get(
            "best_subspan_em"), color=color, label=legend_label(group))
        oracle, sd = mean_sd([100 * r["metrics"]["oracle"]["best_subspan_em"] for r in group
                              if r["metrics"].get("oracle") is not None])
        if oracle is not None:
            ax.axhline(oracle, color=color, linestyle=":", linewidth=1, label=f"{group[0]['label']} (oracle)")
            if sd:
                ax.axhspan(oracle - sd, oracle + sd, color=color, alpha=0.1, linewidth=0)
    num_docs = runs[0]["settings"].get("num_documents")
    return _save(fig, ax, path, positions, "Position of the document with the answer",
                 title or f"Multi-document QA ({num_docs} documents)")


def plot_flenqa(runs: list[dict], path: Path, *, title: str | None = None) -> Path:
    """Plot FLenQA accuracy (%) vs context size (tokens of facts + padding) for each results dict (or group of
    runs with one label) in `runs` and save a PNG; chain-of-thought runs are dashed, as in the authors' notebook."""
    fig, ax = _figure(runs, "flenqa")
    sizes = sorted({int(k) for run in runs for k in run["metrics"]["by_ctx_size"]})
    for i, group in enumerate(groups(runs, key=lambda r: (r["label"], bool(r["settings"].get("cot"))))):
        cot = bool(group[0]["settings"].get("cot"))
        _curve(ax, group, sizes, lambda r, x: r["metrics"]["by_ctx_size"].get(str(x), {}).get("accuracy"),
               color=f"C{i % 10}", linestyle="--" if cot else "-", label=legend_label(group, " (CoT)" if cot else ""))
    return _save(fig, ax, path, sizes, "Input length (tokens)", title or "FLenQA")


def _bin_middle(label: str) -> float:
    lo, hi = (int(part) for part in label.split("-"))
    return (lo + hi) / 2


def plot_synthetic(runs: list[dict], path: Path, *, metric: str = "value_em", title: str | None = None) -> Path:
    """Plot synthetic retrieval accuracy (%, default: the value exact match) vs the gold dictionary's position
    (the `--position-bins` ranges, drawn at their middles) for each results dict (or group of runs with one
    label) in `runs` and save a PNG: MDQA's plot for the synthetic task."""
    fig, ax = _figure(runs, "synthetic")
    labels = {_bin_middle(b): b for run in runs for b in run["metrics"]["by_gold_position"]}
    middles = sorted(labels)
    def score(run: dict, middle: float) -> float | None:
        return next((m.get(metric) for b, m in run["metrics"]["by_gold_position"].items()
                     if _bin_middle(b) == middle), None)

    for i, group in enumerate(groups(runs)):
        _curve(ax, group, middles, score, color=f"C{i % 10}", label=legend_label(group))
    return _save(fig, ax, path, middles, "Position of the dictionary with the key", title or
                 f"Synthetic key-value retrieval ({metric})", xticklabels=labels)
