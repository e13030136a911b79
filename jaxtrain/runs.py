"""Training runs as models: the frozen base of a LoRA run, the run's tokenizer, and loading or exporting what
a run trained.

A full-finetune run's checkpoints hold the whole model. A LoRA run's hold the adapters, and its metadata
names the base they adapt (`base_metadata`: the Hugging Face folder it was read from, its sha256, the dtype
and seed), which is read again from there, and must hash the same, whenever the run is used: by
`python -m jaxtrain export` (`export_run`), by `python -m eval` (`load_run`) and by `--resume`. A run
keeps a copy of its tokenizer's files (RUN/tokenizer, `save_run_tokenizer`; none for Mistral 7B's
built-in one), so its export carries the tokenizer and chat template it was trained with even when the
base folder is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from tqdm.auto import tqdm

from data_gen.tokenizer import MISTRAL, HFTokenizer, Tokenizer, get_tokenizer
from jaxtrain import hf_io, model, offload, quant
from jaxtrain.checkpoint import CheckpointConfig, Checkpointer, Restored
from jaxtrain.config import ModelConfig
from jaxtrain.lora import Adapters, BaseDtype, LoraConfig, merge
from jaxtrain.peft_io import ADAPTER_CONFIG, save_peft
from jaxtrain.sharding import logical_to_sharding

# --- the frozen base of a LoRA run --------------------------------------------------------------------


def base_shardings(config: ModelConfig, base_dtype: BaseDtype, mesh, rules, *, on_host: bool = False):
    """Shardings of the frozen base (int8: `qwix.QArray`s of shardings), laid out as in training.

    `on_host`: the layers' projection weights, the embedding and the LM head live in host memory
    (``pinned_host``); the model copies each to the accelerator where it is used, the layers one at a
    time inside the layer scan (`jaxtrain.model.on_device`). The norms' small [layers, hidden] stacks
    stay on the device (see `jaxtrain.offload.stacked_layers`). Not for int8: XLA:TPU reads int8 slices
    from host memory in another tiling than the argument's, so it would first copy the whole int8
    stack into HBM (no saving; and the int8 base of a 7B fits one v5e chip anyway).
    """
    if on_host and base_dtype == "int8":
        raise ValueError("--base-on-host needs --base-dtype bfloat16 or float32: an int8 base in host memory "
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


def base_shapes(config: ModelConfig, base_dtype: BaseDtype):
    """Shapes and dtypes of the frozen base as `load_base` builds it: int8 projections (the embedding,
    LM head and norms in the compute dtype, as `hf_io.load_quantized` reads them), or all in `base_dtype`."""
    dtype = jnp.dtype(config.dtype if base_dtype == "int8" else base_dtype)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), model.param_shapes(config))
    return quant.quantized_shapes(shapes) if base_dtype == "int8" else shapes


def base_fingerprint(init_from: str | None, seed: int) -> str:
    """sha256 over a Hugging Face folder's config.json and safetensors files (what a resume must find
    again), or a name for the random base of a run without --init-from."""
    if not init_from:
        return f"random-init:seed={seed}"
    folder = Path(init_from)
    files = [folder / "config.json"] + sorted(folder.glob("*.safetensors"))
    digest = hashlib.sha256()
    size = sum(f.stat().st_size for f in files)
    with tqdm(total=size, unit="B", unit_scale=True, desc="hash base", disable=size < 2**30) as bar:
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def base_metadata(init_from: str | None, base_dtype: BaseDtype, seed: int) -> dict:
    """What a LoRA checkpoint records of its base: where it was read, in which dtype, and its sha256."""
    init_from = str(epath.Path(init_from).resolve()) if init_from else None
    return {"init_from": init_from, "dtype": base_dtype, "seed": seed,
            "sha256": base_fingerprint(init_from, seed)}


def load_base(config: ModelConfig, *, init_from: str | None, base_dtype: BaseDtype, seed: int = 0,
              shardings=None):
    """The frozen base weights in `base_dtype`, from a Hugging Face folder (int8: quantised tensor by
    tensor while reading) or, without one, the random initialisation `seed` gives a full finetune."""
    overrides = dict(remat=config.remat, dtype=config.dtype, attention_impl=config.attention_impl)
    if init_from and base_dtype == "int8":
        return hf_io.load_quantized(init_from, shardings=shardings, config_overrides=overrides)[1]
    if init_from:
        return hf_io.load_pretrained(init_from, shardings=shardings, dtype=base_dtype, config_overrides=overrides)[1]
    params = model.init_params(config, jax.random.key(seed))
    if base_dtype == "int8":
        params = jax.tree.map(lambda x: x if quant.is_quantized(x) else x.astype(config.dtype),
                              quant.quantize_params(params), is_leaf=quant.is_quantized)
    else:
        params = jax.tree.map(lambda x: x.astype(base_dtype), params)
    return params if shardings is None else jax.device_put(params, shardings)


# --- the run's tokenizer --------------------------------------------------------------------------------

TOKENIZER_DIR = "tokenizer"
GENERATION_CONFIG = "generation_config.json"   # beside the tokenizer's own files: its stop ids


def save_run_tokenizer(run_dir, tokenizer: Tokenizer, *, copy: bool = True) -> dict:
    """With `copy` (process 0 of a pod), a Hugging Face tokenizer's files copied into RUN/tokenizer byte for
    byte (so their sha256 stays the one the shards recorded), with the folder's generation_config.json (its
    stop ids); returns what the checkpoint metadata records."""
    if not isinstance(tokenizer, HFTokenizer):
        return {"source": MISTRAL, **tokenizer.identity().to_json()}
    if copy:
        target = epath.Path(run_dir) / TOKENIZER_DIR
        tokenizer.save_pretrained(target)
        if (tokenizer.folder / GENERATION_CONFIG).is_file():
            (target / GENERATION_CONFIG).write_bytes((tokenizer.folder / GENERATION_CONFIG).read_bytes())
    return {"source": str(tokenizer.folder.resolve()), **tokenizer.identity().to_json()}


def run_tokenizer(run_dir, metadata: dict) -> Tokenizer:
    """The tokenizer a run trained with: its RUN/tokenizer copy (or where it was read from), checked against
    the recorded sha256; Mistral 7B's for runs that record none (written before other tokenizers)."""
    recorded = metadata.get("tokenizer")
    if recorded is None or recorded["source"] == MISTRAL:
        return get_tokenizer(MISTRAL)
    copy = Path(run_dir) / TOKENIZER_DIR
    tokenizer = get_tokenizer(copy if copy.is_dir() else recorded["source"])
    if tokenizer.identity().sha256 != recorded["sha256"]:
        raise ValueError(f"{run_dir}: the tokenizer at {tokenizer.folder} is not the one this run trained with "
                         f"(sha256 {tokenizer.identity().sha256}, the run recorded {recorded['sha256']})")
    return tokenizer


