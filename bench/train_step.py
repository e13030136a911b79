"""Train-step throughput: our jitted step (forward + backward + AdamW) vs. PyTorch `transformers`.

Same machine, same config, same batch of real shard data (the demo task: 8 rows of <= 256 tokens, loss on
the answer). Reports tokens/s, our speed-up, and achieved model FLOP/s as a fraction of a large matmul's
(model FLOPs count the LM head only where a step computes it: the answer tokens, for answer-only logits).

    python -m bench.train_step [--configs tiny mistral-100m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import torch
import transformers

from bench.common import best_time, matmul_ceiling, record, train_step_seconds
from jaxtrain.config import ModelConfig
from jaxtrain.flops import train_step_flops

CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    # A ~110M-parameter Mistral shape (most of it the 32000-token embeddings and head).
    "mistral-100m": ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2688, num_layers=8,
                                  num_heads=12, num_kv_heads=4, head_dim=64, rope_theta=1e4,
                                  sliding_window=4096, max_position_embeddings=32768, rms_norm_eps=1e-5,
                                  dtype="float32", remat="none"),
}


def demo_batch(rows: int = 8) -> dict:
    """A batch of real shards: the demo preset's prompts, tokenized and bucketed by data_gen."""
    from data_gen.shards import open_shards
    from data_gen.tasks import PRESETS, generate
    from jaxtrain.batches import BatchConfig, BucketedBatches
    import subprocess
    import sys

    folder = tempfile.mkdtemp()
    generate(PRESETS["demo-simple"], 0, f"{folder}/data")
    subprocess.run([sys.executable, "-m", "data_gen", "shards", "--input", f"{folder}/data/train.jsonl",
                    "--out", f"{folder}/shards"], check=True, capture_output=True)
    batches = BucketedBatches(open_shards(f"{folder}/shards"), BatchConfig(global_batch=rows, prefetch=0))
    return next(batches)


def theirs(config: ModelConfig, batch: dict, repeats: int) -> float:
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**config.to_hf_dict("float32")))
    model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    attention = torch.tensor(batch["segment_ids"], dtype=torch.long)
    labels = torch.where(torch.tensor(batch["loss_mask"]), ids, torch.tensor(-100))

    def step():
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()

    return best_time(step, repeats=repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch = demo_batch()
    tokens = int(np.asarray(batch["segment_ids"]).sum())
    seq_len = int(batch["bucket_len"])
    loss_tokens = int(np.asarray(batch["loss_mask"]).sum())
    ceiling = matmul_ceiling()
    torch.set_num_threads(os.cpu_count())
    rows = []
    for name in args.configs:
        config = CONFIGS[name]
        t_torch = theirs(config, batch, args.repeats)
        for label, answer_only in (("ours, answer-only logits", True), ("ours, full logits", False)):
            t = train_step_seconds(config, batch, answer_only, args.repeats)
            flops = train_step_flops(config, tokens, seq_len, logit_tokens=loss_tokens if answer_only else None)
            rows.append({"config": name, "params_M": round(config.num_params / 1e6, 1), "impl": label,
                         "tokens_per_s": round(tokens / t), "speedup_vs_torch": round(t_torch / t, 2),
                         "model_flops_fraction_of_matmul": round(flops / t / ceiling, 3)})
        rows.append({"config": name, "params_M": round(config.num_params / 1e6, 1),
                     "impl": "transformers + torch.optim.AdamW", "tokens_per_s": round(tokens / t_torch),
                     "speedup_vs_torch": 1.0,
                     "model_flops_fraction_of_matmul": round(train_step_flops(config, tokens, seq_len)
                                                             / t_torch / ceiling, 3)})
    print(f"batch: {batch['input_ids'].shape[0]} rows x {seq_len} tokens ({tokens} real); "
          f"matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    record("train_step", "python -m bench.train_step", rows,
           ["config", "params_M", "impl", "tokens_per_s", "speedup_vs_torch", "model_flops_fraction_of_matmul"],
           matmul_ceiling_gflops=round(ceiling / 1e9, 1))


if __name__ == "__main__":
    main()
