"""Attention kernels and the chunked CPU path against the XLA path: mask semantics, numerics (Pallas
interpreter on CPU), TPU compile; the chunked path inside the model against transformers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_reference import hf_model, tiny_config
from jaxtrain import attention as A
from jaxtrain import model
from jaxtrain.hf_io import load_pretrained
from jaxtrain.sharding import FSDP_RULES, MeshConfig, make_mesh
from jaxtrain.topology import parse_accelerator_type


def packed_row(lengths, total):
    """Segment ids 1, 2, ... for consecutive sequences of `lengths`, then padding (0); positions restart
    at 0 in every sequence (and in the padding), the layout of packed training rows."""
    seg = np.zeros(total, np.int32)
    pos = np.zeros(total, np.int32)
    start = 0
    for i, n in enumerate(lengths, 1):
        seg[start:start + n] = i
        pos[start:start + n] = np.arange(n)
        start += n
    pos[start:] = np.arange(total - start)
    return seg, pos


@pytest.mark.parametrize("seq_len", [128, 256])
@pytest.mark.parametrize("window", [None, 1, 2, 37, 128, 255, 256, 4096])
def test_splash_mask_equals_position_mask(seq_len, window):
    """Splash's static mask (materialised) AND segment equality == `attention_mask` on packed rows."""
    seg, pos = packed_row([seq_len // 3, seq_len // 2], seq_len)
    local = np.asarray(A.splash_local_mask(seq_len, window)[:, :])
    splash = local & (seg[:, None] == seg[None, :])
    ours = np.asarray(A.attention_mask(pos[None], pos[None], seg[None], seg[None], window))[0]
    np.testing.assert_array_equal(splash, ours)
    # and the rule itself, by hand: j visible from i iff same segment, 0 <= i - j < window
    i, j = np.meshgrid(np.arange(seq_len), np.arange(seq_len), indexing="ij")
    by_hand = (seg[:, None] == seg[None, :]) & (j <= i) & ((i - j) < (window or seq_len + 1))
    np.testing.assert_array_equal(ours, by_hand)


def _inputs(seed=0, batch=2, seq_len=256, heads=4, kv_heads=2, head_dim=128, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, seq_len, heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, seq_len, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, seq_len, kv_heads, head_dim)), dtype)
    rows = [packed_row([seq_len * 3 // 8, seq_len // 2], seq_len), packed_row([seq_len], seq_len)][:batch]
    seg = jnp.asarray(np.stack([r[0] for r in rows]))
    pos = jnp.asarray(np.stack([r[1] for r in rows]))
    return q, k, v, seg, pos


def _xla(q, k, v, seg, pos, window):
    return A.attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                       sliding_window=window, impl="xla")


@pytest.mark.parametrize("window", [50])
def test_splash_kernel_matches_xla_forward_and_gradients(window):
    """The real Pallas kernel, run by its interpreter on CPU: outputs and q/k/v gradients. 128-wide
    tiles on 256 tokens: the window leaves one tile fully masked, which the kernel must skip."""
    q, k, v, seg, pos = _inputs()
    weight = (seg != 0)[:, :, None, None].astype(jnp.float32)  # padding rows are don't-care

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * weight * jnp.cos(jnp.arange(q.shape[-1]))).sum()

    splash = lambda q, k, v: A.splash_attention(q, k, v, seg, seg, window, block=128, interpret=True)
    xla = lambda q, k, v: _xla(q, k, v, seg, pos, window)
    np.testing.assert_allclose(splash(q, k, v) * weight, xla(q, k, v) * weight, atol=2e-5, rtol=1e-5)
    got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 1, 50])
def test_cudnn_argument_mapping_matches_xla(window):
    """The GPU path's call of jax.nn.dot_product_attention (is_causal, local_window_size, segment mask),
    run with JAX's XLA reference implementation of the same call since there is no GPU here."""
    q, k, v, seg, pos = _inputs(seed=1, seq_len=128, head_dim=32)
    got = A.cudnn_attention(q, k, v, seg, seg, window, implementation="xla")
    np.testing.assert_allclose(got, _xla(q, k, v, seg, pos, window), atol=1e-5, rtol=1e-5)


def _left_padded(seq_len, pads):
    """Rows as the generator prefills them: padding (segment 0, negative positions) then the prompt."""
    seg = np.stack([(np.arange(seq_len) >= p).astype(np.int32) for p in pads])
    pos = np.stack([np.arange(seq_len) - p for p in pads]).astype(np.int32)
    return jnp.asarray(seg), jnp.asarray(pos)


