"""`--model PATH` (with `--base`, `--base-dtype`, `--merge-adapters`) for every task: what to decode with.

`--model` is one of four things, told apart by their files:

* a Hugging Face folder (`config.json` + safetensors): a base model or `python -m jaxtrain export` output;
* a full-finetune training run (its checkpoints hold the whole model);
* a LoRA training run (its checkpoints hold the adapters and name the base model by path and sha256): the
  base is read again from that path, or from `--base` if it moved, and must hash to the recorded sha256,
  as `python -m jaxtrain export` checks;
* a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`), adapting `--base HF_DIR`.

The base weights load in `--base-dtype` (int8: `jaxtrain.quant`, quantised tensor by tensor while
reading, so a 7B base fits one 16 GiB chip). Adapters ride along unmerged (the decoder adds the low-rank
branch) unless `--merge-adapters` folds them into the float base first (`jaxtrain.lora.merge`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from eval.datafiles import DataError

BaseDtype = Literal["int8", "bf16", "float32"]
_FLOAT_NAMES = {"bf16": "bfloat16", "float32": "float32"}
_LOAD_ERRORS = (FileNotFoundError, KeyError, ValueError)  # the loaders' own messages name the file


@dataclasses.dataclass
class LoadedModel:
    config: Any
    params: Any
    adapters: Any = None
    """`jaxtrain.lora.Adapters` for the decoder to apply unmerged, or None."""
    info: dict = dataclasses.field(default_factory=dict)
    """What was loaded (kind, base path/sha256/dtype, adapters and whether merged): results.json's "model"."""


@dataclasses.dataclass(frozen=True)
class _Options:
    weights: str | None
    """"int8", a float dtype name, or None (as stored / the config's param_dtype)."""
    compute_dtype: str | None
    mesh: Any
    rules: str

    @property
    def overrides(self) -> dict:
        return {} if self.compute_dtype is None else {"dtype": self.compute_dtype}

    def shardings(self, logical_axes):
        """Laid out as in training (logical axes -> mesh), so a 7B model is split over the chips."""
        from jaxtrain.sharding import logical_to_sharding, rules_for

        return None if self.mesh is None else logical_to_sharding(logical_axes, self.mesh, rules_for(self.rules))

    def param_shardings(self, config, int8: bool):
        from jaxtrain import quant
        from jaxtrain.model import param_logical_axes

        shardings = self.shardings(param_logical_axes(config))
        return quant.quantized_shardings(shardings) if int8 and shardings is not None else shardings


def _float_name(dtype: str, flag: str) -> str:
    import jax.numpy as jnp

    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name is None or not jnp.issubdtype(name, jnp.floating):
        raise DataError(f"{flag} {dtype}: not a float dtype (e.g. bfloat16, float32); int8 weights: --base-dtype int8")
    return name


def _weights(dtype: str | None, base_dtype: str | None) -> str | None:
    """The one dtype the base weights load in ("int8" or a float dtype name), or None (as stored)."""
    if dtype is not None and base_dtype is not None:
        raise DataError(f"give --dtype or --base-dtype, not both (--base-dtype {base_dtype} sets the weights' dtype)")
    if base_dtype is not None:
        return "int8" if base_dtype == "int8" else _FLOAT_NAMES[base_dtype]
    return None if dtype is None else _float_name(dtype, "--dtype")


def _stored_dtype(params) -> str:
    """"int8" or the float dtype of the projection weights, as they will be used."""
    from jaxtrain import quant

    w = params["layers"]["attn"]["wq"]
    return "int8" if quant.is_quantized(w) else str(w.dtype)


def _load_hf(folder: Path, opts: _Options, flag: str):
    """(config, params) of a Hugging Face folder (int8: quantised tensor by tensor while reading)."""
    from jaxtrain import quant
    from jaxtrain.config import MistralConfig
    from jaxtrain.hf_io import load_pretrained

    if not (folder / "config.json").is_file():
        raise DataError(f"{flag} {folder}: not a Hugging Face model folder (no config.json)")
    int8 = opts.weights == "int8"
    try:
        config = MistralConfig.from_pretrained(folder, **opts.overrides)
        shardings = opts.param_shardings(config, int8)
        if int8:
            return quant.load_quantized(folder, shardings=shardings, config_overrides=opts.overrides)
        return load_pretrained(folder, dtype=opts.weights, shardings=shardings, config_overrides=opts.overrides)
    except _LOAD_ERRORS as e:
        raise DataError(f"{flag} {folder}: {e}") from None


