"""`make demo` end to end on the real SmolLM2-135M-Instruct at a toy size: every stage runs, the export reloads in
`transformers` with our logits and our greedy answer (the demo's own check against transformers), and a folder
that exists is refused before anything runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_every_stage_on_the_real_model(smollm2_dir, tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "eval.demo", "--out", str(out), "--model", str(smollm2_dir), "--steps", "2",
           "--num-train", "16", "--num-eval", "4", "--mdqa-questions", "1", "--no-progress"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["before"]["kv"]) == set(summary["after"]["kv"]) == {"value", "dict", "both"}
    assert sorted(summary["before"]["mdqa"]) == sorted(summary["after"]["mdqa"]) == ["1", "10"]
    reload = summary["reload"]
    assert reload["architecture"] == "LlamaForCausalLM" and reload["max_abs_logit_diff"] < 1e-3
    assert reload["our_answer"] == reload["their_answer"]
    assert "key-value retrieval, both" in result.stdout and "transformers reload: LlamaForCausalLM" in result.stdout


def test_an_existing_out_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exists"):
        demo.run(demo.DemoConfig(out=str(tmp_path)))
