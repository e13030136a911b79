"""`make demo` end to end at a toy size: every stage runs, the export reloads in `transformers` with our logits
(the demo's own check against transformers), a given base folder is finetuned, bad options are refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval import demo

ROOT = Path(__file__).resolve().parents[1]
TOY = ("--num-train", "24", "--num-eval", "6", "--steps", "2", "--lora-steps", "2", "--no-progress")


def run_demo(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "eval.demo", "--out", str(out), *TOY, *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers reload: MistralForCausalLM" in result.stdout
    return json.loads((out / "summary.json").read_text())


def test_demo_pipeline(tmp_path):
    summary = run_demo(tmp_path / "demo", "--warmup-steps", "2", "2", "2")
    assert list(summary["accuracy"]) == ["random init", "base model", "after finetuning"]
    assert all(a["n"] == 6 for a in summary["accuracy"].values())
    assert list(summary["lora"]["accuracy"]) == ["finetuned", "finetuned, int8", "+ LoRA", "+ LoRA, int8 base"]
    assert summary["lora"]["task"]["value_digits"] == [2, 2]
    assert 0 < summary["lora"]["int8_vs_float32"]["positions"]
    assert summary["hf_reload"]["ok"] and summary["hf_reload"]["same_argmax"]
    assert (tmp_path / "demo" / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_demo_finetunes_a_given_base(tmp_path):
    first = run_demo(tmp_path / "first", "--warmup-steps", "2", "2", "2", "--lora-steps", "0")
    second = run_demo(tmp_path / "second", "--base", str(tmp_path / "first" / "finetuned_hf"), "--lora-steps", "0")
    assert second["base"] == str(tmp_path / "first" / "finetuned_hf") and "pretrain" not in second["seconds"]
    assert second["accuracy"]["base model"] == first["accuracy"]["after finetuning"]


def test_bad_base_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither 'scratch' nor a Hugging Face folder"):
        demo.DemoConfig(base=str(tmp_path))
    with pytest.raises(ValueError, match="--warmup-steps needs 3 counts >= 1"):
        demo.DemoConfig(warmup_steps=(2, 0, 2))
