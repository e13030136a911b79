"""Low-rank adapters (LoRA): a trainable update  W + (alpha / r) · A·B  on frozen projection weights.

Why: a full finetune of Mistral 7B carries ~116 GB of weights, gradients and Adam state; one Colab TPU
(v5e, 16 GiB) holds the frozen base (bf16, or int8 with `jaxtrain.quant`) plus ~42 M adapter parameters
(rank 16 on all seven projections) and their optimizer state.

Layout: the adapters are a separate Flax collection, ``"lora"``, shaped like the projections they adapt
and stacked over layers like them: ``{"layers": {"attn": {"wq": {"a": [L, d, r], "b": [L, r, h, hd]}},
"mlp": {...}}}``. ``a`` holds the weight's input dims, ``b`` its output dims, so the branch is two
einsums derived from the projection's own einsum (`branch`). ``b`` starts at zero, so step 0 is exactly
the base model; ``a`` starts like PEFT's (Kaiming-uniform, bound 1/sqrt(fan_in)). Adapters are float32.

This module is the adapters themselves: their settings, the branch inside the model's projections, and
`merge`, which folds them into the base weights for a plain Hugging Face export. Fresh adapters come
from the model (`jaxtrain.model.init_adapters`), PEFT folders from `jaxtrain.peft_io`, and the frozen
base of a LoRA run from `jaxtrain.runs`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain import quant

# Short target name -> (group in a layer, our weight name, Hugging Face / PEFT module name).
TARGETS = {
    "q": ("attn", "wq", "self_attn.q_proj"), "k": ("attn", "wk", "self_attn.k_proj"),
    "v": ("attn", "wv", "self_attn.v_proj"), "o": ("attn", "wo", "self_attn.o_proj"),
    "gate": ("mlp", "gate", "mlp.gate_proj"), "up": ("mlp", "up", "mlp.up_proj"),
    "down": ("mlp", "down", "mlp.down_proj"),
}
_BY_WEIGHT = {weight: short for short, (_, weight, _) in TARGETS.items()}
Target = Literal["q", "k", "v", "o", "gate", "up", "down"]
BaseDtype = Literal["bfloat16", "int8", "float32"]
"""dtype of weights that are not trained (a LoRA run's base, a decoded model's weights); int8: weight-only,
one scale per output channel (`jaxtrain.quant`)"""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target(s) {unknown or '(none given)'}; choose from {list(TARGETS)}")
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 (got rank={self.rank}, "
                             f"alpha={self.alpha}, dropout={self.dropout})")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # canonical order

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, weight_name: str) -> bool:
        return _BY_WEIGHT.get(weight_name) in self.targets

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"targets": list(self.targets)}


@flax.struct.dataclass
class Adapters:
    """Adapter weights together with their (static) settings: what the model functions take."""

    params: Any
    config: LoraConfig = flax.struct.field(pytree_node=False)


@dataclasses.dataclass
class LoraSettings:
    """What a run trains besides a full finetune, as `train` and `aot` take it on the command line."""

    lora_rank: int = 0
    """LoRA: train rank-r adapters on frozen base weights instead of all weights (0: full finetune)"""
    lora_alpha: float | None = None
    """LoRA: the update is alpha / rank * A·B (default: 2 x rank)"""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapters' input during training"""
    lora_targets: tuple[Target, ...] = tuple(TARGETS)
    """LoRA: projections that get adapters"""
    base_dtype: BaseDtype = "bfloat16"
    """dtype of the weights that are not trained: the LoRA base (and, for `aot --step decode`, the decoded
    model's weights); int8: weight-only, one scale per output channel"""
    base_on_host: bool = False
    """LoRA: keep the frozen base (bfloat16/float32) in host memory and copy each layer to the accelerator
    inside the layer scan (HBM holds about one layer of it: what fits a bf16 7B on one 16 GiB v5e; costs
    host-to-device bandwidth, twice the base per step)"""

    def lora(self) -> LoraConfig | None:
        """The adapters' settings, or None for a full finetune."""
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0: no adapters); got {self.lora_rank}")
        if self.lora_rank == 0:
            return None
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return LoraConfig(self.lora_rank, alpha, self.lora_dropout, tuple(self.lora_targets))


