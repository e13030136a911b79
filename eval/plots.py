"""The paper's key figure: MDQA accuracy against the position of the gold document, one line per model."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: TPU VMs and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_mdqa(runs: list[dict], path: Path, *, title: str | None = None) -> Path:
    """Plot accuracy (%) vs 1-based gold position for each MDQA results dict in `runs` and save a PNG.

    A run's oracle accuracy (gold document alone), when present, is drawn as a dotted line in its colour.
    """
    if not runs:
        raise ValueError("no MDQA results to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    all_positions: set[int] = set()
    for i, run in enumerate(runs):
        if run.get("task") != "mdqa":
            raise ValueError(f"plot_mdqa: {run.get('label')!r} is a {run.get('task')!r} result, not mdqa")
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
    ax.set_xticks(sorted(all_positions))
    ax.set_xlabel("Position of the document with the answer")
    ax.set_ylabel("Accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or f"Multi-document QA ({num_docs} documents)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_flenqa(runs: list[dict], path: Path, *, title: str | None = None) -> Path:
    """Plot FLenQA accuracy (%) vs context size (tokens of facts + padding) for each results dict in
    `runs` and save a PNG; chain-of-thought runs are dashed, as in the authors' notebook."""
    if not runs:
        raise ValueError("no FLenQA results to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    sizes: set[int] = set()
    for i, run in enumerate(runs):
        if run.get("task") != "flenqa":
            raise ValueError(f"plot_flenqa: {run.get('label')!r} is a {run.get('task')!r} result, not flenqa")
        by_ctx = run["metrics"]["by_ctx_size"]
        xs = sorted(int(k) for k in by_ctx)
        sizes.update(xs)
        cot = run["settings"].get("cot", False)
        ax.plot(xs, [100 * by_ctx[str(x)]["accuracy"] for x in xs], marker="o", color=f"C{i % 10}",
                linestyle="--" if cot else "-", label=run["label"] + (" (CoT)" if cot else ""))
    ax.set_xticks(sorted(sizes))
    ax.set_xlabel("Input length (tokens)")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title(title or "FLenQA")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
