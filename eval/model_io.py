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
branch) unless `--merge-adapters` folds them into the float base first (`jaxtrain.lora.merge`). Runs are
read by `jaxtrain.runs.load_run`, which `python -m jaxtrain export` uses too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from data_gen.tokenizer import Tokenizer, TokenizerError, get_tokenizer
from eval.datafiles import DataError
from jaxtrain import hf_io, model, quant, runs
from jaxtrain.checkpoint import Checkpointer, checkpoint_dir
from jaxtrain.config import ModelConfig
from jaxtrain.lora import Adapters, BaseDtype, merge
from jaxtrain.peft_io import ADAPTER_CONFIG, load_peft
from jaxtrain.sharding import logical_to_sharding, rules_for

_LOAD_ERRORS = (FileNotFoundError, KeyError, ValueError)  # the loaders' own messages name the file


@dataclasses.dataclass
class LoadedModel:
    config: Any
    params: Any
    adapters: Any = None
    """`jaxtrain.lora.Adapters` for the decoder to apply unmerged, or None."""
    info: dict = dataclasses.field(default_factory=dict)
    """What was loaded (kind, base path/sha256/dtype, adapters and whether merged): results.json's "model"."""
    tokenizer: Tokenizer | None = None
    """The model's tokenizer and chat template (what prompts are encoded with)."""


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
        return None if self.mesh is None else logical_to_sharding(logical_axes, self.mesh, rules_for(self.rules))

    def param_shardings(self, config, int8: bool):
        shardings = self.shardings(model.param_logical_axes(config))
        return quant.quantized_shardings(shardings) if int8 and shardings is not None else shardings


def _float_name(dtype: str, flag: str) -> str:
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
        return base_dtype
    return None if dtype is None else _float_name(dtype, "--dtype")


def _stored_dtype(params) -> str:
    """"int8" or the float dtype of the projection weights, as they will be used."""
    w = params["layers"]["attn"]["wq"]
    return "int8" if quant.is_quantized(w) else str(w.dtype)


def _load_hf(folder: Path, opts: _Options, flag: str):
    """(config, params) of a Hugging Face folder (int8: quantised tensor by tensor while reading)."""
    if not (folder / "config.json").is_file():
        raise DataError(f"{flag} {folder}: not a Hugging Face model folder (no config.json)")
    int8 = opts.weights == "int8"
    try:
        config = ModelConfig.from_pretrained(folder, **opts.overrides)
        shardings = opts.param_shardings(config, int8)
        if int8:
            return hf_io.load_quantized(folder, shardings=shardings, config_overrides=opts.overrides)
        return hf_io.load_pretrained(folder, dtype=opts.weights, shardings=shardings, config_overrides=opts.overrides)
    except _LOAD_ERRORS as e:
        raise DataError(f"{flag} {folder}: {e}") from None


def _tokenizer(spec, flag: str) -> Tokenizer:
    try:
        return get_tokenizer(spec)
    except TokenizerError as e:
        raise DataError(f"{flag}: {e} (pass --tokenizer with the model's tokenizer folder, or mistral)") from None


def _load_run(path: Path, step: int | None, base: Path | None, opts: _Options) -> runs.LoadedRun:
    """A training run (full finetune or LoRA) as `python -m jaxtrain export` reads it."""
    if opts.weights is not None and opts.weights not in ("int8", "bfloat16", "float32"):
        raise DataError(f"--model {path}: weights load as int8, bfloat16 or float32 (got {opts.weights})")
    try:
        return runs.load_run(path, step, weights=opts.weights, base_path=base, mesh=opts.mesh,
                             rules=rules_for(opts.rules), config_overrides=opts.overrides)
    except _LOAD_ERRORS as e:
        raise DataError(f"--model {path}: {e}") from None


def _load_peft(path: Path, base: Path | None, opts: _Options):
    """A PEFT adapter folder and the Hugging Face base it adapts (`--base`)."""
    if base is None:
        try:
            named = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            named = None
        raise DataError(f"--model {path} is a PEFT adapter folder: give --base HF_DIR, the model it adapts"
                        + (f" (its adapter_config.json names {named})" if named else ""))
    config, params = _load_hf(base, opts, "--base")
    try:
        adapters = load_peft(path, config)
    except _LOAD_ERRORS as e:
        raise DataError(f"--model {path}: {e}") from None
    if opts.mesh is not None:
        shardings = opts.shardings(model.adapter_logical_axes(config, adapters.config))
        adapters = Adapters(jax.device_put(adapters.params, shardings), adapters.config)
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
                        f"(drop --merge-adapters), or merge into --base-dtype bfloat16 or float32 ({path})")


