"""Random-weight `transformers` models of each supported architecture: the independent reference our port is
tested against."""

from __future__ import annotations

import torch
import transformers

from jaxtrain.config import ModelConfig


def tiny_config(**overrides) -> ModelConfig:
    """A small fp32 config (fp32 compute too, so differences are the port's, not bf16 rounding)."""
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=1e4, sliding_window=None,
                  max_position_embeddings=512, rms_norm_eps=1e-5, param_dtype="float32",
                  dtype="float32", remat="none")
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_model(config: ModelConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """A `transformers` model of `config.architecture` (Mistral, Llama, Qwen2) with random weights (norm
    weights and biases too, so they are tested)."""
    torch.manual_seed(seed)
    fields = config.to_hf_dict("float32")
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = getattr(transformers, config.architecture)(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model