# --- runs -----------------------------------------------------------------------------------------------


def run_settings(metadata: dict) -> tuple[LoraConfig, dict] | None:
    """(LoraConfig, base description) from a checkpoint's metadata, or None for a full finetune."""
    if not metadata.get("lora"):
        return None
    d = metadata["lora"]
    base = dict(metadata["base"])
    if base["dtype"] == "bf16":   # runs written before dtypes had one spelling
        base["dtype"] = "bfloat16"
    return LoraConfig(rank=d["rank"], alpha=d["alpha"], dropout=d["dropout"], targets=tuple(d["targets"])), base


def read_run(run_dir, step: int | None = None) -> tuple[int, ModelConfig, dict]:
    """(step, model config, metadata) of a run's newest complete checkpoint (or `step`), no arrays read."""
    with Checkpointer(run_dir, read_only=True) as ckpt:
        step, config, metadata = ckpt.read_json(step)
    if config is None:
        raise ValueError(f"{run_dir}: the checkpoint of step {step} has no model config")
    return step, config, metadata


def _read_params(run_dir, step: int | None, shardings=None, *, verify: bool = True) -> Restored:
    """The trained arrays of `step`, or of the newest intact checkpoint (`Checkpointer.restore_params`)."""
    with Checkpointer(run_dir, CheckpointConfig(verify=verify), read_only=True) as ckpt:
        return ckpt.restore_params(step, shardings=shardings)


@dataclasses.dataclass
class LoadedRun:
    config: ModelConfig
    params: Any
    """The whole model (full finetune) or the frozen base (LoRA run)."""
    adapters: Adapters | None
    step: int
    base: dict | None
    """LoRA: the base as loaded ("init_from", "dtype", "seed", "sha256"); None for a full finetune."""
    tokenizer: Tokenizer


