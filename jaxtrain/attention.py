"""The one attention function of the model.

Every caller (training, prefill, cached decoding) goes through `attention`, so the masking rules live in
one place: a key is visible to a query iff both belong to the same segment, the key is not in the
query's future, and it lies inside the sliding window. Positions, not array indices, decide "future" and
"window", so the same code serves packed rows, padded rows and a ring-buffer KV cache.

The window follows `transformers`' Mistral convention (the reference our parity tests hold us to):
query position i sees key position j iff ``i - window < j <= i``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
CHUNK = 512                 # queries per block of the chunked path
KEY_CHUNK = 512             # keys per tile of the chunked path
CHUNKED_MIN_LEN = 256      # "auto" on CPU chunks self-attention from this length on
SKIP, WHOLE, KEYS, FULL = range(4)   # the masks a tile of the chunked path can need (`tile_mask`)


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

    k and v may each be a tuple of parts along the key axis (a decode step's cache and its new keys):
    the one-query CPU path reads them where they lie, every other path concatenates them. Segment id 0
    marks padding. Returns [B,T,Hq,D] in q's dtype.
    """
    k_parts, v_parts = (tuple(x.astype(q.dtype) for x in (t if isinstance(t, tuple) else (t,))) for t in (k, v))
    k, v = k_parts[0], v_parts[0]
    kv_len = sum(x.shape[1] for x in k_parts)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    impl = resolve_impl(impl, q_len=q.shape[1], kv_len=kv_len, dtype=q.dtype)
    if impl == "one_query":
        mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window)
        return one_query_attention(q, k_parts, v_parts, mask).astype(q.dtype)
    if len(k_parts) > 1:
        k, v = jnp.concatenate(k_parts, axis=1), jnp.concatenate(v_parts, axis=1)
    if impl == "chunked":
        return chunked_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                                 sliding_window)
    if impl == "splash":
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, sliding_window)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, sliding_window)
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window)
    return xla_attention(q, k, v, mask).astype(q.dtype)


def one_query_attention(q, k, v, mask):
    """`xla_attention` for a single query per row (a decode step, CPU), as plain matmuls over the KV cache in
    its own [B, S, Hkv * D] layout. The einsums of `xla_attention` make XLA:CPU transpose the whole cache to
    [B, Hkv, S, D] every step, and a multiply-and-reduce per head vectorises poorly; here the queries form
    a block-diagonal [Hkv * D, Hkv * G] matrix (head h's queries in rows h * D ...), so the scores of every
    head are one [S, Hkv * D] @ [Hkv * D, Hkv * G] product and the output one [Hkv * G, S] @ [S, Hkv * D]
    product whose diagonal blocks are kept. Hkv times the FLOPs of the attention, which is read-bound:
    measured 2.4x faster at batch 1 and 1.9x at batch 8 (4K cache, 4 KV heads of 64).

    k, v: arrays or tuples of parts along the key axis (the cache and the step's new key), each read in
    place: concatenated, the whole cache would be copied in every layer of every step."""
    k, v = (t if isinstance(t, tuple) else (t,) for t in (k, v))
    batch, _, num_heads, head_dim = q.shape
    num_kv_heads = k[0].shape[2]
    group = num_heads // num_kv_heads
    q = (q.astype(jnp.float32) / np.sqrt(head_dim)).reshape(batch, num_kv_heads, group, head_dim)
    eye = jnp.eye(num_kv_heads, dtype=jnp.float32)
    q = jnp.einsum("bhgd,hj->bhdjg", q, eye).reshape(batch, num_kv_heads * head_dim, num_kv_heads * group)
    starts = np.cumsum([0] + [part.shape[1] for part in k])
    scores = []
    for part, start, stop in zip(k, starts, starts[1:]):
        s = jnp.einsum("bsc,bcn->bsn", part.astype(jnp.float32).reshape(batch, stop - start, -1), q)
        scores.append(jnp.where(mask[:, 0, start:stop, None], s, -jnp.inf))              # B S (Hkv G)
    top = functools.reduce(jnp.maximum, [s.max(1, keepdims=True) for s in scores])
    top = jnp.maximum(top, jnp.finfo(jnp.float32).min)                                   # finite if all masked
    weights = [jnp.exp(s - top) for s in scores]
    out = sum(jnp.einsum("bsn,bsc->bnc", w, part.astype(jnp.float32).reshape(w.shape[0], w.shape[1], -1))
              for w, part in zip(weights, v))
    out = jnp.diagonal(out.reshape(batch, num_kv_heads, group, num_kv_heads, head_dim), axis1=1, axis2=3)
    out = out.transpose(0, 3, 1, 2)                                                      # B Hkv G D
    total = sum(w.sum(1) for w in weights).reshape(batch, num_kv_heads, group)
    out = out / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.reshape(batch, 1, num_heads, head_dim)


