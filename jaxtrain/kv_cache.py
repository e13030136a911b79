"""The KV cache of decoding: a ring buffer per layer, the slots it writes, and each layer's view of it.

`positions[b, s]` is the absolute position stored in slot s (-1 when empty); a token at position p lives
in slot p % size, so a buffer the size of the sliding window is enough for any length (what the window
mask drops is what the ring has overwritten). Keys and values are held in one of two layouts:

* stacked, [layers, B, size, Hkv, D] each: what the layer scan of `jaxtrain.generate` carries, donated
  and updated in place (TPU, GPU, and CPU under a mesh);
* per layer, a tuple of [B, size, Hkv, D] buffers, with the weights split the same way
  (`unstack_layers`): on XLA:CPU, which copies a layer's slice out of a stacked array before each
  matmul (0.75 GB a step for a 100M model at batch 8 with 4K keys), the layers run as a Python loop
  over buffers of their own.

`LayerCache` is what the model's `Attention` receives as `kv_cache`: it stores a step's keys and values
and returns everything the step attends over. How depends on the step, decided here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.config import ModelConfig


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> dict:
    """An empty cache holding up to `max_len` tokens, or only the sliding window when that is shorter."""
    size = max_len if config.sliding_window is None else min(max_len, config.sliding_window)
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, size, config.num_kv_heads, config.head_dim)
    if per_layer:
        k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)) for _ in "kv")
    else:
        k, v = (jnp.zeros((config.num_layers,) + shape, dtype) for _ in "kv")
    return {"k": k, "v": v, "positions": jnp.full((batch, size), -1, jnp.int32)}


def constrain_cache(cache: dict) -> dict:
    """The cache laid out by its logical axes, the same going into a step as coming out (under a mesh),
    so that a donated cache can be updated in place rather than resharded into a new buffer."""
    kv_axes = ("layers", "batch", "length", "kv_heads", "head_dim")

    def constrain(a):
        return nn.with_logical_constraint(a, kv_axes[-a.ndim:])

    return {"k": jax.tree.map(constrain, cache["k"]), "v": jax.tree.map(constrain, cache["v"]),
            "positions": nn.with_logical_constraint(cache["positions"], ("batch", "length"))}


def _cache_slots(size: int, positions, segment_ids):
    """Slot of each new token, or `size` (dropped by the scatter) for padding and for tokens that a later
    token of the same step overwrites, so no slot is written twice in one scatter."""
    last = jnp.max(jnp.where(segment_ids != 0, positions, -1), axis=1, keepdims=True)
    keep = (segment_ids != 0) & (positions > last - size)
    return jnp.where(keep, positions % size, size)


def write_positions(cache_positions, positions, segment_ids):
    """The slot positions after a step's tokens are written."""
    size = cache_positions.shape[1]
    slots = _cache_slots(size, positions, segment_ids)
    rows = jnp.arange(positions.shape[0])[:, None]
    return cache_positions.at[rows, slots].set(positions, mode="drop")


def _put(buffer, index, new):
    return buffer.at[index].set(new.astype(buffer.dtype), mode="drop")


def write_stacked(k_stack, v_stack, layer, k, v, positions, segment_ids):
    """Stacked buffers with new keys and values scattered into their slots (in place) at `layer`: an
    index, or slice(None) for every layer at once (k, v: [layers, B, T, Hkv, D], a decode step's)."""
    slots = _cache_slots(k_stack.shape[2], positions, segment_ids)
    rows = jnp.arange(positions.shape[0])[:, None]
    return _put(k_stack, (layer, rows, slots), k), _put(v_stack, (layer, rows, slots), v)


def write_buffer(k_buf, v_buf, k, v, positions, segment_ids):
    """One layer's own buffers with new keys and values scattered into their slots (in place).

    A single token (batch 1, one step) gets a second update that is dropped: XLA turns a one-update
    scatter into a dynamic-update-slice, for which XLA:CPU copied the buffer (at batch 1 a 100M model's
    decode step took 42 instead of 25 ms)."""
    size = k_buf.shape[1]
    slots = _cache_slots(size, positions, segment_ids)
    rows = jnp.arange(positions.shape[0])[:, None]
    if slots.size == 1:
        rows, slots = jnp.concatenate([rows, rows], 1), jnp.concatenate([slots, jnp.full_like(slots, size)], 1)
        k, v = (jnp.concatenate([t, t], axis=1) for t in (k, v))
    return _put(k_buf, (rows, slots), k), _put(v_buf, (rows, slots), v)


@flax.struct.dataclass
class LayerCache:
    """One layer's view of the cache for one forward step (the model's `Attention` calls `update`).

    `k`, `v`: the layer's own buffers [B, size, Hkv, D], or the whole stack with `layer` its index.
    `held`: the slot positions before this step, None while the cache is empty (a prefill, which then
    attends over its own keys only: half the work, and a fused kernel). `write`: store the step's keys
    now; False in a decode step of the layer scan, which reads the stack as a broadcast and leaves the
    step's keys in `new` for the caller to write for all layers after the loop (carried through a
    one-token step instead, XLA:CPU copied the whole stack twice in every layer)."""

    k: Any
    v: Any
    held: Any = None
    layer: Any = None
    new: Any = None
    write: bool = flax.struct.field(pytree_node=False, default=True)

    def _held_layer(self):
        return (self.k, self.v) if self.layer is None else (self.k[self.layer], self.v[self.layer])

    def _store(self, k, v, positions, segment_ids) -> LayerCache:
        if self.layer is None:
            return self.replace(**dict(zip("kv", write_buffer(self.k, self.v, k, v, positions, segment_ids))))
        return self.replace(**dict(zip("kv", write_stacked(self.k, self.v, self.layer, k, v, positions, segment_ids))))

    def update(self, k, v, positions, segment_ids):
        """(keys, values, their positions, their segment ids, updated view) for this step's k, v [B, T, Hkv, D]."""
        if self.held is None:
            return k, v, positions, segment_ids, (self._store(k, v, positions, segment_ids) if self.write else self)
        if self.write and self.layer is None and k.shape[1] == 1:
            # A one-token step over a layer's own buffer: write the key first, then attend over the buffer.
            # The old buffer then has one reader, the write, which XLA does in place; written after the
            # read instead, the buffer was copied in every layer of every step. (The ring buffer's
            # overwritten slot held position p - window, which the window mask drops anyway.)
            view = self._store(k, v, positions, segment_ids)
            kv_positions = write_positions(self.held, positions, segment_ids)
            return view.k, view.v, kv_positions, (kv_positions >= 0).astype(jnp.int32), view
        # What the cache held plus this step's own keys, as two parts (the CPU decode step reads them in
        # place; other paths concatenate them); the window mask drops what the ring has moved past.
        held_k, held_v = self._held_layer()
        keys, values = (held_k, k.astype(held_k.dtype)), (held_v, v.astype(held_v.dtype))
        kv_positions = jnp.concatenate([self.held, positions], axis=1)
        kv_segments = jnp.concatenate([(self.held >= 0).astype(jnp.int32), segment_ids], axis=1)
        view = self._store(k, v, positions, segment_ids) if self.write else self.replace(new={"k": k, "v": v})
        return keys, values, kv_positions, kv_segments, view


def unstack_layers(tree):
    """A parameter (or "lora") tree whose layer stack is split into one tree per layer, `layers_0` ...:
    the per-layer layout of decoding on XLA:CPU (see the module docstring)."""
    layers = tree["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    rest = {name: value for name, value in tree.items() if name != "layers"}
    return rest | {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count)}


def is_per_layer(tree) -> bool:
    return "layers_0" in tree
