"""Typed model configuration with named presets, convertible to and from Hugging Face `config.json`.

Everything the Flax port needs to reproduce a checkpoint exactly is a field here (RoPE theta and the
sliding window included: getting either wrong silently breaks parity with the released weights).
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


def _type_problems(values: dict, ints: tuple[str, ...], numbers: tuple[str, ...]) -> list[str]:
    """What is not a JSON integer / number among `values` (a config.json holding "64" for 64, say)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    problems = [f"{k} must be an integer, got {values[k]!r}" for k in ints
                if values.get(k) is not None and not is_int(values[k])]
    return problems + [f"{k} must be a number, got {values[k]!r}" for k in numbers
                       if values.get(k) is not None and (isinstance(values[k], bool)
                                                         or not isinstance(values[k], int | float))]
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv_proj", "save_out_proj", "offload_dots", "offload_input")


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
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "full"
    attention_impl: str = "auto"

    def __post_init__(self):
        problems = _type_problems(dataclasses.asdict(self), _INTS + ("sliding_window",), ("rope_theta", "rms_norm_eps"))
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))
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

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
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
        if problems := _type_problems(d, _HF_INTS, ("rope_theta", "rms_norm_eps")):
            raise ValueError("; ".join(problems))
        archs = d.get("architectures") or ["MistralForCausalLM"]
        if d.get("model_type", "mistral") != "mistral" or "MistralForCausalLM" not in archs:
            raise ValueError(f"unsupported architecture: model_type={d.get('model_type')!r}, "
                             f"architectures={archs}; only MistralForCausalLM checkpoints are supported")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise ValueError(f"unsupported RoPE scaling {rope or d.get('rope_scaling')}; only plain RoPE")
        num_heads = d["num_attention_heads"]
        fields = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=num_heads, num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            sliding_window=d.get("sliding_window"),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
        )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; Mistral uses silu")
        fields.update(overrides)
        return cls(**fields)

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict:
        return {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window, "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "attention_dropout": 0.0,
            "use_cache": True, "torch_dtype": torch_dtype,
        }

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
    # The CPU demo's model: width 128 (at 64 even one-token associative recall does not form; docs/demo.md).
    "demo": ModelConfig(vocab_size=32000, hidden_size=128, intermediate_size=384, num_layers=2,
                          num_heads=4, num_kv_heads=4, head_dim=32, rope_theta=1e4, sliding_window=4096,
                          max_position_embeddings=32768, rms_norm_eps=1e-5, dtype="float32", remat="none"),
}
PRESETS["mistral-7b-instruct-v0.1"] = PRESETS["mistral-7b-v0.1"]