def _load_full_run(path: Path, config, opts: _Options):
    """A full finetune's checkpoint, cast as asked (int8: quantised on the host, layer by layer)."""
    import jax

    from jaxtrain import quant
    from jaxtrain.checkpoint import load_params_from_run

    try:
        shardings = None if config is None else opts.param_shardings(config, int8=False)
        config, params = load_params_from_run(path, shardings=shardings)
    except _LOAD_ERRORS as e:
        raise DataError(f"--model {path}: {e}") from None
    if opts.weights == "int8":
        params = quant.quantize_params(params)
        if opts.mesh is not None:
            params = jax.device_put(params, opts.param_shardings(config, int8=True))
    elif opts.weights is not None:
        params = jax.tree.map(lambda x: x.astype(opts.weights), params)
    return config.replace(**opts.overrides), params


def _lora_base_dtype(weights: str | None, recorded: str) -> str:
    """`jaxtrain.lora.load_base`'s name for the dtype asked for (default: the one the run trained on)."""
    if weights is None:
        return recorded
    names = {"int8": "int8", "bfloat16": "bf16", "float32": "float32"}
    if weights not in names:
        raise DataError(f"a LoRA run's base loads as --base-dtype int8, bf16 or float32 (got {weights})")
    return names[weights]


def _load_lora_run(path: Path, config, metadata: dict, base: Path | None, opts: _Options):
    """A LoRA run's base (checked against the run's recorded sha256, as export does) and its adapters."""
    from jaxtrain import lora
    from jaxtrain.checkpoint import load_params_from_run
    from jaxtrain.sharding import rules_for

    lora_config, recorded = lora.run_settings(metadata)
    init_from = str(base.resolve()) if base is not None else recorded["init_from"]
    if init_from is not None and not Path(init_from).is_dir():
        raise DataError(f"--model {path}: the run's base model {init_from} is not there; pass --base HF_DIR "
                        "where it is now (it must be the same files: the run recorded their sha256)")
    sha256 = lora.base_fingerprint(init_from, recorded["seed"])
    if sha256 != recorded["sha256"]:
        raise DataError(f"--model {path}: the base model at {init_from} is not the one this run was trained on "
                        f"(sha256 {sha256}, the run recorded {recorded['sha256']})")
    base_dtype = _lora_base_dtype(opts.weights, recorded["dtype"])
    config = config.replace(**opts.overrides)
    shardings = None if opts.mesh is None else lora.base_shardings(config, base_dtype, opts.mesh, rules_for(opts.rules))
    try:
        params = lora.load_base(config, init_from=init_from, base_dtype=base_dtype, seed=recorded["seed"],
                                shardings=shardings)
        _, adapter_params = load_params_from_run(
            path, shardings=opts.shardings(lora.adapter_logical_axes(config, lora_config)))
    except _LOAD_ERRORS as e:
        raise DataError(f"--model {path}: {e}") from None
    return config, params, lora.Adapters(adapter_params, lora_config), {"path": init_from, "sha256": sha256}


