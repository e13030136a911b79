"""Typed model configuration with named presets, convertible to and from Hugging Face `config.json`.

One config describes the Llama family of decoders this port runs: Llama 2/3.x (`LlamaForCausalLM`, plain RoPE
or Llama 3.1's `llama3` frequency scaling, tied or untied embeddings), Qwen2/2.5 (`Qwen2ForCausalLM`: biases
on the q/k/v projections) and Mistral v0.1-v0.3 (`MistralForCausalLM`: a sliding window in v0.1). They share
one forward pass; the differences are fields here. Everything the Flax port needs to reproduce a checkpoint
exactly is a field (RoPE and the sliding window included: getting either wrong silently breaks parity with
the released weights), and anything a checkpoint asks for that the port does not do is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
         "max_position_embeddings")
_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
_RUN_SETTINGS = ("bos_token_id", "eos_token_id", "param_dtype", "dtype", "remat", "attention_impl")
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv_proj", "save_out_proj", "offload_dots", "offload_input")
# Hugging Face architecture -> its config.json model_type.
ARCHITECTURES = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _type_problems(values: dict, ints: tuple[str, ...], numbers: tuple[str, ...]) -> list[str]:
    """What is not a JSON integer / number among `values` (a config.json holding "64" for 64, say)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    problems = [f"{k} must be an integer, got {values[k]!r}" for k in ints
                if values.get(k) is not None and not is_int(values[k])]
    return problems + [f"{k} must be a number, got {values[k]!r}" for k in numbers
                       if values.get(k) is not None and (isinstance(values[k], bool)
                                                         or not isinstance(values[k], int | float))]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (`rope_type: llama3`): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, shorter than
    .../ high_freq_factor kept, and those in between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: default, llama3")
        if not (self.factor > 0 and self.high_freq_factor > self.low_freq_factor > 0
                and self.original_max_position_embeddings > 0):
            raise ValueError(f"llama3 RoPE scaling needs factor > 0, high_freq_factor > low_freq_factor > 0 and "
                             f"original_max_position_embeddings > 0 (got {self})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    sliding_window: int | None
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool = False
    architecture: str = "MistralForCausalLM"
    """the Hugging Face architecture it exports as; Qwen2 adds q/k/v biases"""
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "full"
    attention_impl: str = "auto"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):   # read back from JSON (checkpoints, from_json)
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        problems = _type_problems(dataclasses.asdict(self), _INTS + ("sliding_window",), ("rope_theta", "rms_norm_eps"))
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
        if self.architecture not in ARCHITECTURES:
            problems.append(f"architecture must be one of {sorted(ARCHITECTURES)} (got {self.architecture!r})")
        if self.sliding_window is not None and self.architecture == "LlamaForCausalLM":
            problems.append("LlamaForCausalLM has no sliding window (got sliding_window="
                            f"{self.sliding_window})")
        for name in _INTS:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive (got {getattr(self, name)})")
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                            f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for rotary embeddings (got {self.head_dim})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive or None (got {self.sliding_window})")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            problems.append("rope_theta and rms_norm_eps must be positive")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                problems.append(f"{name} must be one of {DTYPES} (got {getattr(self, name)!r})")
        if self.remat not in REMAT_POLICIES:
            problems.append(f"remat must be one of {REMAT_POLICIES} (got {self.remat!r})")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """"field: ours vs theirs" for every field that changes the weights or the computation (not the token
        ids, dtypes, remat or attention kernel, which are run settings)."""
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in dataclasses.fields(self)
                if f.name not in _RUN_SETTINGS and getattr(self, f.name) != getattr(other, f.name)]

    @property
    def qkv_bias(self) -> bool:
        """Biases on the query, key and value projections (Qwen2's)."""
        return self.architecture == "Qwen2ForCausalLM"

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        biases = self.head_dim * (self.num_heads + 2 * self.num_kv_heads) if self.qkv_bias else 0
        per_layer = attn + biases + 3 * d * f + 2 * d
        return self.num_layers * per_layer + d + v * d * (1 if self.tie_word_embeddings else 2)

    @classmethod
    def resolve(cls, model: str, **overrides) -> ModelConfig:
        """The config of `model`, a preset name or a Hugging Face folder (its config.json), with the given
        overrides (None values leave the field as it is): the one resolver of every command."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if Path(model).is_dir():
            return cls.from_pretrained(model, **overrides)
        return cls.preset(model).replace(**overrides)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    # --- Hugging Face config.json -------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> ModelConfig:
        """The config of a Hugging Face `config.json` of a supported architecture; anything the port does not
        compute (another architecture, RoPE scaling, biases, activation) is refused with the field named."""
        if problems := _type_problems(d, _HF_INTS, ("rope_theta", "rms_norm_eps")):
            raise ValueError("; ".join(problems))
        model_type = d.get("model_type", "mistral")
        archs = d.get("architectures") or [a for a, t in ARCHITECTURES.items() if t == model_type][:1]
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None or ARCHITECTURES[arch] != model_type:
            raise ValueError(f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        _refuse_unsupported(d, arch)
        rope = _rope_parameters(d)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                      high_freq_factor=float(rope["high_freq_factor"]),
                                      original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
            except KeyError as e:
                raise ValueError(f"rope_scaling of type llama3 needs field {e}") from None
        elif rope_type != "default":
            raise ValueError(f"unsupported RoPE scaling: rope_type {rope_type!r} ({rope}); supported: default, llama3")
        num_heads = d["num_attention_heads"]
        fields = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            sliding_window=_sliding_window(d, arch),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            architecture=arch, rope_scaling=scaling,
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict:
        """config.json of the same architecture (legacy `rope_theta` / `rope_scaling` keys, which transformers
        4.x reads and 5.x standardises)."""
        out = {
            "architectures": [self.architecture], "model_type": ARCHITECTURES[self.architecture],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True, "torch_dtype": torch_dtype,
        }
        if self.rope_scaling is not None:
            out["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.architecture == "MistralForCausalLM":
            out["sliding_window"] = self.sliding_window
        elif self.architecture == "LlamaForCausalLM":
            out.update(attention_bias=False, mlp_bias=False)
        else:   # Qwen2: every layer slides when there is a window (max_window_layers 0), none otherwise
            window = self.sliding_window is not None
            out.update(use_sliding_window=window, sliding_window=self.sliding_window,
                       max_window_layers=0 if window else self.num_layers)
        return out
    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> ModelConfig:
        file = Path(path) / "config.json"
        try:
            d = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{file}: no config.json; is {path} a Hugging Face model folder?") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d, **overrides)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{file}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))


def _rope_parameters(d: dict) -> dict:
    """RoPE settings from either spelling: transformers 5's `rope_parameters`, or `rope_scaling` + `rope_theta`."""
    rope = dict(d.get("rope_parameters") or {})
    for key, value in (d.get("rope_scaling") or {}).items():
        rope.setdefault(key, value)
    return rope


