"""Model FLOPs of a training step and accelerator peaks, for MFU and for the AOT reports.

Counted the usual way (matmul FLOPs, 2 per multiply-add; backward = 2 × forward, so 6 per parameter per
token for the weight matmuls) plus causal attention. The LM head is counted only for the tokens whose
logits the step computes (answer-only loss), so the figure is the work the model really needs.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from jaxtrain.config import ModelConfig

# Dense bf16 peak FLOP/s per device (chip, or megacore chip for v4/v5p), from the vendors' spec sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def attention_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of QK^T and PV for one token, averaged over a causal (windowed) sequence."""
    window = min(seq_len, config.sliding_window or seq_len)
    mean_context = window / 2 if window == seq_len else window - window * window / (2 * seq_len)
    return 4 * config.num_layers * config.num_heads * config.head_dim * mean_context


def train_step_flops(config: ModelConfig, tokens: int, seq_len: int, logit_tokens: int | None = None) -> float:
    """Forward + backward FLOPs of one step over `tokens` tokens of sequences of `seq_len`.

    `logit_tokens`: how many positions go through the LM head (default: all of them).
    """
    d, v = config.hidden_size, config.vocab_size
    body = config.num_params - v * d * (1 if config.tie_word_embeddings else 2)
    logit_tokens = tokens if logit_tokens is None else logit_tokens
    return 6.0 * body * tokens + 6.0 * v * d * logit_tokens + 3 * attention_flops_per_token(config, seq_len) * tokens


@functools.cache
def device_peak_flops() -> float:
    """Peak FLOP/s of one local device: the spec sheet for TPUs/GPUs, a measured matmul on CPU."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        out = matmul(a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)