def _load_peft(path: Path, base: Path | None, opts: _Options):
    """A PEFT adapter folder and the Hugging Face base it adapts (`--base`)."""
    import json

    import jax

    from jaxtrain import lora

    if base is None:
        try:
            named = json.loads((path / lora.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            named = None
        raise DataError(f"--model {path} is a PEFT adapter folder: give --base HF_DIR, the model it adapts"
                        + (f" (its adapter_config.json names {named})" if named else ""))
    config, params = _load_hf(base, opts, "--base")
    try:
        adapters = lora.load_peft(path, config)
    except _LOAD_ERRORS as e:
        raise DataError(f"--model {path}: {e}") from None
    if opts.mesh is not None:
        shardings = opts.shardings(lora.adapter_logical_axes(config, adapters.config))
        adapters = lora.Adapters(jax.device_put(adapters.params, shardings), adapters.config)
    return config, params, adapters, {"path": str(base.resolve()), "sha256": None}


def _check_whole_model(path: Path, base: Path | None, merge_adapters: bool) -> None:
    if base is not None:
        raise DataError(f"--base is for a LoRA run or a PEFT adapter folder; --model {path} is a whole model")
    if merge_adapters:
        raise DataError(f"--merge-adapters: --model {path} is a whole model, it has no adapters to merge")


def _check_merge(merge_adapters: bool, weights: str | None, path: Path) -> None:
    if merge_adapters and weights == "int8":
        raise DataError(f"--merge-adapters with an int8 base: merging dequantises the base (W + alpha/r·A·B is a "
                        f"float model), so nothing would run in int8. Keep the adapters unmerged on the int8 base "
                        f"(drop --merge-adapters), or merge into --base-dtype bf16 or float32 ({path})")


def load_model(path: str | Path, *, dtype: str | None = None, mesh=None, rules: str = "fsdp",
               base: str | Path | None = None, base_dtype: BaseDtype | None = None,
               merge_adapters: bool = False, compute_dtype: str | None = None) -> LoadedModel:
    """The model `--model path` names (see the module docstring), ready for `eval.decode.Generator`.

    `dtype` casts float weights (HF folders and runs; default: the config's param_dtype, or the stored
    dtype); `base_dtype` replaces it and also offers int8. With a `mesh`, each device receives only its
    shard of every parameter (`rules`: the sharding table of training). `compute_dtype` replaces the
    config's compute dtype. Every wrong combination of options raises `DataError` before any weights
    are read.
    """
    from jaxtrain import lora
    from jaxtrain.checkpoint import Checkpointer

    path = Path(path)
    base = None if base is None else Path(base)
    if not path.exists():
        raise DataError(f"--model {path}: no such file or directory")
    if base is not None and not base.is_dir():
        raise DataError(f"--base {base}: no such directory")
    opts = _Options(_weights(dtype, base_dtype),
                    None if compute_dtype is None else _float_name(compute_dtype, "--compute-dtype"), mesh, rules)

    adapters = source = None
    if (path / lora.ADAPTER_CONFIG).is_file():
        kind, source = "peft_adapters", str(path.resolve())
        _check_merge(merge_adapters, opts.weights, path)
        config, params, adapters, base_info = _load_peft(path, base, opts)
    elif (path / "config.json").is_file():
        kind = "hf_folder"
        _check_whole_model(path, base, merge_adapters)
        config, params = _load_hf(path, opts, "--model")
        base_info = {"path": str(path.resolve()), "sha256": None}
    elif path.is_dir():
        try:
            with Checkpointer(path, read_only=True) as ckpt:
                step, config, metadata = ckpt.read_json()
        except FileNotFoundError as e:
            raise DataError(f"--model {path}: {e}; expected a Hugging Face folder (with config.json), a PEFT "
                            "adapter folder (with adapter_config.json) or a training run directory") from None
        settings = lora.run_settings(metadata)
        if settings is not None:
            kind, source = "lora_run", f"{path.resolve()} (step {step})"
            _check_merge(merge_adapters, opts.weights or settings[1]["dtype"], path)
            config, params, adapters, base_info = _load_lora_run(path, config, metadata, base, opts)
        else:
            kind = "run"
            _check_whole_model(path, base, merge_adapters)
            config, params = _load_full_run(path, config, opts)
            base_info = {"path": str(path.resolve()), "sha256": None, "step": step}
    else:
        raise DataError(f"--model {path}: expected a Hugging Face folder (with config.json), a PEFT adapter "
                        "folder (with adapter_config.json) or a training run directory")

    base_info["dtype"] = _stored_dtype(params)
    adapter_info = None
    if adapters is not None:
        cfg = adapters.config
        adapter_info = {"source": source, "rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets),
                        "merged": merge_adapters}
        if merge_adapters:
            params, adapters = lora.merge(params, adapters), None
    return LoadedModel(config, params, adapters, {"kind": kind, "base": base_info, "adapters": adapter_info})