def load_run(run_dir, step: int | None = None, *, weights: str | None = None, base_path: str | Path | None = None,
             mesh=None, rules=None, config_overrides: dict | None = None, verify: bool = True) -> LoadedRun:
    """A training run's model: the whole model of a full finetune, or a LoRA run's base and adapters.

    `weights`: "int8" or a float dtype for the weights that are not adapters (default: as stored; a LoRA
    run's base as it trained). `base_path`: where a LoRA run's base is now, if it moved (it must hash to
    the recorded sha256). With a `mesh` (and the sharding `rules` of training) each device receives only
    its shard. `config_overrides` (e.g. the compute dtype) apply to the returned config. Without `step`, the
    newest intact checkpoint is read (`LoadedRun.step` says which).
    """
    _, config, metadata = read_run(run_dir, step)
    config = config.replace(**(config_overrides or {}))

    def shardings(logical_axes):
        return None if mesh is None else logical_to_sharding(logical_axes, mesh, rules)

    settings = run_settings(metadata)
    if settings is None:
        restored = _read_params(run_dir, step, shardings(model.param_logical_axes(config)), verify=verify)
        params = restored.params
        if weights == "int8":
            params = quant.quantize_params(params)
            if mesh is not None:
                params = jax.device_put(params, quant.quantized_shardings(shardings(model.param_logical_axes(config))))
        elif weights is not None:
            params = jax.tree.map(lambda x: x.astype(weights), params)
        return LoadedRun(config, params, None, restored.step, None, run_tokenizer(run_dir, metadata))
    lora, recorded = settings
    init_from = str(Path(base_path).resolve()) if base_path is not None else recorded["init_from"]
    if init_from is not None and not Path(init_from).is_dir():
        raise FileNotFoundError(f"{run_dir}: the run's base model {init_from} is not there; give where it is now "
                                "(eval: --base HF_DIR; it must be the same files: the run recorded their sha256)")
    sha256 = base_fingerprint(init_from, recorded["seed"])
    if sha256 != recorded["sha256"]:
        raise ValueError(f"{run_dir}: the base model at {init_from} is not the one this run was trained on "
                         f"(sha256 {sha256}, the run recorded {recorded['sha256']})")
    base_dtype = weights or recorded["dtype"]
    if base_dtype not in ("int8", "bfloat16", "float32"):
        raise ValueError(f"a LoRA run's base loads as int8, bfloat16 or float32 (got {base_dtype})")
    params = load_base(config, init_from=init_from, base_dtype=base_dtype, seed=recorded["seed"],
                       shardings=None if mesh is None else base_shardings(config, base_dtype, mesh, rules))
    restored = _read_params(run_dir, step, shardings(model.adapter_logical_axes(config, lora)), verify=verify)
    base = {**recorded, "init_from": init_from, "dtype": base_dtype, "sha256": sha256}
    return LoadedRun(config, params, Adapters(restored.params, lora), restored.step, base,
                     run_tokenizer(run_dir, metadata))


def export_run(run_dir, out, *, step: int | None = None, merged: bool = False, peft: bool = False,
               dtype: str = "bfloat16", max_shard_size: str = "5GB", verify: bool = True) -> str:
    """Write a run as a Hugging Face folder, or a LoRA run as a PEFT adapter folder (`peft`); returns what
    was written.

    A LoRA run is merged into its base by default (`merged` says so explicitly): the adapters are folded
    into the base as the run read it from disk (bf16/fp32 weights, also for a run trained on the int8
    base, as QLoRA does), computing in float32 and writing in `dtype`. Without `step` the newest intact
    checkpoint is exported. `out` is replaced whole (`_replacing`).
    """
    if merged and peft:
        raise ValueError("--merged and --peft exclude each other")
    _, config, metadata = read_run(run_dir, step)
    settings = run_settings(metadata)
    if settings is None and (merged or peft):
        raise ValueError(f"{run_dir}: --merged/--peft apply to LoRA runs; this run trained all weights")
    with _replacing(out) as folder:
        if settings is None:
            restored = _read_params(run_dir, step, verify=verify)
            hf_io.save_pretrained(folder, restored.model_config, restored.params, dtype=dtype,
                                  max_shard_size=max_shard_size, tokenizer=run_tokenizer(run_dir, metadata))
            return f"the whole model ({dtype}) of step {restored.step}"
        lora, base = settings
        if peft:
            restored = _read_params(run_dir, step, verify=verify)
            save_peft(folder, restored.model_config, Adapters(restored.params, lora), base_model=base["init_from"])
            return f"PEFT adapter folder of step {restored.step} for {base['init_from'] or base['sha256']}"
        base_dtype = "float32" if dtype == "float32" else "bfloat16"
        run = load_run(run_dir, step, weights=base_dtype, verify=verify)
        hf_io.save_pretrained(folder, run.config, merge(run.params, run.adapters, jnp.dtype(base_dtype)),
                              dtype=dtype, max_shard_size=max_shard_size, tokenizer=run.tokenizer)
        return f"merged model ({dtype}) of step {run.step}"


def _holds_export(folder: Path) -> bool:
    return folder.is_dir() and (not any(folder.iterdir()) or (folder / "config.json").is_file()
                                or (folder / ADAPTER_CONFIG).is_file())


@contextlib.contextmanager
def _replacing(out) -> Iterator[Path]:
    """A new folder beside `out` to write an export into; once written it replaces `out` whole (the old folder
    renamed aside, the new one renamed in, the old one deleted), so no file of an earlier export (a stale shard
    or index) survives and a failed export leaves `out` as it was. An `out` that exists and holds no export
    (no config.json or adapter_config.json, not empty) is refused. Only process 0 writes (as in save_pretrained)."""
    target = Path(out).absolute()
    if jax.process_index() != 0:
        yield target
        return
    if target.exists() and not _holds_export(target):
        raise ValueError(f"{target}: {'a file' if target.is_file() else 'a folder'} with no exported model in it "
                         "(no config.json or adapter_config.json); export replaces the whole folder, so give a new "
                         "or empty --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.export-*"):  # of an export that was killed
        shutil.rmtree(leftover)
    new, old = (target.parent / f".{target.name}.export-{kind}-{os.getpid()}" for kind in ("new", "old"))
    new.mkdir()
    try:
        yield new
        if target.exists():
            target.rename(old)
        new.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    finally:
        for path in (new, old):
            if path.exists():
                shutil.rmtree(path)