CHUNKED_CASES = {  # (seq_len, heads, kv_heads, window, query chunk, key tile, layout)
    "packed rows, GQA 2, window < chunk": (256, 4, 2, 37, 64, 32, "packed"),
    "packed rows, MQA, no window, chunk and tile not dividing T": (300, 4, 1, None, 64, 48, "packed"),
    "left padding, MHA, window spanning chunks": (300, 2, 2, 100, 32, 64, "left"),
    "left padding, GQA 4, window 1": (130, 8, 2, 1, 64, 16, "left"),
    "one block, window beyond T": (96, 4, 2, 4096, 128, 512, "packed"),
    "left padding, GQA 2, no window, tiles seen whole (unmasked)": (300, 4, 2, None, 64, 16, "left"),
    "long left padding: tiles of padding skipped, tiles into it masked per key": (300, 4, 2, None, 32, 16,
                                                                               "long left"),
    "long left padding, window 40": (300, 4, 2, 40, 32, 16, "long left"),
}


@pytest.mark.parametrize("case", list(CHUNKED_CASES))
def test_chunked_matches_xla_forward_and_gradients(case):
    """Every output (padding rows too) and the q/k/v gradients of the chunked path equal the XLA path's."""
    seq_len, heads, kv_heads, window, chunk, key_chunk, layout = CHUNKED_CASES[case]
    q, k, v, seg, pos = _inputs(seed=2, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=16)
    if layout == "left":
        seg, pos = _left_padded(seq_len, [seq_len // 3, 0])
    if layout == "long left":   # both rows: whole tiles of padding, before and after tiles that start in it
        seg, pos = _left_padded(seq_len, [seq_len * 2 // 3 + 5, seq_len // 2 + 3])
    chunked = lambda q, k, v: A.chunked_attention(q, k, v, pos, pos, seg, seg, window, chunk=chunk,
                                                      key_chunk=key_chunk)
    xla = lambda q, k, v: _xla(q, k, v, seg, pos, window)
    np.testing.assert_allclose(chunked(q, k, v), xla(q, k, v), atol=1e-5, rtol=1e-5)
    loss = lambda fn: lambda q, k, v: (fn(q, k, v) * jnp.cos(jnp.arange(q.shape[-1]))).sum()
    got = jax.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_heads, window", [(2, None), (1, 5), (4, 40)])
def test_one_query_attention_matches_xla(kv_heads, window):
    """The decode-step path (one query per row) against `xla_attention`, over a ring-buffer-like cache:
    slots out of position order, empty slots (-1, segment 0), and a padding row that sees nothing."""
    rng = np.random.default_rng(3)
    batch, slots, heads, head_dim = 3, 64, 4, 16
    q = jnp.asarray(rng.standard_normal((batch, 1, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, slots, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, slots, kv_heads, head_dim)), jnp.float32)
    kv_pos = np.stack([rng.permutation(slots) + 30 for _ in range(batch)]).astype(np.int32)
    kv_pos[:, :7] = -1
    kv_seg = (kv_pos >= 0).astype(np.int32)
    q_pos = jnp.asarray([[80], [60], [-5]], jnp.int32)
    q_seg = jnp.asarray([[1], [1], [0]], jnp.int32)
    mask = A.attention_mask(q_pos, jnp.asarray(kv_pos), q_seg, jnp.asarray(kv_seg), window)
    got = A.one_query_attention(q, k, v, mask)
    want = A.xla_attention(q, k, v, mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)
    # Keys in parts (a decode step's cache and its new key), read in place; through `attention` too.
    parts = (k[:, :63], k[:, 63:]), (v[:, :63], v[:, 63:])
    np.testing.assert_allclose(A.one_query_attention(q, *parts, mask), want, atol=1e-5, rtol=1e-5)
    inputs = dict(q_positions=q_pos, kv_positions=jnp.asarray(kv_pos), q_segment_ids=q_seg,
                  kv_segment_ids=jnp.asarray(kv_seg), sliding_window=window)
    for impl in ("auto", "xla"):
        np.testing.assert_allclose(A.attention(q, *parts, impl=impl, **inputs), want, atol=1e-5, rtol=1e-5)


def test_chunked_model_matches_transformers(tmp_path, monkeypatch):
    """The whole model on the chunked path (16-query blocks, 8-key tiles, window 7, GQA, a left-padded row)
    against transformers' PyTorch Mistral."""
    monkeypatch.setattr(A, "CHUNK", 16)
    monkeypatch.setattr(A, "KEY_CHUNK", 8)
    config = tiny_config(sliding_window=7, num_kv_heads=2)
    reference = hf_model(config)
    reference.save_pretrained(tmp_path)
    ours, params = load_pretrained(tmp_path, config_overrides=dict(dtype="float32", remat="none",
                                                                   attention_impl="chunked"))
    seq_len, pad = 50, 13
    ids = np.random.default_rng(5).integers(3, config.vocab_size, size=(2, seq_len))
    seg, pos = _left_padded(seq_len, [pad, 0])
    got = np.asarray(model.forward(ours, params, jnp.asarray(ids, jnp.int32), positions=pos, segment_ids=seg))
    with torch.no_grad():
        full = reference(torch.tensor(ids[1:])).logits.numpy()[0]
        alone = reference(torch.tensor(ids[:1, pad:])).logits.numpy()[0]
    np.testing.assert_allclose(got[1], full, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[0, pad:], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl, platform, q_len, kv_len, want", [
    ("auto", "cpu", 255, 255, "xla"), ("auto", "cpu", 256, 256, "chunked"), ("auto", "cpu", 4096, 4096, "chunked"),
    ("auto", "cpu", 1, 4097, "one_query"),      # a CPU decode step
    ("xla", "cpu", 1, 4097, "xla"), ("splash", "cpu", 1, 4097, "xla"),  # named: never the CPU-only path
    ("chunked", "tpu", 300, 300, "chunked"), ("chunked", "cpu", 1, 5, "xla"),
    ("auto", "tpu", 256, 256, "splash"), ("auto", "gpu", 256, 256, "cudnn"),
    ("auto", "tpu", 1, 4097, "xla"),            # decoding with a cache
    ("auto", "tpu", 100, 100, "xla"),           # not a multiple of the 128-wide tiles
    ("splash", "cpu", 512, 512, "splash"), ("splash", "cpu", 1, 1, "xla"), ("xla", "tpu", 256, 256, "xla"),
    ("cudnn", "cpu", 128, 128, "cudnn"),
])
def test_resolve_impl(impl, platform, q_len, kv_len, want):
    assert A.resolve_impl(impl, q_len=q_len, kv_len=kv_len, platform=platform) == want


def test_cudnn_only_in_16_bit():
    assert A.resolve_impl("auto", q_len=256, kv_len=256, dtype=jnp.float32, platform="gpu") == "xla"
    assert A.resolve_impl("auto", q_len=256, kv_len=256, dtype=jnp.float16, platform="gpu") == "cudnn"
    assert A.resolve_impl("auto", q_len=256, kv_len=256, dtype=jnp.float32, platform="tpu") == "splash"


def test_unknown_impl_is_a_clear_error():
    q, k, v, seg, pos = _inputs(seq_len=128, head_dim=16)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        A.attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                    sliding_window=None, impl="flash")


def test_splash_compiles_for_tpu_under_fsdp_mesh():
    """Forward + backward of splash for a v5e-8 slice (compile only): one kernel per direction, sharded
    per device by shard_map (no all-gather of q/k/v), as the train step runs it."""
    topo = parse_accelerator_type("v5e-8")
    mesh = make_mesh(MeshConfig(fsdp=-1), topo.devices())
    batch_sharded = NamedSharding(mesh, P(("data", "fsdp")))
    shapes = [(8, 512, 8, 128), (8, 512, 2, 128), (8, 512, 2, 128)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=batch_sharded) for s in shapes]
    args.append(jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=batch_sharded))

    def grads(q, k, v, seg):
        def loss(q, k, v):
            out = A.attention(q, k, v, q_positions=seg, kv_positions=seg, q_segment_ids=seg,
                              kv_segment_ids=seg, sliding_window=256, impl="splash")
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with jax.set_mesh(mesh), nn.logical_axis_rules(FSDP_RULES):
        compiled = jax.jit(grads).lower(*args).compile()
    hlo = compiled.as_text()
    assert hlo.count("tpu_custom_call") == 3   # forward, dq, dkv kernels
    assert "all-gather" not in hlo
    assert compiled.memory_analysis().argument_size_in_bytes == sum(
        np.prod(s) // 8 * 2 for s in shapes) + 512 * 4


def test_splash_runs_one_row_under_an_eight_chip_mesh():
    """One long prompt on a v5e-8 (`eval --shard --batch-size 1`): the row cannot split 8 ways, so every
    chip runs it for its own heads instead of shard_map failing on the batch."""
    topo = parse_accelerator_type("v5e-8")
    mesh = make_mesh(MeshConfig(fsdp=-1), topo.devices())
    replicated = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=replicated)
            for s in [(1, 1024, 8, 128), (1, 1024, 2, 128), (1, 1024, 2, 128)]]
    args.append(jax.ShapeDtypeStruct((1, 1024), jnp.int32, sharding=replicated))

    def forward(q, k, v, seg):
        return A.attention(q, k, v, q_positions=seg, kv_positions=seg, q_segment_ids=seg, kv_segment_ids=seg,
                           sliding_window=None, impl="splash")

    with jax.set_mesh(mesh), nn.logical_axis_rules(FSDP_RULES):
        hlo = jax.jit(forward).lower(*args).compile().as_text()
    assert hlo.count("tpu_custom_call") == 1
