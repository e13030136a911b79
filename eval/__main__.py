"""`python -m eval <task> --model HF_DIR_OR_RUN_DIR [--data-file F | --data-dir D] [--limit N] --out DIR`
(also a LoRA run or PEFT adapter folder: `--base HF_DIR`, `--base-dtype int8|bf16|float32`, `--merge-adapters`)
, `python -m eval compare A/results.json B/results.json ...` and `python -m eval mdqa-layout --source DIR --out DIR`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import tyro

from eval import flenqa, gsm8k, hellaswag, mdqa, mmlu, openqa, synthetic
from eval.common import Task, run_task
from eval.compare import CompareArgs, compare
from eval.datafiles import DataError
from eval.mdqa_layout import MdqaLayoutArgs, layout

TASKS: dict[str, Task] = {t.name: t for t in (mdqa.TASK, flenqa.TASK, synthetic.TASK, mmlu.TASK, hellaswag.TASK,
                                              gsm8k.TASK, openqa.TRIVIAQA_TASK, openqa.NQ_OPEN_TASK)}


def _scores(m: dict) -> str:
    """"name value" for each score of a group (its stderr and counts left out)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float) and not k.endswith("_stderr"))


SETTINGS = {"oracle": "oracle (the gold document alone)", "closedbook": "closed book (no documents)"}
"""MDQA's bounds beside the gold positions, as `summary` names them."""


def summary(results: dict) -> str:
    """What `python -m eval TASK` prints at the end: the scores overall, per gold position (MDQA's oracle and
    closed book too) or context size, and whether --limit cut the data."""
    limit = results.get("settings", {}).get("limit")
    lines = [f"{results['task']} ({results['label']}): {results['num_examples']} examples"
             + (f" (--limit {limit})" if limit else "") + f", {results['timing']['eval_s']:.1f} s"]
    metrics = results["metrics"]
    for name, value in metrics.items():
        if isinstance(value, float) and not name.endswith("_stderr"):
            stderr = metrics.get(f"{name}_stderr")
            lines.append(f"  {name}: {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    for pos, m in metrics.get("by_gold_position", {}).items():
        lines.append(f"  gold at {pos}: {_scores(m)} (n={m['n']})")
    for setting, name in SETTINGS.items():
        if isinstance(metrics.get(setting), dict):
            lines.append(f"  {name}: {_scores(metrics[setting])} (n={metrics[setting]['n']})")
    for ctx, m in metrics.get("by_ctx_size", {}).items():
        lines.append(f"  {ctx} tokens: accuracy {m['accuracy']:.4f}, refused {m['refusal_rate']:.4f} (n={m['n']})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict | str:
    """Parse the command line, run it, and return the results (or the comparison table) for tests."""
    subcommands = ({name: task.args_type for name, task in TASKS.items()}
                   | {"compare": CompareArgs, "mdqa-layout": MdqaLayoutArgs})
    args = tyro.extras.subcommand_cli_from_dict(
        subcommands, prog="python -m eval", args=argv,
        description="Evaluate a checkpoint (MDQA by gold position and document count, FLenQA, "
                    "synthetic retrieval, general benchmarks), compare results.json files, or lay out the "
                    "Lost in the Middle release for MDQA (mdqa-layout).")
    try:
        if isinstance(args, CompareArgs):
            return compare(args)
        if isinstance(args, MdqaLayoutArgs):
            report = "\n".join(layout(args))
            print(report)
            return report
        task = next(t for t in TASKS.values() if type(args) is t.args_type)
        results = run_task(task, args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(results))
    print(f"wrote {args.out}/results.json")
    return results


if __name__ == "__main__":
    main()