def chunked_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, *,
                      chunk: int | None = None, key_chunk: int | None = None):
    """Self-attention in tiles of `chunk` queries x `key_chunk` keys with an online softmax (flash style).

    The plain XLA path materialises [B, H, T, T] scores and masks them; on CPU (no fused kernel) that
    memory traffic is most of the cost of a long prefill. Here a block of queries [a, b) visits only the
    key tiles its mask can reach (keys [a - window + 1, b): causal and window bounds taken from array
    indices, as the kernels do -- exact whenever positions advance by one per token inside a segment,
    true of every training row and every prefill), one tile at a time in a `lax.scan`, so a tile's
    scores stay in cache. Inside a tile the mask is the exact position rule, applied as an additive float
    bias (XLA:CPU fuses float arithmetic into its kernels but ran a boolean mask as a separate pass).
    Each tile takes the cheapest exact mask (`tile_mask`): none when every query of the block sees it
    whole (one segment, behind the diagonal, inside the window: most tiles of a long row; a pass over
    its scores saved, 4096 tokens 10-15% faster), one bias per key when its only invisible keys are
    another segment's (a tile that starts in a prompt's left padding), and no visit at all when none of
    its keys is visible (a tile of padding seen from the prompt: a 4096-token row with 1996 tokens of
    left padding takes ~30% less attention time). Same numerics as `xla_attention` up to rounding
    (float32 scores and softmax; a query with no visible key gets zeros). Differentiable (CPU training
    uses it): differentiated, every tile takes the full mask, since a `lax.switch` keeps every branch's
    residuals for the backward pass (~10% slower).
    `chunk` / `key_chunk` default to the module's `CHUNK` / `KEY_CHUNK`.
    """
    return _chunked(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, chunk,
                    key_chunk)


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8, 9))
def _chunked(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window, chunk, key_chunk):
    return _chunked_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window,
                              chunk, key_chunk, skip_masks=True)


@_chunked.defjvp
def _chunked_jvp(sliding_window, chunk, key_chunk, primals, tangents):
    plain = functools.partial(_chunked_attention, sliding_window=sliding_window, chunk=chunk, key_chunk=key_chunk,
                              skip_masks=False)
    return jax.jvp(plain, primals, tangents)