# --- the branch inside the model ------------------------------------------------------------------------

def _split_spec(spec: str, shape: tuple[int, ...]):
    """For a projection einsum like "btd,dhk->bthk": (x letters, weight input / output letters, out letters)."""
    inputs, out = spec.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    n_in = sum(1 for c in w_spec if c in x_spec)
    if w_spec[:n_in] != "".join(c for c in w_spec if c in x_spec) or len(w_spec) != len(shape):
        raise ValueError(f"LoRA needs a weight einsum with input dims first, got {spec!r} for shape {shape}")
    return x_spec, w_spec[:n_in], w_spec[n_in:], out


def _init_a(rng, shape, fan_in):
    bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform_(a=sqrt(5)) on a [r, fan_in] matrix
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def branch(module: nn.Module, name: str, spec: str, x, shape: tuple[int, ...], axes: tuple):
    """(alpha / r) · dropout(x) A B for the projection `name` of `module` (whose einsum is `spec`)."""
    cfg: LoraConfig = module.lora
    x_spec, w_in, w_out, out_spec = _split_spec(spec, shape)
    n_in = len(w_in)
    batch = "".join(c for c in x_spec if c not in w_in)

    def init():
        a = _init_a(module.make_rng("params"), shape[:n_in] + (cfg.rank,), math.prod(shape[:n_in]))
        b = jnp.zeros((cfg.rank,) + shape[n_in:], jnp.float32)
        return {"a": nn.Partitioned(a, tuple(axes[:n_in]) + (None,)),
                "b": nn.Partitioned(b, (None,) + tuple(axes[n_in:]))}

    ab = module.variable("lora", name, init).value
    if cfg.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - cfg.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.dropout), 0).astype(x.dtype)
    low = jnp.einsum(f"{x_spec},{w_in}r->{batch}r", x, ab["a"].astype(x.dtype))
    return jnp.einsum(f"{batch}r,r{w_out}->{out_spec}", low, ab["b"].astype(x.dtype)) * cfg.scale


def num_params(adapters) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


# --- merging ------------------------------------------------------------------------------------------

def delta(a, b, scale: float):
    """(alpha / r) · A·B for stacked adapters a [L, *in, r], b [L, r, *out] -> [L, *in, *out] (float32)."""
    layers, rank = a.shape[0], a.shape[-1]
    flat = jnp.matmul(a.reshape(layers, -1, rank).astype(jnp.float32), b.reshape(layers, rank, -1).astype(jnp.float32))
    return (scale * flat).reshape(a.shape[:-1] + b.shape[2:])


def merge(params: dict, adapters: Adapters, dtype=None) -> dict:
    """Base params with every adapted weight replaced by W + (alpha / r) A·B, in `dtype` (default: W's).

    An int8 base is dequantised first (the result is a float model: re-quantise it if you want int8).
    Layer by layer (`lax.map`), so the float32 temporaries stay one layer in size.
    """
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {group: dict(sub) for group, sub in params["layers"].items()}
    for group, sub in adapters.params["layers"].items():
        for name, ab in sub.items():
            w = params["layers"][group][name]
            target = jnp.dtype(dtype) if dtype is not None else (
                jnp.dtype(w.scale.dtype) if quant.is_quantized(w) else w.dtype)

            @jax.jit
            def merged(w, a, b, target=target):
                def one(layer):
                    wl, al, bl = layer
                    d = delta(al[None], bl[None], adapters.config.scale)[0]
                    return (quant.dequantize(wl, jnp.float32) + d).astype(target)
                return jax.lax.map(one, (w, a, b))

            out["layers"][group][name] = merged(w, ab["a"], ab["b"])
    return out
