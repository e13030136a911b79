"""The paper's key figure: MDQA accuracy against the position of the gold document, one line per model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

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


def _save(fig, ax, path, xticks, xlabel: str, title: str) -> Path:
    """Axis labels, grid and legend shared by the accuracy plots, then the PNG."""
    ax.set_xticks(sorted(xticks))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Accuracy (%)")
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
    """Plot accuracy (%) vs 1-based gold position for each MDQA results dict in `runs` and save a PNG.

    A run's oracle accuracy (gold document alone), when present, is drawn as a dotted line in its colour.
    """
    fig, ax = _figure(runs, "mdqa")
    all_positions: set[int] = set()
    for i, run in enumerate(runs):
        by_pos = run["metrics"]["by_gold_position"]
        positions = sorted(int(p) for p in by_pos)
        all_positions.update(positions)
        acc = [100 * by_pos[str(p)]["best_subspan_em"] for p in positions]
        color = f"C{i % 10}"
        ax.plot(positions, acc, marker="o", color=color, label=run["label"])
        oracle = run["metrics"].get("oracle")
        if oracle is not None:
            ax.axhline(100 * oracle["best_subspan_em"], color=color, linestyle=":", linewidth=1,
                       label=f"{run['label']} (oracle)")
    num_docs = runs[0]["settings"].get("num_documents")
    ax.set_ylim(0, 100)
    return _save(fig, ax, path, all_positions, "Position of the document with the answer",
                 title or f"Multi-document QA ({num_docs} documents)")


def plot_flenqa(runs: list[dict], path: Path, *, title: str | None = None) -> Path:
    """Plot FLenQA accuracy (%) vs context size (tokens of facts + padding) for each results dict in
    `runs` and save a PNG; chain-of-thought runs are dashed, as in the authors' notebook."""
    fig, ax = _figure(runs, "flenqa")
    sizes: set[int] = set()
    for i, run in enumerate(runs):
        by_ctx = run["metrics"]["by_ctx_size"]
        xs = sorted(int(k) for k in by_ctx)
        sizes.update(xs)
        cot = run["settings"].get("cot", False)
        ax.plot(xs, [100 * by_ctx[str(x)]["accuracy"] for x in xs], marker="o", color=f"C{i % 10}",
                linestyle="--" if cot else "-", label=run["label"] + (" (CoT)" if cot else ""))
    return _save(fig, ax, path, sizes, "Input length (tokens)", title or "FLenQA")
