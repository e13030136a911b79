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
    def __call__(self, x, positions, segment_ids, rows: int, held=None, layer=None, cache_positions=None):
        """Output for the last `rows` rows of x (queries of those only); keys and values of every row.

        `held` (with `cache_positions`): the stacked cache of earlier tokens, of which this layer (index
        `layer`) attends to its own slice. Returns (output [B, rows, D], keys, values), the caller writing
        the keys and values into the cache."""
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
        if cache_positions is not None:
            # Attend over what the cache held before this step plus this step's own keys, given as two
            # parts (the CPU decode step reads them in place; other paths concatenate them); the window
            # mask drops whatever the ring buffer has already moved past. (A prefill into an empty cache
            # passes no positions and attends over its own keys only: half the work, and a fused kernel.)
            keys = (held["k"][layer], k.astype(held["k"].dtype))
            values = (held["v"][layer], v.astype(held["v"].dtype))
            kv_positions = jnp.concatenate([cache_positions, positions], axis=1)
            kv_segments = jnp.concatenate([(cache_positions >= 0).astype(jnp.int32), segment_ids], axis=1)
        out = attention(q, keys, values, q_positions=positions[:, first:], kv_positions=kv_positions,
                        q_segment_ids=segment_ids[:, first:], kv_segment_ids=kv_segments,
                        sliding_window=cfg.sliding_window, impl=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = _project(self, "wo", "bthk,hkd->btd", out, (h, hd, d), ("heads", "head_dim", "embed"))
        return checkpoint_name(out, ATTN_OUT), k, v


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
    donated buffer in place. A decode step instead reads the cache as a broadcast (`step_cache`) and
    scans out only its one new key and value per layer, written for all layers after the loop: carried
    through a one-token step, XLA:CPU copied the whole stacked cache twice in every layer.

    `last`: only the last `last` rows of the final layer's output are wanted (a prefill wants one, a
    continuation score its span). On XLA:CPU the final layer then computes queries, attention output and
    MLP for those rows alone (its keys and values still cover every row, for the cache): a `cond` on the
    layer index, since scanned layers share one body; a 2-layer model's 4K prefill takes half the time.
    Not on TPU: there the `cond` in the layer loop raised a prefill's temporaries (Mistral 7B, v5e-1,
    8 x 4096 tokens: 1.75 -> 2.59 GiB; v5e-8 at 32K: 3 GiB more than the decode chunk) to save 1/32 of
    its FLOPs.
    """

    config: MistralConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, carry, layer, positions, segment_ids, cache_positions, step_cache, last):
        x, cache = carry
        x = checkpoint_name(x, LAYER_INPUT)
        length = x.shape[1]
        held = cache if step_cache is None else step_cache

        def rows_out(module, x, rows):
            """The layer's output with only the last `rows` rows computed (the rest passed through)."""
            attn = Attention(module.config, module.lora, name="attn")
            out, k, v = attn(RMSNorm(module.config, name="attn_norm")(x), positions, segment_ids, rows, held, layer,
                             cache_positions)
            y = x[:, length - rows:] + out
            y = y + MLP(module.config, module.lora, name="mlp")(RMSNorm(module.config, name="mlp_norm")(y))
            return (y if rows == length else x.at[:, length - rows:].set(y)), k, v

        if last is None or last >= length or not on_xla_cpu(self.config):
            x, k, v = rows_out(self, x, length)
        else:
            x, k, v = nn.cond(layer == self.config.num_layers - 1, functools.partial(rows_out, rows=last),
                              functools.partial(rows_out, rows=length), self, x)
        if cache is not None:
            cache = write_cache(cache, layer, k, v, positions, segment_ids)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return (x, cache), None if step_cache is None else {"k": k, "v": v}


def scan_unroll(config: MistralConfig, decoding: bool = False) -> int:
    """Layers per iteration of the layer scan: one (compile time independent of depth), except when
    training a model of up to 8 layers on XLA:CPU: there the loop's stacked residuals and their zero-filled
    buffers cost a quarter of the 2-layer demo model's step and 10% of a 111M model's (8 layers); unrolled,
    the parameters keep their stacked layout. Decoding keeps the loop: unrolled, a decode step took 65
    instead of 35 ms (8 layers) and 1.2 instead of 0.9 ms (2 layers)."""
    return config.num_layers if on_xla_cpu(config) and not decoding and config.num_layers <= 8 else 1


class Mistral(nn.Module):
    config: MistralConfig
    lora: LoraConfig | None = None   # adapters in the "lora" collection (jaxtrain.lora)
    decoding: bool = False           # run by eval.decode (prefill, decode steps, scoring): see `scan_unroll`

    def setup(self):
        cfg = self.config
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=remat_policy(cfg.remat), prevent_cse=False,
                             static_argnums=(7,))   # `last` (a Python int or None)
        self.layers = nn.scan(
            layer, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(0,) + (nn.broadcast,) * 5, length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
            unroll=scan_unroll(cfg, self.decoding))(cfg, self.lora, name="layers")
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
        `last`: return only the last `last` positions [B, last, D], which the final layer then computes
        alone (see `DecoderLayer`); the cache still gets every position's keys and values.
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
        if cache_positions is not None and input_ids.shape[1] == 1:   # a decode step
            (x, _), step_kv = self.layers((x, None), layer_index, positions, segment_ids, cache_positions, kv, last)
            kv = write_cache(kv, slice(None), step_kv["k"], step_kv["v"], positions, segment_ids)
        else:
            (x, kv), _ = self.layers((x, kv), layer_index, positions, segment_ids, cache_positions, None, last)
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

def init_cache(config: MistralConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty cache holding up to `max_len` tokens, or only the sliding window when that is shorter.

    `positions[b, s]` is the absolute position stored in slot s (-1 when empty); a token at position p
    lives in slot p % size, which is what makes a window-sized buffer enough for any length.
    """
    size = max_len if config.sliding_window is None else min(max_len, config.sliding_window)
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "positions": jnp.full((batch, size), -1, jnp.int32)}


def constrain_cache(cache: dict) -> dict:
    """The cache laid out by its logical axes, the same going into a step as coming out (under a mesh),
    so that a donated cache can be updated in place rather than resharded into a new buffer."""
    kv_axes = ("layers", "batch", "length", "kv_heads", "head_dim")
    return {"k": nn.with_logical_constraint(cache["k"], kv_axes),
            "v": nn.with_logical_constraint(cache["v"], kv_axes),
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
    """The stacked cache with layer `layer`'s new keys and values scattered into their slots (in place);
    `layer` = slice(None) writes every layer's at once (k, v: [layers, B, T, Hkv, D], a decode step's)."""
    size = cache["k"].shape[2]
    slots = _cache_slots(size, positions, segment_ids)
    rows = jnp.arange(positions.shape[0])[:, None]
    return {"k": cache["k"].at[layer, rows, slots].set(k.astype(cache["k"].dtype), mode="drop"),
            "v": cache["v"].at[layer, rows, slots].set(v.astype(cache["v"].dtype), mode="drop")}


# --- Functional API -----------------------------------------------------------------------------------

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
          method=None, decoding: bool = False, **kwargs):
    """`Mistral.apply` with optional LoRA adapters; `dropout_rng` turns on their dropout (training);
    `decoding`: called by eval.decode; `args` / `kwargs` go to `method`."""
    variables = {"params": params} if adapters is None else {"params": params, "lora": adapters.params}
    net = Mistral(config, lora=None if adapters is None else adapters.config, decoding=decoding)
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
    return Mistral(config).apply({"params": params}, hidden, method=Mistral.logits)
