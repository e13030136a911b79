"""PEFT adapter folders in and out: what `peft.PeftModel.from_pretrained(base, folder)` reads and writes.

A folder is ``adapter_config.json`` + ``adapter_model.safetensors``; PEFT stores each projection's
``lora_A.weight`` as [r, in] and ``lora_B.weight`` as [out, r] (torch's Linear layout), one pair per layer,
where our adapters (`jaxtrain.lora`) are stacked over layers with the projection's own dims.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxtrain import model
from jaxtrain.config import ModelConfig
from jaxtrain.hf_io import write_safetensors
from jaxtrain.lora import TARGETS, Adapters, LoraConfig

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers.{i}."


def _hf_dims(a_shape, b_shape) -> tuple[int, int]:
    """(fan_in, fan_out) of stacked adapters a [L, *in, r], b [L, r, *out]."""
    return math.prod(a_shape[1:-1]), math.prod(b_shape[2:])


def save_peft(path: str | Path, config: ModelConfig, adapters: Adapters, *,
              base_model: str | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained``.

    PEFT stores ``lora_A.weight`` as [r, in] and ``lora_B.weight`` as [out, r] (torch's Linear layout).
    """
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
    write_safetensors(tensors, out / ADAPTER_WEIGHTS)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": [TARGETS[t][2].split(".")[-1] for t in cfg.targets], "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")


def load_peft(path: str | Path, config: ModelConfig) -> Adapters:
    """Read a PEFT LoRA folder (ours or one trained with `peft` on a Mistral model) into `Adapters`."""
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
    shapes = model.adapter_shapes(config, cfg)
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
