"""The one attention function of the model.

Every caller (training, prefill, cached decoding) goes through `attention`, so the masking rules live in
one place: a key is visible to a query iff both belong to the same segment, the key is not in the
query's future, and it lies inside the sliding window. Positions, not array indices, decide "future" and
"window", so the same code serves packed rows, padded rows and a ring-buffer KV cache.

The window follows `transformers`' Mistral convention (the reference our parity tests hold us to):
query position i sees key position j iff ``i - window < j <= i``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla")


def attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window):
    """Boolean [B, T, S] mask: True where query t may attend to key s."""
    q_pos = q_positions[:, :, None]
    kv_pos = kv_positions[:, None, :]
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_pos <= q_pos)
    if sliding_window is not None:
        mask &= q_pos - kv_pos < sliding_window
    return mask


def xla_attention(q, k, v, mask):
    """Plain XLA grouped-query attention; softmax in float32 for parity with the fp32 reference."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    q = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # A row with no visible key (pure padding) would average garbage; zero it instead.
    probs = jnp.where(mask[:, None, None, :, :].any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def attention(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
              sliding_window: int | None, impl: str = "auto"):
    """Grouped-query attention. q [B,T,Hq,D]; k, v [B,S,Hkv,D]; positions / segment ids int32 [B,T] / [B,S].

    Segment id 0 marks padding. Returns [B,T,Hq,D] in q's dtype.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window)
    return xla_attention(q, k, v, mask).astype(q.dtype)
