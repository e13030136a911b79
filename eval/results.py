"""results.json: one self-describing record per evaluation run, the input of `python -m eval compare`.

Schema (version 1):
  schema_version  1
  task            "mdqa" | "synthetic" | "mmlu" | "hellaswag" | "gsm8k" | "triviaqa" | "nq_open"
  label           name used in tables and plots (default: the model directory's name)
  model           {"path": absolute path, "config": ModelConfig as HF config.json dict,
                   "kind": "hf_folder" | "run" | "lora_run" | "peft_adapters",
                   "base": {"path", "sha256" (LoRA runs, else null), "dtype": "int8" | float dtype, ["step"]},
                   "adapters": null | {"source", "rank", "alpha", "targets", "merged"}}
  data            list of sources: {"kind": "file", "path", "sha256"} or
                  {"kind": "tfds", "name", "split", "version", "data_dir"}
  settings        prompt and decoding settings (few-shot count, chat template, stop strings, limit, ...)
  num_examples    scored examples (for MDQA: questions x settings)
  metrics         task metrics; every mean `m` has `m_stderr`; MDQA adds "by_gold_position"
  timing          {"started_at", "load_model_s", "eval_s", "examples_per_s"}
  environment     {"jax", "backend", "devices", "device_kind"}
  predictions     file name of the per-example JSONL beside results.json
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from eval.datafiles import DataError, sha256_file

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "predictions.jsonl"
REQUIRED_KEYS = ("schema_version", "task", "label", "model", "data", "settings", "num_examples", "metrics", "timing")


def prompt_sha256(text: str) -> str:
    """A prediction row's `prompt_sha256`: the prompt text as the model got it, so two runs (or ours and
    lm-evaluation-harness's) can be matched prompt by prompt without storing ~3K-token prompts."""
    return hashlib.sha256(text.encode()).hexdigest()


def file_source(path: Path) -> dict:
    """A data file as recorded in results.json: absolute path and sha256 of its bytes."""
    path = Path(path).resolve()
    return {"kind": "file", "path": str(path), "sha256": sha256_file(path)}


def tfds_source(name: str, split: str, version: str, data_dir: str) -> dict:
    return {"kind": "tfds", "name": name, "split": split, "version": version, "data_dir": data_dir}


def environment() -> dict:
    import jax

    devices = jax.devices()
    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": len(devices),
            "device_kind": devices[0].device_kind}


def write_results(out_dir: Path, results: dict) -> Path:
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise ValueError(f"results for task {results.get('task')!r} lack {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def write_predictions(out_dir: Path, rows: Iterable[dict]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PREDICTIONS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_results(path: Path) -> dict:
    """A results.json (or a directory holding one), checked against the schema."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(results, dict):
        raise DataError(f"{path}: not a results.json (expected a JSON object)")
    missing = [k for k in REQUIRED_KEYS if k not in results]
    if missing:
        raise DataError(f"{path}: not a results.json written by `python -m eval` (missing {missing})")
    if results["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version {results['schema_version']} is not supported "
                        f"(expected {SCHEMA_VERSION})")
    count = results["num_examples"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise DataError(f"{path}: num_examples must be a whole number, got {count!r}")
    return results
