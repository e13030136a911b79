"""The real-model experiment's one command (tpu_scripts/recipes/paper_smollm2_cpu.sh) end to end on a handful of
examples: data with SmolLM2's tokenizer, the base evaluated on every task, a finetune, the export evaluated the
same way, and the comparison tables. The reference is the data itself: every task's results.json holds the rows
asked for, scored from the model's own outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from data_gen.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("mdqa", "synthetic", "hellaswag", "mmlu", "gsm8k", "triviaqa", "nq_open")


@pytest.mark.slow
def test_the_experiment_command_runs_end_to_end_on_a_handful_of_examples(smollm2_dir, shared_data, tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "WORK": str(work), "BASE_MODEL": str(smollm2_dir), "EVAL_DATA": str(shared_data),
           "MDQA_DATA": str(shared_data / "mdqa"), "PYTHON": sys.executable, "NUM_DICTS": "3", "NUM_TRAIN": "8",
           "NUM_EVAL": "2", "LIMIT": "1", "EPOCHS": "1", "GLOBAL_BATCH": "4", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}   # one CPU device, as a user's (conftest forces 8)
    result = subprocess.run(["bash", str(ROOT / "tpu_scripts/recipes/paper_smollm2_cpu.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=5400)
    assert result.returncode == 0, result.stderr[-3000:]
    run, tokenizers = "template-seed0", set()
    for label in ("base", run):
        for task in TASKS:
            key = f"synthetic-{run}" if task == "synthetic" else task
            results = json.loads((work / "results" / label / key / "results.json").read_text())
            assert results["task"] == task and results["num_examples"] >= 1
            tokenizers.add(results["model"]["tokenizer"]["sha256"])
    assert tokenizers == {get_tokenizer(smollm2_dir).identity().sha256}   # the export carries the model's own
    mdqa = json.loads((work / "results" / run / "mdqa" / "results.json").read_text())
    assert {"oracle", "closedbook"} <= set(mdqa["metrics"]) and len(mdqa["metrics"]["by_gold_position"]) == 5
    header = (work / "results" / "compare" / "mdqa" / "table.txt").read_text().splitlines()[0]
    assert "base (limit 1)" in header and "template (limit 1)" in header  # the run's column is its variant
    assert (work / "hf" / run / "chat_template.jinja").is_file()
    # the export keeps the base's float32 (safetensors' own header says so): no bf16 rounding between the two
    with safe_open(work / "hf" / run / "model.safetensors", "np") as exported, \
            safe_open(smollm2_dir / "model.safetensors", "np") as base:
        assert {exported.get_slice(k).get_dtype() for k in exported.keys()} == {"F32"}
        assert {base.get_slice(k).get_dtype() for k in base.keys()} == {"F32"}
