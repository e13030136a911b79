"""Our Flax Mistral against `transformers`' PyTorch Mistral (fp32, random weights): logits and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from hf_reference import hf_model, tiny_config
from jaxtrain import generate, kv_cache, model
from jaxtrain.hf_io import load_pretrained

CASES = {
    "mha (GQA ratio 1)": dict(num_kv_heads=4),
    "GQA ratio 2": dict(num_kv_heads=2),
    "GQA ratio 4, theta 1e6": dict(num_kv_heads=1, rope_theta=1e6),
    "sliding window shorter than the sequence": dict(sliding_window=7),
    "tied embeddings, 3 layers": dict(tie_word_embeddings=True, num_layers=3),
}


def _load_both(tmp_path, config):
    reference = hf_model(config)
    reference.save_pretrained(tmp_path)
    ours_config, params = load_pretrained(tmp_path, config_overrides=dict(dtype="float32", remat="none"))
    return reference, ours_config, params


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    config = tiny_config(**CASES[case])
    reference, ours_config, params = _load_both(tmp_path, config)
    assert ours_config.sliding_window == config.sliding_window
    assert ours_config.rope_theta == config.rope_theta
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 19))
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model.forward(ours_config, params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_right_padded_batch_matches_unpadded_reference(tmp_path):
    config = tiny_config(sliding_window=5)
    reference, ours_config, params = _load_both(tmp_path, config)
    rng = np.random.default_rng(1)
    lengths = [13, 8, 4]
    ids = rng.integers(0, config.vocab_size, size=(3, 13))
    segment_ids = (np.arange(13)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    got = np.asarray(model.forward(ours_config, params, jnp.asarray(ids, jnp.int32),
                                   segment_ids=jnp.asarray(segment_ids)))
    with torch.no_grad():
        mask = torch.tensor(segment_ids)
        expected = reference(torch.tensor(ids), attention_mask=mask).logits.numpy()
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(got[row, :n], expected[row, :n], atol=1e-4, rtol=0)
        with torch.no_grad():  # and each row alone, unpadded
            alone = reference(torch.tensor(ids[row:row + 1, :n])).logits.numpy()[0]
        np.testing.assert_allclose(got[row, :n], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("per_layer", [False, True])
def test_last_positions_alone_match_transformers(tmp_path, per_layer):
    """`generate.forward_rows(last=n)` (generation and scoring ask for 1 or a continuation's span; with
    per-layer weights the final layer computes only those rows) equals transformers' last n final-norm hidden
    states, in a plain forward and in a prefill that fills the cache, for a left-padded batch."""
    config = tiny_config(num_kv_heads=2, num_layers=3)
    reference, ours_config, params = _load_both(tmp_path, config)
    if per_layer:
        params = kv_cache.unstack_layers(params)
        assert sorted(k for k in params if k.startswith("layers")) == ["layers_0", "layers_1", "layers_2"]
    rng = np.random.default_rng(6)
    pad, seq_len = 5, 19
    ids = rng.integers(3, config.vocab_size, size=(2, seq_len))
    seg = np.ones((2, seq_len), np.int32)
    seg[0, :pad] = 0
    pos = np.stack([np.arange(seq_len) - pad, np.arange(seq_len)]).astype(np.int32)
    with torch.no_grad():
        short = reference.model(torch.tensor(ids[:1, pad:])).last_hidden_state.numpy()[0]
        full = reference.model(torch.tensor(ids[1:])).last_hidden_state.numpy()[0]
    inputs = (jnp.asarray(ids, jnp.int32), jnp.asarray(pos), jnp.asarray(seg))
    for last in (1, 4):
        plain, _ = generate.forward_rows(ours_config, params, *inputs, last=last)
        cache = kv_cache.init_cache(ours_config, 2, seq_len + 4, per_layer=per_layer)
        prefill, _ = generate.forward_rows(ours_config, params, *inputs, cache=cache, empty_cache=True, last=last)
        for got in (plain, prefill):
            assert got.shape == (2, last, config.hidden_size)
            np.testing.assert_allclose(got[0], short[-last:], atol=1e-4, rtol=0)
            np.testing.assert_allclose(got[1], full[-last:], atol=1e-4, rtol=0)


def test_loss_gradients_match_transformers(tmp_path):
    config = tiny_config(sliding_window=6, num_kv_heads=1)
    reference, ours_config, params = _load_both(tmp_path, config)
    ids = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 11))

    reference.zero_grad()
    out = reference(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()

    def loss_fn(p):
        logits = model.forward(ours_config, p, jnp.asarray(ids, jnp.int32))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    np.testing.assert_allclose(float(loss), out.loss.item(), rtol=1e-5)
    hf = dict(reference.named_parameters())
    d, h, hd = config.hidden_size, config.num_heads, config.head_dim
    pairs = {
        "q_proj layer 0": (grads["layers"]["attn"]["wq"][0].reshape(d, h * hd).T,
                           hf["model.layers.0.self_attn.q_proj.weight"].grad),
        "down_proj layer 1": (grads["layers"]["mlp"]["down"][1].T, hf["model.layers.1.mlp.down_proj.weight"].grad),
        "input norm layer 1": (grads["layers"]["attn_norm"]["weight"][1],
                               hf["model.layers.1.input_layernorm.weight"].grad),
        "embedding": (grads["embed"], hf["model.embed_tokens.weight"].grad),
        "lm_head": (grads["lm_head"].T, hf["lm_head.weight"].grad),
    }
    for name, (ours, theirs) in pairs.items():
        ours, theirs = np.asarray(ours), theirs.numpy()
        rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert rel <= 1e-4, f"{name}: relative gradient difference {rel:.2e}"


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    """Mixed precision (fp32 weights, bf16 matmuls) is the training default: it must stay near fp32."""
    config = tiny_config()
    _, ours_config, params = _load_both(tmp_path, config)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=(1, 16)), jnp.int32)
    fp32 = model.forward(ours_config, params, ids)
    bf16 = model.forward(ours_config.replace(dtype="bfloat16"), params, ids)
    assert params["embed"].dtype == jnp.float32
    assert float(jnp.abs(fp32 - bf16).max()) < 0.05 * float(jnp.abs(fp32).max())


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_qkv_proj"])
def test_remat_policies_do_not_change_gradients(tmp_path, policy):
    config = tiny_config()
    _, ours_config, params = _load_both(tmp_path, config)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, size=(1, 9)), jnp.int32)

    def grad(cfg):
        return jax.grad(lambda p: model.forward(cfg, p, ids).sum())(params)

    plain, remat = grad(ours_config), grad(ours_config.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