def _chunked_attention(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window,
                       chunk, key_chunk, *, skip_masks: bool):
    batch, seq_len, num_heads, head_dim = q.shape
    if k.shape[1] != seq_len:
        raise ValueError(f"chunked attention is self-attention only; got {seq_len} queries and {k.shape[1]} keys")
    # At least two query blocks (a causal row then skips a quarter of the scores), at most `CHUNK` queries.
    chunk = chunk or min(CHUNK, max(seq_len // 2, 128))
    tile = min(key_chunk or KEY_CHUNK, seq_len)
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    dtype = q.dtype
    # Fold 1/sqrt(D) into q (T x D values instead of T x T scores); heads lead so that each tile is a
    # batch of plain [queries x D] @ [D x keys] matmuls, a query's group of heads as consecutive rows.
    q = (q.astype(jnp.float32) / np.sqrt(head_dim)).astype(dtype)
    q = q.reshape(batch, seq_len, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)  # B Hkv T G D
    # Keys get `pad` = `tile` slots of left padding in segment -1 (visible to no query), so that every tile
    # can end where its query block ends and still have `tile` keys; a row no longer than one tile (every
    # block then reads exactly its own keys) needs none.
    pad = tile if seq_len > tile else 0
    k, v = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (pad, 0), (0, 0))) for x in (k, v))  # B Hkv S D
    q_pos, q_seg = q_positions.astype(jnp.float32), q_segment_ids.astype(jnp.float32)
    kv_pos = jnp.pad(kv_positions.astype(jnp.float32), ((0, 0), (pad, 0)))
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.float32), ((0, 0), (pad, 0)), constant_values=-1.0)
    blocks = []
    for start in range(0, seq_len, chunk):
        stop = min(start + chunk, seq_len)
        rows = stop - start
        first = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        tiles = -(-(stop - first) // tile)
        qb = q[:, :, start:stop].reshape(batch, num_kv_heads, rows * group, head_dim)
        qb_pos, qb_seg = q_pos[:, start:stop, None], q_seg[:, start:stop, None]

        def tile_scores(key_start, size=tile, mask=FULL, qb=qb, qb_pos=qb_pos, qb_seg=qb_seg, rows=rows):
            """Scores [B, Hkv, rows, G, size] of the query block against keys from `key_start`, with the
            `mask` the tile needs (`tile_mask`)."""
            kt = jax.lax.dynamic_slice_in_dim(k, key_start, size, axis=2)
            scores = jnp.einsum("bkqd,bksd->bkqs", qb, kt, preferred_element_type=jnp.float32)
            scores = scores.reshape(batch, num_kv_heads, rows, group, size)
            if mask == WHOLE:
                return scores
            kt_pos, kt_seg = (jax.lax.dynamic_slice_in_dim(x, key_start, size, axis=1)[:, None, :]
                              for x in (kv_pos, kv_seg))
            if mask == KEYS:   # one bias per key: whether it is in the block's (single) segment
                other = (kt_seg != qb_seg[:, :1]).astype(jnp.float32)
                return scores + (other * -1e30)[:, None, :, None, :]
            # How far each (query, key) pair is from visible (0: visible): another segment, in the
            # future, or out of the window. Positions are exact in float32 up to 2**24.
            ahead = qb_pos - kt_pos
            miss = jnp.abs(qb_seg - kt_seg) + jnp.maximum(-ahead, 0.0)
            if sliding_window is not None:
                miss = miss + jnp.maximum(ahead - (sliding_window - 1), 0.0)
            return scores + (miss * -1e30)[:, None, :, None, :]

        def tile_mask(key_start, qb_pos=qb_pos, qb_seg=qb_seg):
            """The mask the tile needs, the cheapest that is exact (in every row of the batch). When every
            query of the block is in one segment and each key of that segment is behind all of them and
            inside all their windows, a key is visible iff it is in the segment: no key is (SKIP: e.g.
            a tile of left padding), every key is (WHOLE), or a per-key mask does (KEYS: a tile that
            starts in the padding). Otherwise the full position rule (FULL: the diagonal, window edges,
            packed rows)."""
            kt_pos, kt_seg = (jax.lax.dynamic_slice_in_dim(x, key_start, tile, axis=1) for x in (kv_pos, kv_seg))
            seg = qb_seg[:, 0, 0][:, None]
            ours = kt_seg == seg
            simple = ((qb_seg[:, :, 0] == seg).all() & (jnp.where(ours, kt_pos, -jnp.inf).max() <= qb_pos.min()))
            if sliding_window is not None:
                simple &= qb_pos.max() - jnp.where(ours, kt_pos, jnp.inf).min() < sliding_window
            kind = jnp.where(ours.all(), WHOLE, jnp.where(ours.any(), KEYS, SKIP))
            return jnp.where(simple, kind, FULL)

        def weighted_values(weights, key_start, rows=rows):
            size = weights.shape[-1]
            vt = jax.lax.dynamic_slice_in_dim(v, key_start, size, axis=2)
            out = jnp.einsum("bkqs,bksd->bkqd", weights.reshape(batch, num_kv_heads, rows * group, size).astype(vt.dtype),
                             vt, preferred_element_type=jnp.float32)
            return out.reshape(batch, num_kv_heads, rows, group, head_dim)

        def visit(carry, key_start, mask=FULL):
            top, total, acc = carry
            scores = tile_scores(key_start, mask=mask)
            new_top = jnp.maximum(top, scores.max(-1))
            weights = jnp.exp(scores - new_top[..., None])
            rescale = jnp.exp(top - new_top)
            acc = acc * rescale[..., None] + weighted_values(weights, key_start)
            return new_top, total * rescale + weights.sum(-1), acc

        def visit_tile(carry, key_start):
            if not skip_masks:
                return visit(carry, key_start), None
            branches = [lambda carry, _: carry] + [functools.partial(visit, mask=m) for m in (WHOLE, KEYS, FULL)]
            return jax.lax.switch(tile_mask(key_start), branches, carry, key_start), None

        if tiles == 1:   # e.g. every block of a short training row: a plain softmax over exactly its keys
            # (not `visit` from an empty carry: its rescaling made the 111M train step ~4% slower)
            scores = tile_scores(first + pad, stop - first)
            top = scores.max(-1)
            weights = jnp.exp(scores - top[..., None])
            total, acc = weights.sum(-1), weighted_values(weights, first + pad)
        else:
            shape = (batch, num_kv_heads, rows, group)
            init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (head_dim,)))
            # Tile j covers padded keys [stop + pad - (tiles - j) * tile, ...): the last ends at `stop`.
            key_starts = jnp.arange(tiles, dtype=jnp.int32) * tile + (stop + pad - tiles * tile)
            (top, total, acc), _ = jax.lax.scan(visit_tile, init, key_starts)
        out = acc / total[..., None]
        blocks.append(jnp.where(top[..., None] > -1e29, out, 0.0))  # no visible key: zeros, as xla_attention
    out = jnp.concatenate(blocks, axis=2).transpose(0, 2, 1, 3, 4)                          # B T Hkv G D
    return out.reshape(batch, seq_len, num_heads, head_dim).astype(dtype)


