"""Low-rank adapters (LoRA): a trainable update  W + (alpha / r) · A·B  on frozen projection weights.

Why: a full finetune of Mistral 7B carries ~116 GB of weights, gradients and Adam state; one Colab TPU
(v5e, 16 GiB) holds the frozen base (bf16, or int8 with `jaxtrain.quant`) plus ~42 M adapter parameters
(rank 16 on all seven projections) and their optimizer state.

Layout: the adapters are a separate Flax collection, ``"lora"``, shaped like the projections they adapt
and stacked over layers like them: ``{"layers": {"attn": {"wq": {"a": [L, d, r], "b": [L, r, h, hd]}},
"mlp": {...}}}``. ``a`` holds the weight's input dims, ``b`` its output dims, so the branch is two
einsums derived from the projection's own einsum (`branch`). ``b`` starts at zero, so step 0 is exactly
the base model; ``a`` starts like PEFT's (Kaiming-uniform, bound 1/sqrt(fan_in)). Adapters are float32.

Interchange with Hugging Face `peft`: `save_peft` / `load_peft` write and read an adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base,
folder)`` loads; `merge` folds the adapters into the base weights for a plain Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.config import MistralConfig

# Short target name -> (group in a layer, our weight name, Hugging Face / PEFT module name).
TARGETS = {
    "q": ("attn", "wq", "self_attn.q_proj"), "k": ("attn", "wk", "self_attn.k_proj"),
    "v": ("attn", "wv", "self_attn.v_proj"), "o": ("attn", "wo", "self_attn.o_proj"),
    "gate": ("mlp", "gate", "mlp.gate_proj"), "up": ("mlp", "up", "mlp.up_proj"),
    "down": ("mlp", "down", "mlp.down_proj"),
}
_BY_WEIGHT = {weight: short for short, (_, weight, _) in TARGETS.items()}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers.{i}."


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


# --- creating adapters --------------------------------------------------------------------------------

def _init_boxed(config: MistralConfig, lora: LoraConfig, rng):
    from jaxtrain import model
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = model.Mistral(config, lora=lora).init(rng, ids, jnp.zeros_like(ids), jnp.ones_like(ids))
    return variables["lora"]


def init_adapters(config: MistralConfig, lora: LoraConfig, rng) -> dict:
    """Fresh adapter weights (B = 0). Jit it with out_shardings to create them in their shards."""
    return nn.meta.unbox(_init_boxed(config, lora, rng))


def adapter_shapes(config: MistralConfig, lora: LoraConfig) -> dict:
    return nn.meta.unbox(jax.eval_shape(lambda r: _init_boxed(config, lora, r), jax.random.key(0)))


def adapter_logical_axes(config: MistralConfig, lora: LoraConfig) -> dict:
    return nn.get_partition_spec(jax.eval_shape(lambda r: _init_boxed(config, lora, r), jax.random.key(0)))


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
    from jaxtrain import quant

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


# --- PEFT adapter folders -----------------------------------------------------------------------------

def _hf_dims(a_shape, b_shape) -> tuple[int, int]:
    """(fan_in, fan_out) of stacked adapters a [L, *in, r], b [L, r, *out]."""
    return math.prod(a_shape[1:-1]), math.prod(b_shape[2:])


def save_peft(path: str | Path, config: MistralConfig, adapters: Adapters, *,
              base_model: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained``.

    PEFT stores ``lora_A.weight`` as [r, in] and ``lora_B.weight`` as [out, r] (torch's Linear layout).
    """
    from safetensors.numpy import save_file

    cfg = adapters.config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for short in cfg.targets:
        group, name, module = TARGETS[short]
        ab = adapters.params["layers"][group][name]
        a, b = np.asarray(jax.device_get(ab["a"]), np.float32), np.asarray(jax.device_get(ab["b"]), np.float32)
        fan_in, fan_out = _hf_dims(a.shape, b.shape)
        for i in range(config.num_layers):
            prefix = PEFT_PREFIX.format(i=i) + module
            tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(fan_in, cfg.rank).T)
            tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(cfg.rank, fan_out).T)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": [TARGETS[t][2].split(".")[-1] for t in cfg.targets], "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")


