"""Hugging Face checkpoints in and out: `load_pretrained`, `load_quantized` (int8 projections, quantised
tensor by tensor while reading) and `save_pretrained`.

The converter lives next to the model it converts. One table (`_tensor_specs`) says, for every
parameter, which Hugging Face tensor it is and whether the layout is transposed; loading and saving both
read it, so the two directions cannot drift apart.

Loading never holds the model twice: every parameter is built with `jax.make_array_from_callback`, so
each device (or the one default device) receives only its own slice, read from memory-mapped
safetensors one layer at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from data_gen.tokenizer import MISTRAL, Tokenizer, get_tokenizer
from jaxtrain import model, quant
from jaxtrain.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    path: tuple[str, ...]        # where the parameter sits in our tree
    hf_name: str                 # Hugging Face name; "{i}" is the layer index for stacked parameters
    hf_shape: tuple[int, ...]    # shape of one Hugging Face tensor (one layer's, for stacked ones)
    transposed: bool             # HF stores nn.Linear weights as [out, in]; we store [in, out...]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def _tensor_specs(config: ModelConfig) -> list[_TensorSpec]:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer = "model.layers.{i}."
    specs = [
        _TensorSpec(("embed",), "model.embed_tokens.weight", (v, d), False),
        _TensorSpec(("final_norm", "weight"), "model.norm.weight", (d,), False),
        _TensorSpec(("layers", "attn_norm", "weight"), layer + "input_layernorm.weight", (d,), False),
        _TensorSpec(("layers", "mlp_norm", "weight"), layer + "post_attention_layernorm.weight", (d,), False),
        _TensorSpec(("layers", "attn", "wq"), layer + "self_attn.q_proj.weight", (q, d), True),
        _TensorSpec(("layers", "attn", "wk"), layer + "self_attn.k_proj.weight", (kv, d), True),
        _TensorSpec(("layers", "attn", "wv"), layer + "self_attn.v_proj.weight", (kv, d), True),
        _TensorSpec(("layers", "attn", "wo"), layer + "self_attn.o_proj.weight", (d, q), True),
        _TensorSpec(("layers", "mlp", "gate"), layer + "mlp.gate_proj.weight", (f, d), True),
        _TensorSpec(("layers", "mlp", "up"), layer + "mlp.up_proj.weight", (f, d), True),
        _TensorSpec(("layers", "mlp", "down"), layer + "mlp.down_proj.weight", (d, f), True),
    ]
    if config.qkv_bias:
        specs += [_TensorSpec(("layers", "attn", b), layer + f"self_attn.{proj}.bias", (n,), False)
                  for b, proj, n in (("bq", "q_proj", q), ("bk", "k_proj", kv), ("bv", "v_proj", kv))]
    if not config.tie_word_embeddings:
        specs.append(_TensorSpec(("lm_head",), "lm_head.weight", (v, d), True))
    return specs


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# --- Loading -----------------------------------------------------------------------------------------

class _SafetensorsFolder:
    """Tensor name → file for a folder of (possibly sharded) safetensors, with errors that name both."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[Path, Any] = {}
        index = folder / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors files and no {INDEX_FILE}")
            self.files = {}
            for file in files:
                for name in self._open(file).keys():
                    self.files[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="numpy")
            except FileNotFoundError:
                raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but missing") from None
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{file}: unreadable or truncated safetensors file ({e})") from None
        return self._handles[file]

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.files:
            raise KeyError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        file = self.files[name]
        handle = self._open(file)
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: cannot read tensor {name!r} ({e}); is the file truncated?") from None
        if tensor.shape != shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {tensor.shape}, expected {shape} "
                             f"from config.json")
        return tensor


def _to_ours(tensor: np.ndarray, spec: _TensorSpec, layer_shape: tuple[int, ...]) -> np.ndarray:
    return (tensor.T if spec.transposed else tensor).reshape(layer_shape)


