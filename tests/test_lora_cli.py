"""`python -m jaxtrain train --lora-rank ...` on an int8 base: exact resume, and both exports
(`--merged` loaded by `transformers`, `--peft` loaded by `peft`) computing what our LoRA model computes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import torch
import transformers

from data_gen.shards import TokenizedExample, write_shards
from data_gen.tokenizer import write_hf_tokenizer
from hf_reference import hf_model, tiny_config
from jaxtrain import model, runs
from jaxtrain.__main__ import main
from jaxtrain.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--global-batch", "8", "--epochs", "2", "--lr", "1e-2", "--warmup-ratio", "0", "--dtype", "float32",
         "--lora-rank", "4", "--lora-dropout", "0.1", "--lora-targets", "q", "v", "o", "down",
         "--base-dtype", "int8", "--checkpoint.save-every", "2", "--checkpoint.keep", "10",
         "--checkpoint.no-async-save", "--no-progress")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cli")
    config = tiny_config(vocab_size=32000)
    hf_model(config, seed=11).save_pretrained(root / "base")
    write_hf_tokenizer(root / "base")   # the tokenizer the shards below were made with: Mistral 7B's
    rng = np.random.default_rng(0)
    examples = []
    for i in range(24):
        n = int(rng.integers(20, 60))
        ids = rng.integers(3, 32000, size=n).astype(np.int32)
        mask = np.zeros(n, bool)
        mask[n - 6:] = True
        examples.append(TokenizedExample(id=f"ex{i}", input_ids=ids, loss_mask=mask))
    write_shards(examples, root / "shards", buckets=(64,))
    return root, config


def train(root, out, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "jaxtrain", "train", "--init-from", str(root / "base"), "--data",
           str(root / "shards"), "--out", str(out), *FLAGS, *extra]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]



def test_lora_train_resume_and_exports(setup, tmp_path):
    root, config = setup
    reference = tmp_path / "reference"
    train(root, reference)
    with Checkpointer(reference, read_only=True) as ckpt:
        assert ckpt.steps() == [2, 4, 6]
        step, _, metadata = ckpt.read_json()
        saved = ckpt.saved_params_shapes(step)
    assert metadata["lora"]["rank"] == 4 and metadata["base"]["dtype"] == "int8"
    assert len(metadata["base"]["sha256"]) == 64
    assert set(saved["layers"]["attn"]) == {"wq", "wv", "wo"}  # adapters only, never the base weights
    losses = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]

    # Resume from step 2 exactly: same adapters, optimizer state and data order as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    train(root, resumed, "--resume")
    for item in ("params", "opt_state"):
        a, b = (jax.tree.leaves(ocp.StandardCheckpointer().restore(r / "checkpoints" / "6" / item))
                for r in (reference, resumed))
        assert len(a) == len(b) > 0
        assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(a, b))

    # Exports: our model (fp32 base + the run's adapters) is what transformers and peft compute.
    assert main(["export", "--checkpoint", str(reference), "--out", str(tmp_path / "merged"), "--dtype", "float32",
                 "--merged"]) == 0
    assert main(["export", "--checkpoint", str(reference), "--out", str(tmp_path / "adapter"), "--peft"]) == 0
    run = runs.load_run(reference, weights="float32")
    run_config, base, adapters = run.config, run.params, run.adapters
    ids = np.random.default_rng(1).integers(3, 32000, size=(2, 10)).astype(np.int32)
    ours = np.asarray(model.forward(run_config, base, ids, adapters=adapters))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        merged_logits = merged.eval()(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        base_hf = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        peft_logits = peft.PeftModel.from_pretrained(base_hf, tmp_path / "adapter").eval()(
            torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(merged_logits - ours).max() <= 1e-4
    assert np.abs(peft_logits - ours).max() <= 1e-4
    assert main(["export", "--checkpoint", str(reference), "--out", str(tmp_path / "x"), "--peft", "--merged"]) == 1