def load_peft(path: str | Path, config: MistralConfig) -> Adapters:
    """Read a PEFT LoRA folder (ours or one trained with `peft` on a Mistral model) into `Adapters`."""
    from safetensors import safe_open

    folder = Path(path)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    try:
        meta = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_file}: missing; is {folder} a PEFT adapter folder?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    unsupported = {k: meta.get(k) for k, ok in (("peft_type", "LORA"), ("bias", "none"), ("use_dora", False),
                                                ("use_rslora", False), ("fan_in_fan_out", False))
                   if meta.get(k, ok) != ok}
    if meta.get("rank_pattern") or meta.get("alpha_pattern") or meta.get("layers_to_transform") is not None:
        unsupported["per-layer patterns"] = "rank_pattern/alpha_pattern/layers_to_transform"
    if unsupported:
        raise ValueError(f"{config_file}: unsupported LoRA settings {unsupported} (plain LoRA only)")
    modules = meta.get("target_modules") or []
    if isinstance(modules, str):
        raise ValueError(f"{config_file}: target_modules as a regular expression is not supported")
    by_module = {TARGETS[s][2].split(".")[-1]: s for s in TARGETS}
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"{config_file}: target_modules {unknown} are not Mistral projections "
                         f"({sorted(by_module)})")
    try:
        cfg = LoraConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                         dropout=float(meta.get("lora_dropout", 0.0)), targets=tuple(by_module[m] for m in modules))
    except KeyError as e:
        raise ValueError(f"{config_file}: missing field {e}") from None
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    if not weights_file.exists():
        raise FileNotFoundError(f"{weights_file}: missing")
    shapes = adapter_shapes(config, cfg)
    params: dict = {"layers": {}}
    with safe_open(str(weights_file), framework="numpy") as f:
        names = set(f.keys())
        for short in cfg.targets:
            group, name, module = TARGETS[short]
            want = shapes["layers"][group][name]
            fan_in, fan_out = _hf_dims(want["a"].shape, want["b"].shape)
            a_layers, b_layers = [], []
            for i in range(config.num_layers):
                prefix = PEFT_PREFIX.format(i=i) + module
                for key in (prefix + ".lora_A.weight", prefix + ".lora_B.weight"):
                    if key not in names:
                        raise KeyError(f"{weights_file}: tensor {key!r} is missing")
                a, b = f.get_tensor(prefix + ".lora_A.weight"), f.get_tensor(prefix + ".lora_B.weight")
                if a.shape != (cfg.rank, fan_in) or b.shape != (fan_out, cfg.rank):
                    raise ValueError(f"{weights_file}: {prefix} has lora_A {a.shape} / lora_B {b.shape}, expected "
                                     f"{(cfg.rank, fan_in)} / {(fan_out, cfg.rank)} for this model and r={cfg.rank}")
                a_layers.append(a.astype(np.float32).T.reshape(want["a"].shape[1:]))
                b_layers.append(b.astype(np.float32).T.reshape(want["b"].shape[1:]))
            params["layers"].setdefault(group, {})[name] = {"a": jnp.asarray(np.stack(a_layers)),
                                                            "b": jnp.asarray(np.stack(b_layers))}
    return Adapters(params, cfg)


# --- the frozen base of a LoRA run --------------------------------------------------------------------

BASE_DTYPES = ("bf16", "int8", "float32")


def base_shardings(config: MistralConfig, base_dtype: str, mesh, rules, *, on_host: bool = False):
    """Shardings of the frozen base (int8: `qwix.QArray`s of shardings), laid out as in training.

    `on_host`: the layers' projection weights, the embedding and the LM head live in host memory
    (``pinned_host``); the model copies each to the accelerator where it is used, the layers one at a
    time inside the layer scan (`jaxtrain.model.on_device`). The norms' small [layers, hidden] stacks
    stay on the device (see `jaxtrain.offload.stacked_layers`). Not for int8: XLA:TPU reads int8 slices
    from host memory in another tiling than the argument's, so it would first copy the whole int8
    stack into HBM (no saving; and the int8 base of a 7B fits one v5e chip anyway).
    """
    from jaxtrain import model, offload, quant
    from jaxtrain.sharding import logical_to_sharding
    if on_host and base_dtype == "int8":
        raise ValueError("--base-on-host needs --base-dtype bf16 or float32: an int8 base in host memory "
                         "would be copied whole into HBM by the TPU compiler (int8 fits on the chip: drop "
                         "--base-on-host)")
    shardings = logical_to_sharding(model.param_logical_axes(config), mesh, rules)
    if on_host:
        stacked = offload.stacked_layers(model.param_shapes(config))

        def place(key, tree):
            return jax.tree.map(lambda s, big: s.with_memory_kind(offload.HOST)
                                if big or key in ("embed", "lm_head") else s, tree, stacked[key])
        shardings = {key: place(key, tree) for key, tree in shardings.items()}
    return quant.quantized_shardings(shardings) if base_dtype == "int8" else shardings


def base_shapes(config: MistralConfig, base_dtype: str):
    """Shapes and dtypes of the frozen base as `load_base` builds it: int8 projections (the embedding,
    LM head and norms in the compute dtype, as `quant.load_quantized` reads them), or all bf16 / fp32."""
    from jaxtrain import model, quant
    shapes = model.param_shapes(config)
    dtype = jnp.dtype({"bf16": "bfloat16", "float32": "float32"}.get(base_dtype, config.dtype))
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)
    return quant.quantized_shapes(shapes) if base_dtype == "int8" else shapes


