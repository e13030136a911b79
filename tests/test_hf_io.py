"""Hugging Face import/export: round trips through `transformers` and clear errors on bad folders."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from hf_reference import hf_model, tiny_config
from jaxtrain import model
from jaxtrain.config import ModelConfig
from jaxtrain.hf_io import load_pretrained, save_pretrained


def _all_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_ours_to_hf_loads_in_transformers_with_same_logits(tmp_path):
    config = tiny_config(sliding_window=6)
    params = model.init_params(config, jax.random.key(0))
    save_pretrained(tmp_path, config, params, dtype="float32", max_shard_size=60_000, tokenizer=None)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 15))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model.forward(config, params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path, dtype):
    config = tiny_config(tie_word_embeddings=False)
    reference = hf_model(config).to(getattr(torch, dtype))
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    loaded_config, params = load_pretrained(tmp_path / "hf")
    save_pretrained(tmp_path / "ours", loaded_config, params, dtype=dtype, max_shard_size="100KB",
                    tokenizer=None)
    original, written = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "ours")
    assert sorted(original) == sorted(written)
    for name in original:
        assert original[name].dtype == written[name].dtype, name
        assert original[name].tobytes() == written[name].tobytes(), name


def test_load_places_params_on_requested_shardings(tmp_path):
    config = tiny_config()
    hf_model(config).save_pretrained(tmp_path)
    device = jax.devices()[-1]
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device),
                             model.param_shapes(config))
    _, params = load_pretrained(tmp_path, shardings=shardings, dtype="bfloat16")
    for leaf in jax.tree.leaves(params):
        assert leaf.devices() == {device} and leaf.dtype == jnp.bfloat16


def test_config_presets_and_hf_config_roundtrip():
    v01 = ModelConfig.preset("mistral-7b-v0.1")
    assert (v01.sliding_window, v01.rope_theta, v01.num_kv_heads, v01.head_dim) == (4096, 1e4, 8, 128)
    assert 7.0e9 < v01.num_params < 7.5e9
    v02 = ModelConfig.preset("mistral-7b-instruct-v0.2")
    assert (v02.sliding_window, v02.rope_theta, v02.max_position_embeddings) == (None, 1e6, 32768)
    assert ModelConfig.preset("tiny").num_params < 5e6
    hf = transformers.MistralConfig(**v02.to_hf_dict())
    assert ModelConfig.from_hf_dict(hf.to_dict()) == v02.replace(param_dtype="float32")
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("llama")


def test_impossible_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tiny_config(num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="head_dim must be even"):
        tiny_config(head_dim=15)
    with pytest.raises(ValueError, match="remat must be one of"):
        tiny_config(remat="sometimes")


@pytest.fixture
def hf_folder(tmp_path):
    hf_model(tiny_config()).save_pretrained(tmp_path)
    return tmp_path


def test_missing_tensor_is_named(hf_folder):
    file = hf_folder / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.numpy import save_file
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(hf_folder)


def test_wrong_shape_is_named(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"):
        load_pretrained(hf_folder)


def test_unknown_architecture_is_refused(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GemmaForCausalLM"], "gemma"  # Llama, Qwen2, Mistral only
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: unsupported architecture"):
        load_pretrained(hf_folder)


def test_truncated_safetensors_is_named(hf_folder):
    file = hf_folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(hf_folder)


def test_config_json_with_a_number_as_a_string_is_named(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    config["hidden_size"] = "64"
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{hf_folder / 'config.json'}: hidden_size must be an integer, got '64'$"):
        load_pretrained(hf_folder)
    config["hidden_size"], config["rms_norm_eps"] = 64, "1e-5"
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"rms_norm_eps must be a number, got '1e-5'"):
        ModelConfig.from_pretrained(hf_folder)