def _sliding_window(d: dict, arch: str) -> int | None:
    """Mistral's `sliding_window`; Qwen2's only with `use_sliding_window`, and only if every layer slides
    (the window then applies from layer `max_window_layers` on, which must be 0)."""
    if arch == "MistralForCausalLM":
        return d.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
        layer_types = d.get("layer_types")
        every = (set(layer_types) == {"sliding_attention"} if layer_types
                 else d.get("max_window_layers", d["num_hidden_layers"]) == 0)
        if not every:
            raise ValueError("use_sliding_window with a window on some layers only (max_window_layers / layer_types) "
                             "is not supported; every layer must slide, or none")
        return d.get("sliding_window")
    return None


def _refuse_unsupported(d: dict, arch: str) -> None:
    """Fields that would change the computation in ways the port does not implement, named."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; this model family uses silu")
    if d.get("attention_bias"):
        raise ValueError("attention_bias: biases on the q/k/v/o projections are not supported (Qwen2's q/k/v "
                         "biases are, with architecture Qwen2ForCausalLM)")
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias: biases on the MLP projections are not supported")
    for key in ("num_local_experts", "num_experts", "moe_intermediate_size"):
        if d.get(key):
            raise ValueError(f"{key}: mixture-of-experts models are not supported")
    rope = _rope_parameters(d)
    if float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial_rotary_factor: RoPE on part of each head is not supported")
    if arch != "Qwen2ForCausalLM" and d.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window is a Qwen2 field; {arch} is not supported with it")


_MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5)

PRESETS: dict[str, ModelConfig] = {
    "mistral-7b-v0.1": ModelConfig(**_MISTRAL_7B, rope_theta=1e4, sliding_window=4096,
                                     max_position_embeddings=32768),
    "mistral-7b-instruct-v0.2": ModelConfig(**_MISTRAL_7B, rope_theta=1e6, sliding_window=None,
                                              max_position_embeddings=32768),
    # Same architecture at a few million parameters (most of them the 32000-token embeddings): tests, CPU demo.
    "tiny": ModelConfig(vocab_size=32000, hidden_size=64, intermediate_size=192, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, sliding_window=4096,
                          max_position_embeddings=32768, rms_norm_eps=1e-5, dtype="float32", remat="none"),
}
PRESETS["mistral-7b-instruct-v0.1"] = PRESETS["mistral-7b-v0.1"]
