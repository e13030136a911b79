"""The Llama-family decoder (Llama 2/3.x, Qwen2/2.5, Mistral) in Flax, readable top to bottom: embedding →
N × (attention + SwiGLU MLP) → norm → LM head.

Three things keep it faithful to the released checkpoints, as `transformers`' PyTorch models (our reference
in the parity tests) compute them: RoPE (theta, Llama 3.1's scaling) and the sliding window come from the
config, RMSNorm normalises in float32, and attention masks by positions (`jaxtrain.attention`). Qwen2's
q/k/v biases are the only architectural branch.

Mechanisms for scale, MaxText-style: every parameter carries logical axis names (mapped to mesh axes by
the one rules table in `jaxtrain.sharding`), key activations are constrained by logical names too, the
layers run under `nn.scan` (compile time independent of depth) with a named remat policy, and parameters
are stored in `param_dtype` (fp32 master weights) while matmuls run in `dtype` (bf16).

This is the training forward pass. Decoding reuses `DecoderLayer` with a KV cache (`jaxtrain.kv_cache`,
driven by `jaxtrain.generate`): `Attention` takes the layer's view of the cache as `kv_cache`, the one
place where earlier tokens' keys and values can enter. Every projection goes through `_project`, the one
place where int8 base weights (`jaxtrain.quant`) and low-rank adapters (`jaxtrain.lora`, a separate
"lora" collection) enter.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxtrain import lora as lora_lib
from jaxtrain import quant
from jaxtrain.attention import attention
from jaxtrain.config import ModelConfig
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


def _compute(x, cfg: ModelConfig):
    return x.astype(jnp.dtype(cfg.dtype))


def on_device(w):
    """`w` (an array or an int8 `QArray`) copied to the accelerator when it lives in host memory.

    A LoRA run may keep its frozen base in host memory (`jaxtrain.runs.base_shardings(on_host=True)`):
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
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        weight = _param(self, "weight", (x.shape[-1],), ("embed",), nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_frequencies(config: ModelConfig):
    """RoPE's inverse frequencies [head_dim / 2] in float32: theta^(-2i/d), with Llama 3.1's scaling when the
    config has it (long wavelengths divided by `factor`, short ones kept, the band between interpolated, as
    transformers' `_compute_llama3_parameters`)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= old_len / scaling.high_freq_factor) & (wavelen <= old_len / scaling.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def rotary(x, positions, inv_freq):
    """Rotary embedding of x [B, T, H, D] at integer positions [B, T] (the rotate-half layout of HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids, rows: int, kv_cache=None):
        """Output [B, rows, D] for the last `rows` rows of x (queries of those only), keys and values of all.

        `kv_cache`: while decoding, this layer's view of the KV cache (`jaxtrain.kv_cache.LayerCache`),
        which stores this step's keys and values and gives back everything to attend over; None in
        training. Returns (output, kv_cache)."""
        cfg = self.config
        d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        first = x.shape[1] - rows
        q = _project(self, "wq", "btd,dhk->bthk", x[:, first:], (d, h, hd), ("embed", "heads", "head_dim"))
        k = _project(self, "wk", "btd,dhk->bthk", x, (d, kvh, hd), ("embed", "kv_heads", "head_dim"))
        v = _project(self, "wv", "btd,dhk->bthk", x, (d, kvh, hd), ("embed", "kv_heads", "head_dim"))
        if cfg.qkv_bias:   # Qwen2
            q = q + _compute(_param(self, "bq", (h, hd), ("heads", "head_dim"), nn.initializers.zeros), cfg)
            k = k + _compute(_param(self, "bk", (kvh, hd), ("kv_heads", "head_dim"), nn.initializers.zeros), cfg)
            v = v + _compute(_param(self, "bv", (kvh, hd), ("kv_heads", "head_dim"), nn.initializers.zeros), cfg)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q, k, v = (checkpoint_name(t, QKV) for t in (q, k, v))
        inv_freq = rope_frequencies(cfg)
        q = rotary(q, positions[:, first:], inv_freq)
        k = rotary(k, positions, inv_freq)

        keys, values, kv_positions, kv_segments = k, v, positions, segment_ids
        if kv_cache is not None:
            keys, values, kv_positions, kv_segments, kv_cache = kv_cache.update(k, v, positions, segment_ids)
        out = attention(q, keys, values, q_positions=positions[:, first:], kv_positions=kv_positions,
                        q_segment_ids=segment_ids[:, first:], kv_segment_ids=kv_segments,
                        sliding_window=cfg.sliding_window, impl=cfg.attention_impl)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        out = _project(self, "wo", "bthk,hkd->btd", out, (h, hd, d), ("heads", "head_dim", "embed"))
        return checkpoint_name(out, ATTN_OUT), kv_cache


class MLP(nn.Module):
    config: ModelConfig
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


class DecoderLayer(nn.Module):
    """One pre-norm block. Returns (x, kv_cache): in training (no cache) that is the (carry, output)
    pair `nn.scan` wants, with nothing scanned out.

    `rows`: compute the output for the last `rows` rows only (the final layer of a decoding forward pass
    when a prefill wants one row or a continuation score its span; its keys and values still cover
    every row)."""

    config: ModelConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv_cache=None, rows: int | None = None):
        x = checkpoint_name(x, LAYER_INPUT)
        rows = x.shape[1] if rows is None else min(rows, x.shape[1])
        out, kv_cache = Attention(self.config, self.lora, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x), positions, segment_ids, rows, kv_cache)
        x = x[:, x.shape[1] - rows:] + out
        x = x + MLP(self.config, self.lora, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), kv_cache