def load_model(path: str | Path, *, dtype: str | None = None, mesh=None, rules: str = "fsdp",
               base: str | Path | None = None, base_dtype: BaseDtype | None = None,
               merge_adapters: bool = False, compute_dtype: str | None = None,
               tokenizer: str | Path | None = None, step: int | None = None) -> LoadedModel:
    """The model `--model path` names (see the module docstring), ready for `jaxtrain.generate.Generator`.

    `dtype` casts float weights (HF folders and runs; default: the config's param_dtype, or the stored
    dtype); `base_dtype` replaces it and also offers int8. With a `mesh`, each device receives only its
    shard of every parameter (`rules`: the sharding table of training). `compute_dtype` replaces the
    config's compute dtype. `tokenizer` replaces the model's own (the folder's, a PEFT base's, the one a
    run trained with). `step` picks a training run's checkpoint (default: the newest intact one); for any other
    kind of model it is an error. Every wrong combination of options raises `DataError` before any weights are
    read.
    """
    path = Path(path)
    base = None if base is None else Path(base)
    if not path.exists():
        raise DataError(f"--model {path}: no such file or directory")
    if base is not None and not base.is_dir():
        raise DataError(f"--base {base}: no such directory")
    opts = _Options(_weights(dtype, base_dtype),
                    None if compute_dtype is None else _float_name(compute_dtype, "--compute-dtype"), mesh, rules)

    adapters = source = run_step = None
    if step is not None and ((path / ADAPTER_CONFIG).is_file() or (path / "config.json").is_file()):
        kind = "a PEFT adapter folder" if (path / ADAPTER_CONFIG).is_file() else "a Hugging Face folder"
        raise DataError(f"--step {step}: --model {path} is {kind}, which has no checkpoints; --step picks a "
                        "checkpoint of a `python -m jaxtrain train` run")
    if (path / ADAPTER_CONFIG).is_file():
        kind, source = "peft_adapters", str(path.resolve())
        _check_merge(merge_adapters, opts.weights, path)
        config, params, adapters, base_info = _load_peft(path, base, opts)
        model_tokenizer = _tokenizer(tokenizer or base, "--tokenizer" if tokenizer else f"--base {base}")
    elif (path / "config.json").is_file():
        kind = "hf_folder"
        _check_whole_model(path, base, merge_adapters)
        model_tokenizer = _tokenizer(tokenizer or path, "--tokenizer" if tokenizer else f"--model {path}")
        config, params = _load_hf(path, opts, "--model")
        base_info = {"path": str(path.resolve()), "sha256": None}
    elif path.is_dir():
        try:
            with Checkpointer(path, read_only=True) as ckpt:
                _, _, metadata = ckpt.read_json(step)
        except FileNotFoundError as e:
            if step is not None and checkpoint_dir(path).is_dir():
                raise DataError(f"--step {step}: {e}") from None
            raise DataError(f"--model {path}: {e}; expected a Hugging Face folder (with config.json), a PEFT "
                            "adapter folder (with adapter_config.json) or a training run directory") from None
        except ValueError as e:  # no intact checkpoint
            raise DataError(f"--model {path}: {e}") from None
        settings = runs.run_settings(metadata)
        if settings is not None:
            kind = "lora_run"
            _check_merge(merge_adapters, opts.weights or settings[1]["dtype"], path)
        else:
            kind = "run"
            _check_whole_model(path, base, merge_adapters)
        run = _load_run(path, step, base, opts)  # the newest intact checkpoint, or --step
        config, params, adapters, run_step = run.config, run.params, run.adapters, run.step
        model_tokenizer = _tokenizer(tokenizer, "--tokenizer") if tokenizer else run.tokenizer
        if kind == "lora_run":
            source = f"{path.resolve()} (step {run.step})"
        if run.base is None:
            base_info = {"path": str(path.resolve()), "sha256": None, "step": run.step}
        else:
            base_info = {"path": run.base["init_from"], "sha256": run.base["sha256"]}
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
            params, adapters = merge(params, adapters), None
    info = {"kind": kind, "step": run_step, "base": base_info, "adapters": adapter_info,
            "tokenizer": model_tokenizer.identity().to_json()}
    return LoadedModel(config, params, adapters, info, model_tokenizer)
