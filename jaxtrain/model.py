"""Mistral in Flax, readable top to bottom: embedding → N × (attention + SwiGLU MLP) → norm → LM head.

Three things keep it faithful to the released checkpoints, as `transformers`' PyTorch Mistral (our
reference in the parity tests) computes them: RoPE theta and the sliding window come from the config,
RMSNorm normalises in float32, and attention masks by positions (`jaxtrain.attention`).

Mechanisms for scale, MaxText-style: every parameter carries logical axis names (mapped to mesh axes by
the one rules table in `jaxtrain.sharding`), key activations are constrained by logical names too, the
layers run under `nn.scan` (compile time independent of depth) with a named remat policy, and parameters
are stored in `param_dtype` (fp32 master weights) while matmuls run in `dtype` (bf16).

The same module serves training (no cache) and decoding (a KV ring buffer of all layers, see `init_cache`,
updated in place: the layer scan carries it whole and each layer writes only its new keys and values).
Eval's decoding on XLA:CPU instead holds weights and cache one buffer per layer (`per_layer`,
`unstack_layers`), since XLA:CPU copies a layer's slice out of a stacked array before every matmul.
Every projection goes through `_project`, the one place where int8 base weights (`jaxtrain.quant`) and
low-rank adapters (`jaxtrain.lora`, a separate "lora" collection) enter.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtrain import lora as lora_lib
from jaxtrain import quant
from jaxtrain.attention import attention
from jaxtrain.config import MistralConfig
from jaxtrain.lora import Adapters, LoraConfig

Params = Any
init_normal = nn.initializers.normal(stddev=0.02)

# Names of the activations a remat policy may keep (see `remat_policy`).
QKV, ATTN_OUT, MLP_HIDDEN, LAYER_INPUT = "qkv_proj", "attn_out", "mlp_hidden", "decoder_layer_input"


def remat_policy(name: str):
    """Named rematerialisation policies: what the backward pass may reuse instead of recomputing."""
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "save_dots": policies.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": policies.save_only_these_names(QKV),
        "save_out_proj": policies.save_only_these_names(QKV, ATTN_OUT),
        "offload_dots": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[QKV, ATTN_OUT, MLP_HIDDEN],
            offload_src="device", offload_dst="pinned_host"),
        "offload_input": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device", offload_dst="pinned_host"),
    }[name]


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init=init_normal):
    cfg = module.config
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))


def _compute(x, cfg: MistralConfig):
    return x.astype(jnp.dtype(cfg.dtype))


def on_device(w):
    """`w` (an array or an int8 `QArray`) copied to the accelerator when it lives in host memory.

    A LoRA run may keep its frozen base in host memory (`jaxtrain.lora.base_shardings(on_host=True)`):
    inside the layer scan each layer's weights are then read from the host where they are used, one
    layer at a time (again in the rematerialised backward pass), so HBM never holds the whole base.
    """
    def move(a):
        return jax.device_put(a, jax.memory.Space.Device) if jax.typeof(a).memory_space == jax.memory.Space.Host else a
    return jax.tree.map(move, w)


def _project(module: nn.Module, name: str, spec: str, x, shape: tuple[int, ...], axes: tuple[str, ...]):
    """x times the weight `name` (einsum `spec`, weight input dims first): an int8 weight is dequantised
    inside the matmul, and the LoRA branch is added when the module's `lora` config adapts `name`."""
    w = on_device(_param(module, name, shape, axes))
    y = quant.einsum(spec, x, w, jnp.dtype(module.config.dtype))
    if module.lora is not None and module.lora.adapts(name):
        y = y + lora_lib.branch(module, name, spec, x, shape, axes)
    return y