# --- fused kernels: Pallas splash attention (TPU), cuDNN flash attention (GPU) -------------------------
#
# Both kernels build causality and the window from array *indices* and separate sequences by segment
# id; they never see positions. That equals the position rule above whenever positions advance by one
# per token inside a segment -- true for every training row (packed or padded) and for prefill without
# a cache, the only case ("self-attention": as many keys as queries) in which `auto` picks a kernel.
# Decoding with a KV cache (keys = cache + new tokens, ring-buffer slots out of position order) always
# runs the XLA path.

SPLASH_BLOCK = 512          # MaxText's default tile; long rows use it, shorter ones one tile per row
SPLASH_MIN_BLOCK = 128      # the TPU lane width: splash tiles must be multiples of it


def resolve_impl(impl: str, *, q_len: int, kv_len: int, dtype=jnp.bfloat16, platform: str | None = None) -> str:
    """The implementation `attention` runs for these shapes.

    "splash" / "cudnn" name a preferred kernel; "auto" prefers splash on TPU and cuDNN on GPU (the
    default backend, or `platform`), and on CPU the chunked XLA path for self-attention of at least
    `CHUNKED_MIN_LEN` tokens (it is faster there than the plain path, and never builds the [T, T] scores) and
    `one_query_attention` for a decode step. A kernel runs only for self-attention whose length it tiles
    (a multiple of 128), and cuDNN only in 16-bit dtypes; everything else (decoding with a cache, model
    init on one token, odd lengths, a float32 model on GPU) runs the exact XLA path, so a config that
    names a kernel still decodes. `jaxtrain.aot` names "splash" explicitly when it compiles for a TPU it
    is not running on, so nothing CPU-only leaks into a TPU program.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl == "auto":
        platform = platform or jax.default_backend()
        impl = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")
        if impl == "xla" and q_len >= CHUNKED_MIN_LEN:
            impl = "chunked"
        elif impl == "xla" and q_len == 1:
            return "one_query"  # a CPU decode step; named impls (as `aot` names splash) never get it
    if impl == "chunked":
        return impl if q_len == kv_len else "xla"
    kernel_ok = q_len == kv_len and q_len % SPLASH_MIN_BLOCK == 0
    if impl == "cudnn":
        kernel_ok &= jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return impl if kernel_ok else "xla"


def splash_local_mask(seq_len: int, sliding_window: int | None):
    """Splash's static [T, T] mask for our rule: causal, and i - j < window.

    Splash's `LocalMask((T, T), (left, right), offset=0)` keeps key j for query i iff
    ``i - left <= j <= i + right``; ``left = window - 1, right = 0`` is exactly ``0 <= i - j < window``.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    shape = (seq_len, seq_len)
    if sliding_window is None or sliding_window >= seq_len:
        return mask_lib.CausalMask(shape)
    return mask_lib.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)


