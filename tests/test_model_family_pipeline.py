"""Random Llama-3.1, Qwen2 and Mistral-v0.3 folders, each with its own tokenizer and chat template, through the
whole pipeline on CPU: generate → shards → train (a few steps) → export → eval. The reference is transformers:
the export loads there, its chat template gives the ids we trained on, and its logits are ours."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from data_gen.tokenizer import get_tokenizer
from hf_reference import hf_model, tiny_config
from jaxtrain import model
from jaxtrain.config import RopeScaling
from jaxtrain.hf_io import load_pretrained
from test_data_hf_tokenizer import LLAMA3, QWEN2, Style, make_folder

ROOT = Path(__file__).resolve().parents[1]
# Mistral-7B-Instruct-v0.3's format: [INST] and [/INST] are control tokens of its tokenizer.
MISTRAL_V03 = Style(
    "mistral-v0.3",
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}",
    ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), eos="</s>", end_of_turn="</s>", bos="<s>")
FAMILIES = {
    "llama-3.1": (LLAMA3, dict(architecture="LlamaForCausalLM", rope_theta=5e5, rope_scaling=RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
    "qwen2": (QWEN2, dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6)),
    "mistral-v0.3": (MISTRAL_V03, dict(architecture="MistralForCausalLM", rope_theta=1e6)),
}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={"JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def model_folder(folder: Path, family: str) -> Path:
    """A random model of the family with its tokenizer in one folder (the tokenizer written last: its
    generation_config.json carries the stop ids, as in a real checkpoint)."""
    style, fields = FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(make_folder(folder.with_name(folder.name + "-tok"), style))
    config = tiny_config(vocab_size=-(-len(tokenizer) // 64) * 64, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **fields)
    hf_model(config, seed=3).save_pretrained(folder)
    return make_folder(folder, style)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_shards_train_export_eval_with_the_models_own_tokenizer(tmp_path, family):
    base = model_folder(tmp_path / "base", family)
    tokenizer = get_tokenizer(base)
    data, shards, runs, hf = (tmp_path / n for n in ("data", "shards", "run", "hf"))
    run("data_gen", "generate", "--preset", "demo-simple", "--template", "--num-train", "16", "--num-eval", "4",
        "--max-tokens", "512", "--tokenizer", str(base), "--out", str(data), "--no-progress")
    run("data_gen", "shards", "--input", str(data / "train.jsonl"), "--tokenizer", str(base), "--out", str(shards),
        "--no-progress")
    run("jaxtrain", "train", "--init-from", str(base), "--data", str(shards), "--out", str(runs), "--max-steps", "3",
        "--global-batch", "4", "--dtype", "float32", "--lr", "1e-3", "--no-progress")
    run("jaxtrain", "export", "--checkpoint", str(runs), "--out", str(hf), "--dtype", "float32")

    # The export is the same architecture with the same tokenizer and chat template, and transformers runs it.
    exported = json.loads((hf / "config.json").read_text())
    assert exported["architectures"] == json.loads((base / "config.json").read_text())["architectures"]
    theirs_tok = transformers.AutoTokenizer.from_pretrained(hf)
    record = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    chat = tokenizer.encode_chat(record["messages"])
    assert chat.input_ids.tolist() == theirs_tok.apply_chat_template(record["messages"], tokenize=True,
                                                                     return_dict=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    config, params = load_pretrained(hf, config_overrides=dict(dtype="float32", remat="none"))
    with torch.no_grad():
        expected = reference(torch.tensor([chat.input_ids])).logits[0].numpy()
    got = np.asarray(model.forward(config, params, np.asarray([chat.input_ids], np.int32))[0])
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    # eval reads the prompts with the model's own tokenizer, from the export and from the run itself.
    for target, out in ((hf, tmp_path / "res-hf"), (runs, tmp_path / "res-run")):
        run("eval", "synthetic", "--model", str(target), "--data-dir", str(data), "--out", str(out),
            "--max-new-tokens", "8", "--compute-dtype", "float32", "--no-progress")
        results = json.loads((out / "results.json").read_text())
        assert results["model"]["tokenizer"]["sha256"] == tokenizer.identity().sha256
        assert results["num_examples"] == 4


def test_shards_of_another_tokenizer_are_refused_in_one_line(tmp_path):
    base = model_folder(tmp_path / "base", "qwen2")
    data = tmp_path / "data"
    run("data_gen", "generate", "--preset", "demo-simple", "--num-train", "8", "--num-eval", "0", "--out", str(data),
        "--no-progress")
    run("data_gen", "shards", "--input", str(data / "train.jsonl"), "--out", str(tmp_path / "shards"), "--no-progress")
    result = run("jaxtrain", "train", "--init-from", str(base), "--data", str(tmp_path / "shards"), "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--no-progress", check=False)
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "mistral" in error and "base" in error and "Traceback" not in result.stderr