class RMSNorm(nn.Module):
    config: MistralConfig

    @nn.compact
    def __call__(self, x):
        weight = _param(self, "weight", (x.shape[-1],), ("embed",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


def rotary(x, positions, theta: float):
    """Rotary embedding of x [B, T, H, D] at integer positions [B, T] (the rotate-half layout of HF)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
    config: MistralConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids, rows: int, cache=None, layer=None, cache_positions=None,
                 write: bool = True):
        """Output [B, rows, D] for the last `rows` rows of x (queries of those only), keys and values of all.

        `cache` (`init_cache`'s keys and values, stacked or per layer) holds earlier tokens at
        `cache_positions` (None while it is empty); this layer (index `layer`) reads its own part and,
        with `write`, writes its keys and values into it. Without `write` (a decode step of the layer scan,
        which reads the cache as a broadcast) the caller writes them after the loop.
        Returns (output, cache, {"k": keys, "v": values})."""
        cfg = self.config
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        first = x.shape[1] - rows
        q = _project(self, "wq", "btd,dhk->bthk", x[:, first:], (d, h, hd), ("embed", "heads", "head_dim"))
        k = _project(self, "wk", "btd,dhk->bthk", x, (d, kvh, hd), ("embed", "kv_heads", "head_dim"))
        v = _project(self, "wv", "btd,dhk->bthk", x, (d, kvh, hd), ("embed", "kv_heads", "head_dim"))
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q, k, v = (checkpoint_name(t, QKV) for t in (q, k, v))
        q = rotary(q, positions[:, first:], cfg.rope_theta)
        k = rotary(k, positions, cfg.rope_theta)

        kv_positions, kv_segments, keys, values = positions, segment_ids, k, v
        written = False
        if cache_positions is not None and write and x.shape[1] == 1:
            # A one-token step over a carried cache (per layer): write the key first, then attend over
            # the buffer. The old buffer then has one reader, the write, which XLA does in place; written
            # after the read instead, the buffer was copied in every layer of every step. (The ring
            # buffer's overwritten slot held position p - window, which the window mask drops anyway.)
            cache, written = write_cache(cache, layer, k, v, positions, segment_ids), True
            keys, values = cache["k"][layer], cache["v"][layer]
            kv_positions = write_positions(cache_positions, positions, segment_ids)
            kv_segments = (kv_positions >= 0).astype(jnp.int32)
        elif cache_positions is not None:
            # What the cache held before this step plus this step's own keys, given as two parts (the
            # CPU decode step reads them in place; other paths concatenate them); the window mask drops
            # whatever the ring buffer has already moved past. (A prefill into an empty cache passes no
            # positions and attends over its own keys only: half the work, and a fused kernel.)
            held_k, held_v = cache["k"][layer], cache["v"][layer]
            keys, values = (held_k, k.astype(held_k.dtype)), (held_v, v.astype(held_v.dtype))
            kv_positions = jnp.concatenate([cache_positions, positions], axis=1)
            kv_segments = jnp.concatenate([(cache_positions >= 0).astype(jnp.int32), segment_ids], axis=1)
        out = attention(q, keys, values, q_positions=positions[:, first:], kv_positions=kv_positions,
                        q_segment_ids=segment_ids[:, first:], kv_segment_ids=kv_segments,
                        sliding_window=cfg.sliding_window, impl=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = _project(self, "wo", "bthk,hkd->btd", out, (h, hd, d), ("heads", "head_dim", "embed"))
        if cache is not None and write and not written:
            cache = write_cache(cache, layer, k, v, positions, segment_ids)
        return checkpoint_name(out, ATTN_OUT), cache, {"k": k, "v": v}


class MLP(nn.Module):
    config: MistralConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d, f = cfg.hidden_size, cfg.intermediate_size
        gate = _project(self, "gate", "btd,df->btf", x, (d, f), ("embed", "mlp"))
        up = _project(self, "up", "btd,df->btf", x, (d, f), ("embed", "mlp"))
        hidden = nn.silu(gate) * up
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = checkpoint_name(hidden, MLP_HIDDEN)
        return _project(self, "down", "btf,fd->btd", hidden, (f, d), ("mlp", "embed"))


def on_xla_cpu(config: MistralConfig) -> bool:
    """The model runs its "auto" attention on the CPU backend (tests, the CPU demo, bench/), where two
    choices differ; `jaxtrain.aot` names a TPU kernel, so a TPU program compiled here never gets them."""
    return config.attention_impl == "auto" and jax.default_backend() == "cpu"


class DecoderLayer(nn.Module):
    """One pre-norm block; shaped `(carry, scanned) -> (carry, scanned)` for `nn.scan`.

    The carry is the hidden state and, for a prefill, the whole KV cache (None when training): a cache
    scanned in and out layer by layer would be a second, stacked copy of it; carried, XLA updates the
    donated buffer in place. A decode step of the scan instead reads the cache as a broadcast
    (`step_cache`) and scans out only its one new key and value per layer, written for all layers after
    the loop: carried through a one-token step, XLA:CPU copied the whole stacked cache twice in every
    layer. (Per-layer buffers, which no loop holds, are carried in every case: see `Attention`.)

    `rows`: compute the output for the last `rows` rows only (the final layer of a per-layer model when a
    prefill wants one row or a continuation score its span; its keys and values still cover every row).
    """

    config: MistralConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, carry, layer, positions, segment_ids, cache_positions, step_cache, rows=None):
        x, cache = carry
        x = checkpoint_name(x, LAYER_INPUT)
        rows = x.shape[1] if rows is None else min(rows, x.shape[1])
        out, cache, new_kv = Attention(self.config, self.lora, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x), positions, segment_ids, rows,
            cache if step_cache is None else step_cache, layer, cache_positions, write=step_cache is None)
        x = x[:, x.shape[1] - rows:] + out
        x = x + MLP(self.config, self.lora, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if step_cache is not None:   # the new keys and values leave the scan; the caller writes them
            return (x, None), new_kv
        return (x, cache), None


def scan_unroll(config: MistralConfig) -> int:
    """Layers per iteration of the layer scan: one (compile time independent of depth), except for a
    model of up to 8 layers on XLA:CPU: there the loop's stacked residuals and their zero-filled buffers
    cost a quarter of the 2-layer demo model's train step and 10% of a 111M model's (8 layers); unrolled,
    the parameters keep their stacked layout. (Eval's decoding on CPU runs `per_layer`, with no scan.)"""
    return config.num_layers if on_xla_cpu(config) and config.num_layers <= 8 else 1


class Mistral(nn.Module):
    """The model; `per_layer` is the layout of eval's decoding on XLA:CPU (`eval.decode.Generator`).

    `per_layer`: each layer's weights (`unstack_layers`) and KV cache (`init_cache(per_layer=True)`) are
    buffers of their own and the layers a Python loop. Why: XLA:CPU copies a layer's slice out of a
    stacked array before each matmul (dynamic slices in the scan, static ones unrolled alike): 0.75 GB a
    step for the 100M bench model at batch 8 with 4K keys, whose decode step per layer takes 83 instead of
    153 ms (25 instead of 35 at batch 1). The final layer then also computes only the rows the caller
    keeps (`last`): half of a 2-layer model's 4K prefill. (On TPU a `cond` doing that inside the scan
    raised a prefill's temporaries by 0.8-3 GiB to save 1/32 of its FLOPs.) Not for training: no remat.
    """

    config: MistralConfig
    lora: LoraConfig | None = None   # adapters in the "lora" collection (jaxtrain.lora)
    per_layer: bool = False

    def setup(self):
        cfg = self.config
        if self.per_layer:
            self.layer_list = [DecoderLayer(cfg, self.lora, name=f"layers_{i}") for i in range(cfg.num_layers)]
        else:
            layer = DecoderLayer
            if cfg.remat != "none":
                layer = nn.remat(layer, policy=remat_policy(cfg.remat), prevent_cse=False)
            self.layers = nn.scan(
                layer, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 4, length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"}, unroll=scan_unroll(cfg))(cfg, self.lora, name="layers")
        self.embed = self.param("embed", nn.with_logical_partitioning(init_normal, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head_kernel = self.param(
                "lm_head", nn.with_logical_partitioning(init_normal, ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))

    def hidden_states(self, input_ids, positions, segment_ids, cache=None, empty_cache: bool = False,
                      last: int | None = None):
        """Final-norm hidden states [B, T, D] (and the updated cache when decoding).

        `empty_cache`: the cache holds nothing yet (a prefill), so there is nothing in it to attend to.
        `last`: return only the last `last` positions [B, last, D] (which a `per_layer` model's final layer
        then computes alone); the cache still gets every position's keys and values.
        """
        cfg = self.config
        x = _compute(jnp.take(on_device(self.embed), input_ids, axis=0), cfg)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        kv, cache_positions = None, None
        if cache is not None:
            cache = constrain_cache(cache)
            kv = {"k": cache["k"], "v": cache["v"]}
            cache_positions = None if empty_cache else cache["positions"]
        layer_index = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        if self.per_layer:
            for i, layer in enumerate(self.layer_list):
                rows = last if i == cfg.num_layers - 1 else None
                (x, kv), _ = layer((x, kv), i, positions, segment_ids, cache_positions, None, rows)
        elif cache_positions is not None and input_ids.shape[1] == 1:   # a decode step of the scan
            (x, _), step_kv = self.layers((x, None), layer_index, positions, segment_ids, cache_positions, kv)
            kv = write_cache(kv, slice(None), step_kv["k"], step_kv["v"], positions, segment_ids)
        else:
            (x, kv), _ = self.layers((x, kv), layer_index, positions, segment_ids, cache_positions, None)
        x = self.final_norm(x if last is None else x[:, -last:])
        if cache is None:
            return x, None
        return x, constrain_cache({**kv, "positions": write_positions(cache["positions"], positions, segment_ids)})

    def logits(self, hidden):
        """Vocabulary logits in float32 for any [..., D] slice of hidden states (answer-only losses)."""
        kernel = on_device(self.embed).T if self.config.tie_word_embeddings else on_device(self.lm_head_kernel)
        logits = jnp.einsum("...d,dv->...v", hidden, _compute(kernel, self.config),
                            preferred_element_type=jnp.float32)
        return logits

    def __call__(self, input_ids, positions, segment_ids, cache=None):
        hidden, new_cache = self.hidden_states(input_ids, positions, segment_ids, cache)
        logits = nn.with_logical_constraint(self.logits(hidden), ("batch", "length", "vocab"))
        return logits, new_cache


# --- KV cache: a ring buffer per layer (stacked), shared slot positions --------------------------------

def init_cache(config: MistralConfig, batch: int, max_len: int, dtype=None, per_layer: bool = False) -> dict:
    """An empty cache holding up to `max_len` tokens, or only the sliding window when that is shorter.

    `positions[b, s]` is the absolute position stored in slot s (-1 when empty); a token at position p
    lives in slot p % size, which is what makes a window-sized buffer enough for any length. Keys and
    values: one [layers, B, size, Hkv, D] array each, or with `per_layer` (for `Mistral(per_layer=True)`)
    a tuple of [B, size, Hkv, D] buffers.
    """
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
    size = cache_positions.shape[1]
    slots = _cache_slots(size, positions, segment_ids)
    rows = jnp.arange(positions.shape[0])[:, None]
    return cache_positions.at[rows, slots].set(positions, mode="drop")


def write_cache(cache, layer, k, v, positions, segment_ids):
    """The cache with layer `layer`'s new keys and values scattered into their slots (in place). Stacked,
    `layer` = slice(None) writes every layer's at once (k, v: [layers, B, T, Hkv, D], a decode step's);
    per layer (tuples of buffers), `layer` is a Python int and only that layer's buffers change.

    A per-layer write of a single token (batch 1, one step) gets a second update that is dropped: XLA
    turns a one-update scatter into a dynamic-update-slice, for which XLA:CPU copied the buffer (at batch
    1 a 100M model's decode step took 42 instead of 25 ms)."""
    size = cache["k"][0].shape[1]
    slots = _cache_slots(size, positions, segment_ids)
    rows = jnp.arange(positions.shape[0])[:, None]

    def put(buffer, index, new):
        return buffer.at[index].set(new.astype(buffer.dtype), mode="drop")

    if not isinstance(cache["k"], tuple):
        return {name: put(cache[name], (layer, rows, slots), new) for name, new in (("k", k), ("v", v))}
    if slots.size == 1:
        rows, slots = jnp.concatenate([rows, rows], 1), jnp.concatenate([slots, jnp.full_like(slots, size)], 1)
        k, v = (jnp.concatenate([t, t], axis=1) for t in (k, v))
    return {name: tuple(put(b, (rows, slots), new) if i == layer else b for i, b in enumerate(cache[name]))
            for name, new in (("k", k), ("v", v))}


# --- Functional API -----------------------------------------------------------------------------------

def unstack_layers(tree):
    """A parameter (or "lora") tree whose layer stack is split into one tree per layer, `layers_0` ...:
    the layout of `Mistral(per_layer=True)` (see there why)."""
    layers = tree["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    rest = {name: value for name, value in tree.items() if name != "layers"}
    return rest | {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], layers) for i in range(count)}


def is_per_layer(tree) -> bool:
    return "layers_0" in tree


def _default_inputs(input_ids, positions, segment_ids):
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    return positions, segment_ids


def init_params(config: MistralConfig, rng) -> Params:
    """Random parameters (unboxed arrays); use `param_logical_axes` for their logical sharding names."""
    return nn.meta.unbox(_init_boxed(config, rng))


def _init_boxed(config, rng):
    ids = jnp.zeros((1, 1), jnp.int32)
    return Mistral(config).init(rng, ids, *_default_inputs(ids, None, None))["params"]


def param_logical_axes(config: MistralConfig) -> Params:
    """The logical axis names of every parameter, as `PartitionSpec`s of names."""
    boxed = jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(config: MistralConfig) -> Params:
    return nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def apply(config: MistralConfig, params: Params, *args, adapters: Adapters | None = None, dropout_rng=None,
          method=None, **kwargs):
    """`Mistral.apply` with optional LoRA adapters; `dropout_rng` turns on their dropout (training);
    `args` / `kwargs` go to `method`. Parameters from `unstack_layers` run the `per_layer` model."""
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters.params}
    net = Mistral(config, lora=None if adapters is None else adapters.config, per_layer=is_per_layer(params))
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return net.apply(variables, *args, rngs=rngs, method=method, **kwargs)


def forward(config: MistralConfig, params: Params, input_ids, *, positions=None, segment_ids=None,
            adapters: Adapters | None = None):
    """Logits [B, T, vocab] in float32. Padding: give it segment id 0 (its logits are meaningless)."""
    positions, segment_ids = _default_inputs(input_ids, positions, segment_ids)
    logits, _ = apply(config, params, input_ids, positions, segment_ids, adapters=adapters)
    return logits


def hidden_states(config: MistralConfig, params: Params, input_ids, *, positions=None, segment_ids=None,
                  adapters: Adapters | None = None, dropout_rng=None):
    positions, segment_ids = _default_inputs(input_ids, positions, segment_ids)
    hidden, _ = apply(config, params, input_ids, positions, segment_ids, adapters=adapters,
                      dropout_rng=dropout_rng, method=Mistral.hidden_states)
    return hidden


def logits_from_hidden(config: MistralConfig, params: Params, hidden):
    return Mistral(config, per_layer=is_per_layer(params)).apply({"params": params}, hidden, method=Mistral.logits)