def splash_block_sizes(seq_len: int, block: int = SPLASH_BLOCK):
    """Forward and backward tiles: `block` (a multiple of 128), or the whole row when it is shorter."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    if seq_len % SPLASH_MIN_BLOCK:
        raise ValueError(f"splash attention needs a sequence length divisible by {SPLASH_MIN_BLOCK}; got "
                         f"{seq_len} (use a bucket length that is, or attention_impl='xla')")
    b = math.gcd(seq_len, block)
    return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                             block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _splash_kernel(seq_len: int, group: int, sliding_window: int | None, block: int, interpret: bool):
    """A multi-query kernel for one (length, queries per KV head, window). Built in every trace (the
    kernel holds its block tables as arrays of the trace that made it); the expensive part, turning
    the mask into block tables (seconds at 32K tokens), is cached by splash itself on the mask's hash."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    mask = mask_lib.MultiHeadMask([splash_local_mask(seq_len, sliding_window)] * group)
    return splash.make_splash_mqa_single_device(mask=mask, block_sizes=splash_block_sizes(seq_len, block),
                                                interpret=interpret)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, sliding_window, block, interpret):
    """Splash on one device's shard. GQA: each KV head is a multi-query problem over its query group."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    kernel = _splash_kernel(seq_len, group, sliding_window, block, interpret)
    # Splash does not scale the logits; fold 1/sqrt(D) into q (in float32, then back to q's dtype).
    q = (q.astype(jnp.float32) / np.sqrt(head_dim)).astype(q.dtype)
    q = q.reshape(batch, seq_len, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)  # B Hkv G T D
    k = k.transpose(0, 2, 1, 3)                                                             # B Hkv S D
    v = v.transpose(0, 2, 1, 3)
    segments = splash.SegmentIds(q=q_segment_ids, kv=kv_segment_ids)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv_head, in_axes=(0, 0, 0, 0))(q, k, v, segments)                    # B Hkv G T D
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq_len, num_heads, head_dim).astype(q.dtype)


def _axes_size(mesh, axes) -> int:
    """Devices along mesh axis name(s) `axes` (a name or a tuple of names)."""
    return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))


def _activation_spec(names):
    """Mesh axes of an activation from its logical names under the active Flax rules (None without)."""
    import flax.linen as nn

    spec = nn.logical_to_mesh_axes(names)
    return jax.sharding.PartitionSpec(*(() if spec is None else spec))


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, sliding_window, *, block: int = SPLASH_BLOCK,
                     interpret: bool = False):
    """Pallas splash attention (TPU): causal + sliding window + segment ids, GQA, float32 softmax.

    Under a mesh (``jax.set_mesh``) the kernel runs per shard through `jax.shard_map`: batch and heads
    split the way the active logical-axis rules split ("batch", "heads"); the sequence stays whole on
    each device (splash cannot split the keys). `block` is the tile edge (default `SPLASH_BLOCK`);
    `interpret=True` runs the kernel's Pallas interpreter, which is how the CPU tests check it against
    the XLA path.
    """
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"splash attention is self-attention only; got {q.shape[1]} queries and "
                         f"{k.shape[1]} keys")
    local = functools.partial(_splash_local, sliding_window=sliding_window, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    P = jax.sharding.PartitionSpec
    q_spec = _activation_spec(("batch", "length", "heads", "head_dim"))
    kv_spec = _activation_spec(("batch", "length", "kv_heads", "head_dim"))
    batch_axes = q_spec[0] if len(q_spec) else None
    if batch_axes is not None and q.shape[0] % _axes_size(mesh, batch_axes):
        batch_axes = None  # e.g. one 24K prompt on a v5e-8: every chip runs the row for its own heads
    q_spec = P(batch_axes, None, q_spec[2] if len(q_spec) > 2 else None, None)
    kv_spec = P(batch_axes, None, kv_spec[2] if len(kv_spec) > 2 else None, None)
    seg_spec = P(batch_axes, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def cudnn_attention(q, k, v, q_segment_ids, kv_segment_ids, sliding_window, *, implementation="cudnn"):
    """cuDNN flash attention through `jax.nn.dot_product_attention` (GPU).

    Causality and the window are the kernel's own (``local_window_size=(window - 1, 0)`` keeps
    ``0 <= i - j < window``); segments enter as a [B, 1, T, S] boolean mask. `implementation="xla"`
    runs JAX's reference of the same call, which is how the CPU tests check the argument mapping.
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    same_segment = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
    out = jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=True, local_window_size=window,
                                       implementation=implementation)
    return out.astype(q.dtype)