def base_fingerprint(init_from: str | None, seed: int) -> str:
    """sha256 over a Hugging Face folder's config.json and safetensors files (what a resume must find
    again), or a name for the random base of a run without --init-from."""
    if not init_from:
        return f"random-init:seed={seed}"
    import hashlib
    from tqdm.auto import tqdm

    folder = Path(init_from)
    files = [folder / "config.json"] + sorted(folder.glob("*.safetensors"))
    digest = hashlib.sha256()
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="hash base",
              disable=sum(f.stat().st_size for f in files) < 2**30) as bar:
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def load_base(config: MistralConfig, *, init_from: str | None, base_dtype: str, seed: int = 0, shardings=None):
    """The frozen base weights in `base_dtype`, from a Hugging Face folder (int8: quantised tensor by
    tensor while reading) or, without one, the random initialisation `seed` gives a full finetune."""
    from jaxtrain import model, quant
    from jaxtrain.hf_io import load_pretrained

    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"base dtype must be one of {BASE_DTYPES} (got {base_dtype!r})")
    overrides = dict(remat=config.remat, dtype=config.dtype, attention_impl=config.attention_impl)
    if init_from and base_dtype == "int8":
        return quant.load_quantized(init_from, shardings=shardings, config_overrides=overrides)[1]
    if init_from:
        dtype = "bfloat16" if base_dtype == "bf16" else "float32"
        return load_pretrained(init_from, shardings=shardings, dtype=dtype, config_overrides=overrides)[1]
    params = model.init_params(config, jax.random.key(seed))
    if base_dtype == "int8":
        params = jax.tree.map(lambda x: x if quant.is_quantized(x) else x.astype(config.dtype),
                              quant.quantize_params(params), is_leaf=quant.is_quantized)
    else:
        params = jax.tree.map(lambda x: x.astype("bfloat16" if base_dtype == "bf16" else "float32"), params)
    return params if shardings is None else jax.device_put(params, shardings)


def run_settings(metadata: dict) -> tuple[LoraConfig, dict] | None:
    """(LoraConfig, base description) from a checkpoint's metadata, or None for a full finetune."""
    if not metadata.get("lora"):
        return None
    d = metadata["lora"]
    return LoraConfig(rank=d["rank"], alpha=d["alpha"], dropout=d["dropout"], targets=tuple(d["targets"])), \
        metadata["base"]


def load_run(run_dir, step: int | None = None, *, base_dtype: str | None = None, check_hash: bool = True):
    """(MistralConfig, base params, Adapters, base description) of a LoRA training run.

    The base is read again from where the run read it (its hash must match); `base_dtype` overrides the
    run's own (e.g. "float32" for an exact merged export).
    """
    from jaxtrain.checkpoint import Checkpointer, load_params_from_run

    with Checkpointer(run_dir, read_only=True) as ckpt:
        _, config, metadata = ckpt.read_json(step)
    settings = run_settings(metadata)
    if settings is None:
        raise ValueError(f"{run_dir}: not a LoRA run (its checkpoints hold the whole model)")
    lora, base = settings
    if check_hash and base_fingerprint(base["init_from"], base["seed"]) != base["sha256"]:
        raise ValueError(f"{run_dir}: the base model at {base['init_from']} is not the one this run was trained "
                         f"on (sha256 differs from {base['sha256']})")
    config, adapters = load_params_from_run(run_dir, step)
    params = load_base(config, init_from=base["init_from"], base_dtype=base_dtype or base["dtype"],
                       seed=base["seed"])
    return config, params, Adapters(adapters, lora), base


def export_run(run_dir, out, *, step: int | None = None, peft: bool = False, dtype: str = "bfloat16",
               max_shard_size: str = "5GB") -> str:
    """Write a LoRA run as a PEFT adapter folder, or merged into its base as a Hugging Face folder.

    Merging folds the adapters into the base as the run read it from disk (bf16/fp32 weights, also for a
    run trained on the int8 base, as QLoRA does), computing in float32 and writing in `dtype`.
    """
    from jaxtrain.checkpoint import Checkpointer, load_params_from_run
    from jaxtrain.hf_io import save_pretrained

    with Checkpointer(run_dir, read_only=True) as ckpt:
        _, _, metadata = ckpt.read_json(step)
    lora, base = run_settings(metadata)
    if peft:
        config, adapters = load_params_from_run(run_dir, step)
        save_peft(out, config, Adapters(adapters, lora), base_model=base["init_from"])
        return f"PEFT adapter folder for {base['init_from'] or base['sha256']}"
    base_dtype = "float32" if dtype == "float32" else "bf16"
    config, params, adapters, _ = load_run(run_dir, step, base_dtype=base_dtype)
    save_pretrained(out, config, merge(params, adapters, jnp.float32 if base_dtype == "float32" else jnp.bfloat16),
                    dtype=dtype, max_shard_size=max_shard_size)
    return f"merged model ({dtype})"