def load_pretrained(path: str | Path, *, shardings=None, dtype: str | None = None,
                    config_overrides: dict | None = None) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face folder of a supported architecture (`config.json` + safetensors) into our parameters.

    `shardings`: an optional tree of `jax.sharding.Sharding` matching the parameters; each device then
    receives only its slice. `dtype` defaults to the config's `param_dtype` (fp32 master weights).
    """
    folder = Path(path)
    config = ModelConfig.from_pretrained(folder, **(config_overrides or {}))
    dtype = jnp.dtype(dtype or config.param_dtype)
    source = _SafetensorsFolder(folder)
    shapes = model.param_shapes(config)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: dict = {}
    for spec in _tensor_specs(config):
        shape = _get(shapes, spec.path).shape
        sharding = _get(shardings, spec.path) if shardings is not None else default
        layer_shape = shape[1:] if spec.stacked else shape

        @functools.lru_cache(maxsize=1)
        def layer(i, spec=spec, layer_shape=layer_shape):
            name = spec.hf_name.format(i=i)
            return _to_ours(source.read(name, spec.hf_shape), spec, layer_shape).astype(dtype)

        def callback(index, spec=spec, layer=layer, shape=shape):
            if not spec.stacked:
                return layer(None)[index]
            layers = range(*index[0].indices(shape[0]))
            return np.stack([layer(i)[index[1:]] for i in layers])

        _set(params, spec.path, jax.make_array_from_callback(shape, sharding, callback))
    return config, params


# --- Loading int8: quantise tensor by tensor ---------------------------------------------------------------

def load_quantized(path: str | Path, *, shardings=None, dtype: str | None = None,
                   config_overrides: dict | None = None):
    """(ModelConfig, params) with int8 projections (`jaxtrain.quant`), read from a Hugging Face folder
    tensor by tensor.

    Each projection tensor is read from the memory-mapped safetensors, quantised in numpy and only its
    int8 values are kept (per weight kind, all layers stacked: 1.8 GiB for Mistral 7B's largest), so the
    host never holds the bf16 model; devices receive their shards directly. The other tensors load
    in `dtype` (default: the compute dtype). `shardings`: a tree like `quantized_shardings`' output.
    """
    folder = Path(path)
    config = ModelConfig.from_pretrained(folder, **(config_overrides or {}))
    dtype = jnp.dtype(dtype or config.dtype)
    source = _SafetensorsFolder(folder)
    shapes = quant.quantized_shapes(model.param_shapes(config))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: dict = {}
    for spec in _tensor_specs(config):
        target = _get(shapes, spec.path)
        sharding = _get(shardings, spec.path) if shardings is not None else None
        name = spec.path[-1]

        def read(i, spec=spec, target=target):
            layer_shape = (target.qvalue if quant.is_quantized(target) else target).shape[1 if spec.stacked else 0:]
            return _to_ours(source.read(spec.hf_name.format(i=i), spec.hf_shape), spec, layer_shape)

        if not quant.is_quantized(target):
            array = jax.make_array_from_callback(
                target.shape, sharding or default,
                _stacked_callback(lambda i, read=read: read(i).astype(dtype), spec.stacked, target.shape))
            _set(params, spec.path, array)
            continue
        layers = target.qvalue.shape[0]
        values: list[np.ndarray] = []
        scales: list[np.ndarray] = []
        for i in range(layers):
            q, s = quant.quantize_np(read(i), quant.INPUT_DIMS[name])
            values.append(q)
            scales.append(s)
        q_all, s_all = np.stack(values), np.stack(scales)
        del values, scales
        q_sharding = sharding.qvalue if sharding is not None else default
        s_sharding = sharding.scale if sharding is not None else default
        _set(params, spec.path, qwix.QArray(
            jax.make_array_from_callback(q_all.shape, q_sharding, lambda idx, a=q_all: a[idx]),
            jax.make_array_from_callback(s_all.shape, s_sharding, lambda idx, a=s_all: a[idx]),
            qtype=jnp.int8))
    return config, params


def _stacked_callback(layer, stacked: bool, shape):
    cached = functools.lru_cache(maxsize=1)(layer)

    def callback(index):
        if not stacked:
            return cached(None)[index]
        return np.stack([cached(i)[index[1:]] for i in range(*index[0].indices(shape[0]))])
    return callback


# --- Saving ------------------------------------------------------------------------------------------

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse shard size {size!r}; use bytes or e.g. '5GB', '500MB'")
    units = {None: 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[match.group(2) and match.group(2).lower()])


def _host(array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        array = multihost_utils.process_allgather(array, tiled=True)
    return np.asarray(jax.device_get(array))


def _hf_tensors(config: ModelConfig, params, dtype):
    """Yield (HF name, tensor) one at a time, converted to the HF layout and dtype."""
    for spec in _tensor_specs(config):
        value = _host(_get(params, spec.path))
        for i, layer in (enumerate(value) if spec.stacked else [(None, value)]):
            out_in = spec.hf_shape[::-1] if spec.transposed else spec.hf_shape
            tensor = layer.reshape(out_in)
            yield spec.hf_name.format(i=i), np.ascontiguousarray(tensor.T if spec.transposed else tensor,
                                                                  dtype=dtype)


def save_pretrained(path: str | Path, config: ModelConfig, params, *, dtype: str = "bfloat16",
                    max_shard_size: int | str = "5GB", tokenizer: Tokenizer | str | None = MISTRAL) -> None:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads, and with `tokenizer`
    (a `data_gen.tokenizer.Tokenizer`, or what `get_tokenizer` takes; None: none) its tokenizer files and
    chat template, so `AutoTokenizer.from_pretrained(path).apply_chat_template` formats chats as in training.

    Tensors are converted and written one shard at a time; only process 0 writes on a multi-host pod.
    """
    limit = _parse_size(max_shard_size)
    np_dtype = jnp.dtype(dtype)
    out = Path(path)
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    total_size = 0
    pending = []
    for name, tensor in _hf_tensors(config, params, np_dtype):
        if sizes[-1] and sizes[-1] + tensor.nbytes > limit:
            pending.append(_flush(out, shards[-1], len(pending), writer))
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor
        sizes[-1] += tensor.nbytes
        total_size += tensor.nbytes
    pending.append(_flush(out, shards[-1], len(pending), writer))
    if not writer:
        return
    count = len(pending)
    weight_map = {}
    for i, (tmp, names) in enumerate(pending):
        final = out / (f"model-{i + 1:05d}-of-{count:05d}.safetensors" if count > 1 else "model.safetensors")
        tmp.rename(final)
        weight_map.update({name: final.name for name in names})
    if count > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(str(np_dtype)), indent=2) + "\n")
    hf = config.to_hf_dict()
    tokenizer = None if tokenizer is None else get_tokenizer(tokenizer)
    # The tokenizer's stop ids (e.g. Llama 3's <|eot_id|> beside <|end_of_text|>), so generation stops there.
    eos = hf["eos_token_id"] if tokenizer is None else list(tokenizer.stop_ids)
    if isinstance(eos, list) and len(eos) == 1:
        eos = eos[0]
    generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """safetensors' save_file, with the file mode any new file gets (0644 under umask 022; save_file makes 0600)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _flush(out: Path, tensors: dict[str, np.ndarray], number: int, writer: bool):
    """Write one shard under a temporary name (renamed once the shard count is known)."""
    tmp = out / f".shard-{number:05d}.safetensors.tmp"
    if writer:
        write_safetensors(tensors, tmp)
    names = list(tensors)
    tensors.clear()
    return tmp, names
