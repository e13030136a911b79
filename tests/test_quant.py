"""int8 weights: our host-side quantiser against qwix's, the error bound, the tensor-by-tensor loader,
and greedy decoding with an int8 base (and unmerged LoRA) against the float32 model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
import torch

from hf_reference import hf_model, tiny_config
from jaxtrain import hf_io, lora, model, quant, runs
from jaxtrain.generate import Generator
from jaxtrain.hf_io import load_pretrained


def test_host_quantiser_matches_qwix_and_the_rounding_bound():
    rng = np.random.default_rng(0)
    for shape, inputs in (((64, 4, 16), 1), ((4, 16, 64), 2), ((96, 64), 1)):
        w = (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)
        q, s = quant.quantize_np(w, inputs)
        ref = qwix.quantize(jnp.asarray(w), jnp.int8, channelwise_axes=range(inputs, len(shape)))
        np.testing.assert_allclose(s, np.asarray(ref.scale), rtol=1e-6)
        diff = np.abs(q.astype(int) - np.asarray(ref.qvalue).astype(int))
        assert diff.max() <= 1 and diff.mean() < 1e-2  # only exact .5 ties may round apart
        assert s.shape == (1,) * inputs + shape[inputs:]
        assert np.all(np.abs(q.astype(np.float32) * s - w) <= s * (0.5 + 1e-4))  # half a step (+ fp32 rounding)
        assert np.abs(q).max() == 127 or np.abs(q).min() == -128


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    config = tiny_config(vocab_size=32000, sliding_window=16)
    reference = hf_model(config, seed=4)
    with torch.no_grad():  # sharpen the output layer so greedy choices are not coin flips
        reference.lm_head.weight.mul_(20.0)
    reference.save_pretrained(folder)
    overrides = dict(dtype="float32")
    _, fp32 = load_pretrained(folder, config_overrides=overrides)
    config, int8 = hf_io.load_quantized(folder, config_overrides=overrides)
    return folder, config, fp32, int8


def test_loader_quantises_tensor_by_tensor_like_the_whole_model(models):
    _, config, fp32, int8 = models
    whole = quant.quantize_params(fp32)
    for path, x in jax.tree_util.tree_flatten_with_path(int8)[0]:
        y = whole
        for key in path:
            y = getattr(y, key.name) if hasattr(key, "name") else y[key.key]
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path
    assert int8["layers"]["mlp"]["down"].qvalue.dtype == jnp.int8
    assert quant.nbytes(int8["layers"]) < 0.3 * quant.nbytes(fp32["layers"])


def test_int8_greedy_next_tokens_agree_with_fp32(models):
    _, config, fp32, int8 = models
    ids = np.random.default_rng(1).integers(3, 32000, size=(8, 64)).astype(np.int32)
    a = np.asarray(jnp.argmax(model.forward(config, fp32, ids), -1))
    b = np.asarray(jnp.argmax(model.forward(config, int8, ids), -1))
    agreement = (a == b).mean()
    print(f"int8 vs fp32 greedy next-token agreement: {agreement:.4f} over {a.size} positions")
    assert agreement >= 0.99

    # The decoder runs the int8 base with unmerged adapters (zero B): every token it emits is the int8
    # model's own greedy choice (a full forward over prompt + emitted tokens).
    cfg = lora.LoraConfig(rank=2, alpha=4)
    adapters = lora.Adapters(model.init_adapters(config, cfg, jax.random.key(0)), cfg)
    prompts = [ids[i, :n].tolist() for i, n in enumerate((5, 20, 33, 9))]
    out = Generator(config, int8, batch_size=4, adapters=adapters).generate(prompts, max_new_tokens=8, progress=False)
    for prompt, generation in zip(prompts, out):
        full = np.asarray([prompt + generation.token_ids], np.int32)
        greedy = np.asarray(jnp.argmax(model.forward(config, int8, full), -1))[0, len(prompt) - 1:-1]
        assert generation.token_ids and greedy.tolist() == generation.token_ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_base_shapes_describe_the_int8_base_the_loader_builds(models, dtype):
    """What AOT compiles and restores against (`runs.base_shapes`) is what `load_quantized` returns:
    int8 projections with float32 scales, the embedding, LM head and norms in the compute dtype."""
    folder = models[0]
    config, loaded = hf_io.load_quantized(folder, config_overrides=dict(dtype=dtype))
    shapes = runs.base_shapes(config, "int8")
    assert jax.tree.structure(shapes) == jax.tree.structure(loaded)
    for want, got in zip(jax.tree.leaves(shapes), jax.tree.leaves(loaded)):
        assert (want.shape, want.dtype) == (got.shape, got.dtype)
    assert loaded["embed"].dtype == jnp.dtype(dtype)
