"""MFU of the train step for a Mistral-7B-shaped model on the local accelerator (the GPU machine, when lent).

Mistral 7B's layer shape (width 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 32000) with as many
layers as fit (tried from `--layers`, largest first), sequence `--seq-len`, bf16 compute, fp32 master
weights, AdamW, answer-only logits as in finetuning (`--answer-tokens` loss tokens per row). Reports step
time, tokens/s, model FLOP/s (`jaxtrain.flops`) and MFU against the device's dense bf16 peak, with the
attention backend the step ran (`jaxtrain.attention.resolve_impl`). Never needed by tests.

    python -m bench.gpu_mfu [--layers 32 16 8 4] [--seq-len 4096] [--batch 1] [--remat full] [--repeats 5]

On CPU it runs as a smoke test of itself (`--layers 1 --seq-len 256`: the peak is then a measured matmul).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bench.common import record, train_step_seconds
from jaxtrain.attention import resolve_impl
from jaxtrain.config import ModelConfig
from jaxtrain.flops import device_peak_flops, train_step_flops


def batch(rows: int, seq_len: int, answer_tokens: int) -> dict:
    """Random tokens, every position real, the loss on the last `answer_tokens` of each row."""
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((rows, seq_len), bool)
    loss_mask[:, -answer_tokens:] = True
    return {"input_ids": rng.integers(3, 32000, (rows, seq_len)).astype(np.int32), "loss_mask": loss_mask,
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 24, 16, 8, 4],
                        help="layer counts to try, largest first; the first that fits is measured")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not 0 < args.answer_tokens <= args.seq_len:
        raise SystemExit(f"--answer-tokens must be in 1..--seq-len ({args.seq_len}); got {args.answer_tokens}")
    base = ModelConfig.preset("mistral-7b-v0.1").replace(dtype="bfloat16", param_dtype="float32",
                                                           remat=args.remat)
    inputs = batch(args.batch, args.seq_len, args.answer_tokens)
    tokens = args.batch * args.seq_len
    for layers in sorted(args.layers, reverse=True):
        config = base.replace(num_layers=layers)
        try:
            seconds = train_step_seconds(config, inputs, answer_only=True, repeats=args.repeats)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"{layers} layers do not fit; trying fewer")
            continue
        flops = train_step_flops(config, tokens, args.seq_len, logit_tokens=args.batch * args.answer_tokens)
        peak = device_peak_flops()
        row = {"device": jax.devices()[0].device_kind, "layers": layers,
               "params_B": round(config.num_params / 1e9, 2), "seq_len": args.seq_len, "batch": args.batch,
               "remat": args.remat,
               "attention": resolve_impl(config.attention_impl, q_len=args.seq_len, kv_len=args.seq_len,
                                         dtype=config.dtype),
               "step_s": round(seconds, 4), "tokens_per_s": round(tokens / seconds),
               "model_TFLOP_per_s": round(flops / seconds / 1e12, 2), "peak_TFLOP_per_s": round(peak / 1e12, 1),
               "mfu": round(flops / seconds / peak, 3)}
        name = "gpu_mfu" if jax.default_backend() == "gpu" else f"mfu_{jax.default_backend()}"
        record(name, "python -m bench.gpu_mfu " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("layers", layers), ("seq_len", args.seq_len),
                                                         ("batch", args.batch), ("remat", args.remat))),
               [row], list(row))
        return
    raise SystemExit(f"none of --layers {args.layers} fits on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
