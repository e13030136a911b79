"""Llama, Qwen2 and Mistral v0.3 checkpoints against `transformers` (random weights, float32): logits, gradients,
greedy decoding and the HF → ours → HF round trip, one architecture at a time; configs the port cannot
compute are refused naming the field."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import load_file

from hf_reference import hf_model, tiny_config
from jaxtrain import model
from jaxtrain.config import ModelConfig, RopeScaling
from jaxtrain.generate import Generator
from jaxtrain.hf_io import load_pretrained, save_pretrained

LLAMA3_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16)
CASES = {
    "llama, tied embeddings": dict(architecture="LlamaForCausalLM", tie_word_embeddings=True, rope_theta=1e5),
    "llama 3.1 rope scaling, untied": dict(architecture="LlamaForCausalLM", rope_theta=5e5,
                                           rope_scaling=LLAMA3_SCALING),
    "qwen2 (q/k/v biases), tied": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1e6),
    "qwen2, untied, derived head_dim": dict(architecture="Qwen2ForCausalLM", num_kv_heads=1, head_dim=16),
    "mistral v0.3 (no window)": dict(architecture="MistralForCausalLM", vocab_size=768, rope_theta=1e6),
}


def _both(tmp_path, case):
    config = tiny_config(**CASES[case])
    reference = hf_model(config)
    reference.save_pretrained(tmp_path / "hf")
    ours_config, params = load_pretrained(tmp_path / "hf", config_overrides=dict(dtype="float32", remat="none"))
    return config, reference, ours_config, params


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_match_transformers(tmp_path, case):
    config, reference, ours_config, params = _both(tmp_path, case)
    assert ours_config == config.replace(bos_token_id=ours_config.bos_token_id, eos_token_id=ours_config.eos_token_id)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 40))  # longer than the llama3 16
    reference.zero_grad()
    out = reference(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()

    def loss_fn(p):
        logits = model.forward(ours_config, p, jnp.asarray(ids, jnp.int32))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    expected = out.logits.detach().numpy()
    assert np.abs(np.asarray(logits) - expected).max() <= 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    hf = dict(reference.named_parameters())
    d, h, kvh, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    pairs = {
        "q_proj layer 0": (grads["layers"]["attn"]["wq"][0].reshape(d, h * hd).T,
                           hf["model.layers.0.self_attn.q_proj.weight"].grad),
        "down_proj layer 1": (grads["layers"]["mlp"]["down"][1].T, hf["model.layers.1.mlp.down_proj.weight"].grad),
        "embedding": (grads["embed"], hf["model.embed_tokens.weight"].grad),
    }
    if config.qkv_bias:
        pairs["q bias layer 1"] = (grads["layers"]["attn"]["bq"][1].reshape(-1), hf["model.layers.1.self_attn.q_proj.bias"].grad)
        pairs["v bias layer 0"] = (grads["layers"]["attn"]["bv"][0].reshape(kvh * hd),
                                   hf["model.layers.0.self_attn.v_proj.bias"].grad)
    if not config.tie_word_embeddings:
        pairs["lm_head"] = (grads["lm_head"].T, hf["lm_head.weight"].grad)
    for name, (ours, theirs) in pairs.items():
        ours, theirs = np.asarray(ours), theirs.numpy()
        rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert rel <= 1e-4, f"{name}: relative gradient difference {rel:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_decoding_equals_transformers_generate(tmp_path, case):
    config, reference, ours_config, params = _both(tmp_path, case)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, size=n).tolist() for n in (23, 9)]
    ours = Generator(ours_config, params, batch_size=2).generate(prompts, max_new_tokens=12, progress=False)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        # Ours stops at the config's end-of-sequence id (2) and does not return it.
        assert got.token_ids == (theirs[:theirs.index(2)] if 2 in theirs else theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_ours_to_hf_is_bit_identical_and_keeps_the_architecture(tmp_path, case):
    _, _, ours_config, params = _both(tmp_path, case)
    save_pretrained(tmp_path / "ours", ours_config, params, dtype="float32", tokenizer=None)
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    written = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert sorted(original) == sorted(written)
    assert all(original[k].tobytes() == written[k].tobytes() for k in original)
    theirs = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert ours["architectures"] == theirs["architectures"] and ours["model_type"] == theirs["model_type"]
    assert ModelConfig.from_hf_dict(ours) == ModelConfig.from_hf_dict(theirs)


BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "unsupported architecture"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "mistral"}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs field 'low_freq_factor'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "sliding_window": 8, "max_window_layers": 1, "num_hidden_layers": 2}, "window on some layers only"),
])
def test_unsupported_configs_are_refused_naming_the_field(tmp_path, changes, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **changes}))
    with pytest.raises(ValueError, match=message) as e:
        ModelConfig.from_pretrained(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json")) and "\n" not in str(e.value)


def test_hub_config_spellings_are_read():
    """Llama 3.1's config.json (legacy rope_scaling + rope_theta), Qwen2.5's (window fields present but off)."""
    llama31 = {**BASE, "rope_theta": 500000.0, "tie_word_embeddings": False, "eos_token_id": [128001, 128008, 128009],
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    config = ModelConfig.from_hf_dict(llama31)
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192) and config.rope_theta == 5e5
    assert config.eos_token_id == (128001, 128008, 128009)
    qwen25 = {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
              "sliding_window": 32768, "max_window_layers": 21, "rope_theta": 1e6, "tie_word_embeddings": True}
    config = ModelConfig.from_hf_dict(qwen25)
    assert config.sliding_window is None and config.qkv_bias and config.tie_word_embeddings
    assert ModelConfig.from_json(config.to_json()) == config
