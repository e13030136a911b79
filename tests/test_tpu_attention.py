"""Attention kernels against the XLA path: mask semantics, numerics (Pallas interpreter on CPU), TPU compile."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain import attention as A
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


@pytest.mark.parametrize("impl, platform, q_len, kv_len, want", [
    ("auto", "cpu", 256, 256, "xla"), ("auto", "tpu", 256, 256, "splash"), ("auto", "gpu", 256, 256, "cudnn"),
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