def on_xla_cpu(config: ModelConfig) -> bool:
    """The model runs its "auto" attention on the CPU backend (tests, the CPU demo, bench/), where two
    choices differ; `jaxtrain.aot` names a TPU kernel, so a TPU program compiled here never gets them."""
    return config.attention_impl == "auto" and jax.default_backend() == "cpu"


def scan_unroll(config: ModelConfig) -> int:
    """Layers per iteration of the layer scan: one (compile time independent of depth), except for a
    model of up to 8 layers on XLA:CPU: there the loop's stacked residuals and their zero-filled buffers
    cost a quarter of the 2-layer demo model's train step and 10% of a 111M model's (8 layers); unrolled,
    the parameters keep their stacked layout. (Decoding on CPU runs the layers one buffer each: see
    `jaxtrain.generate`.)"""
    return config.num_layers if on_xla_cpu(config) and config.num_layers <= 8 else 1


class Transformer(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None   # adapters in the "lora" collection (jaxtrain.lora)

    def setup(self):
        cfg = self.config
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=remat_policy(cfg.remat), prevent_cse=False)
        self.layers = nn.scan(
            layer, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"}, unroll=scan_unroll(cfg))(cfg, self.lora, name="layers")
        self.embed = self.param("embed", nn.with_logical_partitioning(init_normal, ("vocab", "embed")),
                                (cfg.vocab_size, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head_kernel = self.param(
                "lm_head", nn.with_logical_partitioning(init_normal, ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.param_dtype))

    def embed_tokens(self, input_ids):
        x = _compute(jnp.take(on_device(self.embed), input_ids, axis=0), self.config)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def normed(self, x):
        return self.final_norm(x)

    def hidden_states(self, input_ids, positions, segment_ids):
        """Final-norm hidden states [B, T, D]."""
        x, _ = self.layers(self.embed_tokens(input_ids), positions, segment_ids)
        return self.final_norm(x)

    def logits(self, hidden):
        """Vocabulary logits in float32 for any [..., D] slice of hidden states (answer-only losses)."""
        kernel = on_device(self.embed).T if self.config.tie_word_embeddings else on_device(self.lm_head_kernel)
        return jnp.einsum("...d,dv->...v", hidden, _compute(kernel, self.config), preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions, segment_ids):
        logits = self.logits(self.hidden_states(input_ids, positions, segment_ids))
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


# --- Functional API -----------------------------------------------------------------------------------

def default_inputs(input_ids, positions=None, segment_ids=None):
    """Positions 0..T-1 and one segment per row, where not given."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    return positions, segment_ids


def _init_boxed(config: ModelConfig, rng, lora: LoraConfig | None = None, collection: str = "params"):
    ids = jnp.zeros((1, 1), jnp.int32)
    return Transformer(config, lora=lora).init(rng, ids, *default_inputs(ids))[collection]


def init_params(config: ModelConfig, rng) -> Params:
    """Random parameters (unboxed arrays); use `param_logical_axes` for their logical sharding names."""
    return nn.meta.unbox(_init_boxed(config, rng))


def param_logical_axes(config: ModelConfig) -> Params:
    """The logical axis names of every parameter, as `PartitionSpec`s of names."""
    return nn.get_partition_spec(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def param_shapes(config: ModelConfig) -> Params:
    return nn.meta.unbox(jax.eval_shape(functools.partial(_init_boxed, config), jax.random.key(0)))


def init_adapters(config: ModelConfig, lora: LoraConfig, rng) -> Params:
    """Fresh adapter weights (B = 0, so step 0 is the base model); jit it with out_shardings to create them
    in their shards. Built by initialising the model with `lora`, so they are shaped like its projections."""
    return nn.meta.unbox(_init_boxed(config, rng, lora, "lora"))


def adapter_shapes(config: ModelConfig, lora: LoraConfig) -> Params:
    return nn.meta.unbox(jax.eval_shape(lambda r: _init_boxed(config, r, lora, "lora"), jax.random.key(0)))


def adapter_logical_axes(config: ModelConfig, lora: LoraConfig) -> Params:
    return nn.get_partition_spec(jax.eval_shape(lambda r: _init_boxed(config, r, lora, "lora"), jax.random.key(0)))


def variables(params: Params, adapters: Adapters | None = None) -> dict:
    """The Flax variables of the model: parameters, and the "lora" collection when adapters ride along."""
    return {"params": params} if adapters is None else {"params": params, "lora": adapters.params}


def apply(config: ModelConfig, params: Params, *args, adapters: Adapters | None = None, dropout_rng=None,
          method=None, **kwargs):
    """`Transformer.apply` with optional LoRA adapters; `dropout_rng` turns on their dropout (training);
    `args` / `kwargs` go to `method`."""
    net = Transformer(config, lora=None if adapters is None else adapters.config)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return net.apply(variables(params, adapters), *args, rngs=rngs, method=method, **kwargs)


def forward(config: ModelConfig, params: Params, input_ids, *, positions=None, segment_ids=None,
            adapters: Adapters | None = None):
    """Logits [B, T, vocab] in float32. Padding: give it segment id 0 (its logits are meaningless)."""
    return apply(config, params, input_ids, *default_inputs(input_ids, positions, segment_ids), adapters=adapters)


def hidden_states(config: ModelConfig, params: Params, input_ids, *, positions=None, segment_ids=None,
                  adapters: Adapters | None = None, dropout_rng=None):
    return apply(config, params, input_ids, *default_inputs(input_ids, positions, segment_ids), adapters=adapters,
                 dropout_rng=dropout_rng, method=Transformer.hidden_states)


def logits_from_hidden(config: ModelConfig, params: Params, hidden):
    return Transformer(config).apply({"params": params}, hidden, method=Transformer.logits)
