"""What every task shares: the common command-line options and the run loop (data -> model -> score -> write).

A task is a module-level `Task` with two functions: `load(args) -> LoadedData` reads and validates the data
(before the model is loaded, so bad data fails in a second, not after minutes of loading 7B weights), and
`evaluate(args, data, generator) -> Evaluation` builds prompts, calls the `Generator` and scores.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval import results as results_io
from eval.datafiles import DataError
from eval.model_io import load_model
from jaxtrain.generate import Generator
from jaxtrain.lora import BaseDtype
from jaxtrain.sharding import MeshConfig, make_mesh, maybe_initialize_distributed


@dataclasses.dataclass(kw_only=True)
class CommonArgs:
    model: str
    """Hugging Face folder (Llama, Qwen2 or Mistral: config.json + safetensors), a `python -m jaxtrain train` run
    directory (full finetune or LoRA: the base is read from the path the run recorded and checked against its
    sha256), or a PEFT adapter folder (with --base)."""
    out: Path
    """Directory for results.json, predictions.jsonl (and the MDQA plot)."""
    data_file: Path | None = None
    """The task's standard data file itself (offline; see docs/eval.md for the formats)."""
    data_dir: Path | None = None
    """A directory holding the task's standard data files (offline)."""
    limit: int | None = None
    """Score only the first N examples (per gold position for MDQA, per subject for MMLU)."""
    batch_size: int = 8
    """Sequences per forward pass of the decoder."""
    dtype: str | None = None
    """Cast float weights on load, e.g. bfloat16, also a run's (default: the config's param_dtype; a run: as stored)."""
    step: int | None = None
    """For a training run given as --model: evaluate the checkpoint of this step (default: the newest intact one)."""
    base: Path | None = None
    """Base model (Hugging Face folder) of a PEFT adapter folder given as --model; for a LoRA run, where its
    base is now if it moved (it must hash to the sha256 the run recorded)."""
    base_dtype: BaseDtype | None = None
    """Base weights as int8 (weight-only, per-output-channel scales: a 7B base on one 16 GiB chip), bfloat16 or
    float32; replaces --dtype (default: a LoRA run's training dtype, else as --dtype)."""
    compute_dtype: str | None = None
    """Dtype of activations and matmuls, e.g. float32 for exact comparisons (default: the model's own:
    bfloat16 for Hugging Face folders, a run's training setting)."""
    merge_adapters: bool = False
    """Fold LoRA adapters into the base (W + alpha/r·A·B) before decoding instead of applying them unmerged
    (float bases only)."""
    shard: bool = False
    """Split the parameters over all devices as in training (--mesh.*), e.g. a 7B model on a v5e-8."""
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """Device mesh used with --shard."""
    tokenizer: str | None = None
    """The model's tokenizer and chat template: a folder, or mistral (default: the model folder's own, a
    PEFT adapter's base's, or the one a training run trained with)."""
    label: str | None = None
    """Name of this run in tables and plots (default: the model directory's name)."""
    tfds_data_dir: Path | None = None
    """tensorflow-datasets data_dir, used when neither --data-file nor --data-dir is given (default: TFDS's own)."""
    tfds_manual_dir: Path | None = None
    """For our tfds builders (mdqa, mmlu): directory with the standard files to prepare the dataset from."""
    tfds_download: bool = True
    """Let tfds download and prepare a dataset that is not prepared yet (needs internet for standard builders)."""
    progress: bool = True
    """Show progress bars."""


@dataclasses.dataclass
class LoadedData:
    examples: Any
    """Whatever the task's evaluate() consumes (already limited)."""
    sources: list[dict]
    """results.json "data" entries (file paths + sha256, or tfds names)."""
    num_examples: int
    info: dict | None = None
    """Anything else the task's evaluate() should record (e.g. how MDQA prompts were built)."""


@dataclasses.dataclass
class Evaluation:
    metrics: dict
    predictions: list[dict]
    settings: dict
    num_examples: int


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    args_type: type
    load: Callable[[Any], LoadedData]
    evaluate: Callable[[Any, LoadedData, Any], Evaluation]
    after_write: Callable[[dict, Path], None] | None = None
    """Extra outputs from the finished results (the MDQA plot)."""


def check_source_args(args: CommonArgs) -> None:
    if args.data_file is not None and args.data_dir is not None:
        raise DataError("give either --data-file or --data-dir, not both")
    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit must be >= 1, got {args.limit}")


def limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def run_task(task: Task, args: CommonArgs) -> dict:
    """Run one task end to end and write OUT/results.json and OUT/predictions.jsonl; returns the results."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = task.load(args)
    if data.num_examples == 0:
        raise DataError(f"{task.name}: no examples to evaluate (check --data-file/--data-dir/--limit)")

    maybe_initialize_distributed()  # every host of a pod runs the same command; JAX must know them all
    t0 = time.perf_counter()
    mesh = None
    if args.shard:
        try:
            mesh = make_mesh(args.mesh)
        except ValueError as e:
            raise DataError(f"--mesh: {e}") from None
    loaded = load_model(args.model, dtype=args.dtype, mesh=mesh, rules=args.mesh.rules, base=args.base,
                        base_dtype=args.base_dtype, merge_adapters=args.merge_adapters,
                        compute_dtype=args.compute_dtype, tokenizer=args.tokenizer, step=args.step)
    generator = Generator(loaded.config, loaded.params, tokenizer=loaded.tokenizer, batch_size=args.batch_size,
                          mesh=mesh, rules=args.mesh.rules, adapters=loaded.adapters)
    t1 = time.perf_counter()
    evaluation = task.evaluate(args, data, generator)
    t2 = time.perf_counter()

    model_path = Path(args.model).resolve()
    out = Path(args.out)
    results = {
        "schema_version": results_io.SCHEMA_VERSION,
        "task": task.name,
        "label": args.label or model_path.name,
        "model": {"path": str(model_path), "config": loaded.config.to_hf_dict(), **loaded.info},
        "data": data.sources,
        "settings": {"limit": args.limit, "batch_size": args.batch_size, "dtype": args.dtype,
                     "base_dtype": args.base_dtype, "merge_adapters": args.merge_adapters,
                     "compute_dtype": loaded.config.dtype,
                     "mesh": None if mesh is None else dict(mesh.shape), **evaluation.settings},
        "num_examples": evaluation.num_examples,
        "metrics": evaluation.metrics,
        "timing": {"started_at": started, "load_model_s": round(t1 - t0, 3), "eval_s": round(t2 - t1, 3),
                   "examples_per_s": round(evaluation.num_examples / max(t2 - t1, 1e-9), 3)},
        "environment": results_io.environment(),
        "predictions": results_io.PREDICTIONS_FILE,
    }
    import jax

    if jax.process_index() == 0:
        results_io.write_predictions(out, evaluation.predictions)
        results_io.write_results(out, results)
        if task.after_write is not None:
            task.after_write(results, out)
    return results
