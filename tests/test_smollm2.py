"""The real SmolLM2-135M-Instruct (Llama architecture, its own BPE tokenizer and ChatML template) against
`transformers` on the same folder: logits, bf16 greedy agreement, chat encoding and greedy decoding of real
prompts (the paper's key-value task and an MDQA question)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from data_gen import tasks
from data_gen.tokenizer import get_tokenizer
from eval.mdqa import prompt_text
from eval.readers import find_position_files, read_mdqa_file
from jaxtrain import model
from jaxtrain.generate import Generator
from jaxtrain.hf_io import load_pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    config, params = load_pretrained(smollm2_dir, config_overrides=dict(dtype="float32", remat="none"))
    return reference, config, params, get_tokenizer(smollm2_dir)


def _kv_prompts(n: int, num_dicts: int) -> list[str]:
    cfg = tasks.PRESETS["paper-simple"].replace(num_dicts=num_dicts, num_train=0, num_eval=n, template=True)
    return [r["messages"][0]["content"] for r in tasks.generate_split(cfg, 0, "eval", n, progress=False)]


def test_the_folder_is_what_its_card_says(smollm2):
    _, config, _, tokenizer = smollm2
    assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (
        "LlamaForCausalLM", 30, 576, 9, 3, 49152, 1e5, True)
    assert 2 in tokenizer.stop_ids and tokenizer.decode([2]) == ""


def test_logits_match_transformers_in_float32_and_bf16_keeps_the_greedy_token(smollm2_dir, smollm2, shared_data):
    """float32: logits within 1e-4 of transformers'. bf16 compute: the float32 greedy token at as many positions
    as transformers' own bf16 model keeps (measured: ours 97.7% / 98.4% on these prompts, transformers' bf16
    89.0% / 97.8%; a 30-layer model's bf16 rounding flips near-ties, e.g. between the ten digits of a random
    number), and never below 97%."""
    reference, config, params, tokenizer = smollm2
    reference_bf16 = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    mdqa = read_mdqa_file(find_position_files(shared_data / "mdqa", 20)[0])[0]
    for text in (_kv_prompts(1, 10)[0], prompt_text(mdqa.question, mdqa.documents[:6])):
        ids = tokenizer.encode_prompt(text)
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0].numpy()
            theirs_bf16 = reference_bf16(torch.tensor([ids])).logits[0].float().numpy()
        ours = np.asarray(model.forward(config, params, jnp.asarray([ids], jnp.int32))[0])
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
        bf16 = np.asarray(model.forward(config.replace(dtype="bfloat16"), params, jnp.asarray([ids], jnp.int32))[0])
        greedy = theirs.argmax(-1)
        ours_kept, theirs_kept = (bf16.argmax(-1) == greedy).mean(), (theirs_bf16.argmax(-1) == greedy).mean()
        assert ours_kept >= max(theirs_kept, 0.97), (ours_kept, theirs_kept)


def test_chat_encoding_is_the_checkpoints_own_template(smollm2_dir, smollm2):
    tokenizer = smollm2[3]
    reference = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for prompt in _kv_prompts(3, 5):
        messages = [{"role": "user", "content": prompt}]
        assert tokenizer.encode_prompt(prompt) == reference.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_greedy_decoding_equals_transformers_generate_on_real_prompts(smollm2, shared_data):
    reference, config, params, tokenizer = smollm2
    mdqa = read_mdqa_file(find_position_files(shared_data / "mdqa", 20)[0])[0]
    texts = _kv_prompts(2, 5) + [prompt_text(mdqa.question, mdqa.documents[:4])]
    prompts = [tokenizer.encode_prompt(t) for t in texts]
    ours = Generator(config, params, tokenizer=tokenizer, batch_size=3).generate(prompts, max_new_tokens=24,
                                                                                progress=False)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        theirs = out.tolist()
        theirs = theirs[:theirs.index(2)] if 2 in theirs else theirs
        assert got.token_ids == theirs, (tokenizer.decode(got.token_ids), tokenizer.decode(theirs))
        assert got.text == tokenizer.decode(theirs)


def test_the_pipeline_runs_on_the_real_model_with_its_own_tokenizer(smollm2_dir, tmp_path):
    """generate → shards → train (2 steps) → export → eval, SmolLM2's tokenizer and template throughout; the export
    carries them (transformers' apply_chat_template gives the ids we trained on)."""
    from test_model_family_pipeline import run

    data, shards, runs, hf = (tmp_path / n for n in ("data", "shards", "run", "hf"))
    run("data_gen", "generate", "--preset", "paper-simple", "--num-dicts", "3", "--template", "--num-train", "8",
        "--num-eval", "2", "--tokenizer", str(smollm2_dir), "--out", str(data), "--no-progress")
    run("data_gen", "shards", "--input", str(data / "train.jsonl"), "--tokenizer", str(smollm2_dir), "--out",
        str(shards), "--no-progress")
    run("jaxtrain", "train", "--init-from", str(smollm2_dir), "--data", str(shards), "--out", str(runs),
        "--max-steps", "2", "--global-batch", "4", "--lr", "1e-4", "--no-progress")
    run("jaxtrain", "export", "--checkpoint", str(runs), "--out", str(hf))
    record = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    ids = transformers.AutoTokenizer.from_pretrained(hf).apply_chat_template(record["messages"], tokenize=True,
                                                                               return_dict=False)
    assert ids == get_tokenizer(smollm2_dir).encode_chat(record["messages"]).input_ids.tolist()
    run("eval", "synthetic", "--model", str(hf), "--data-dir", str(data), "--out", str(tmp_path / "res"),
        "--no-progress")
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["num_examples"] == 2 and results["model"]["config"]["architectures"] == ["LlamaForCausalLM"]
