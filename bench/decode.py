"""Decoding throughput: our KV-cache generator vs. `transformers.generate`, same model, same machine.

Prefill of a ~4K-token key-value prompt (the paper's format) and greedy decoding of 32 new tokens, at
batch 1 and 8.

    python -m bench.decode [--config mistral-100m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
import transformers

from bench.common import best_time, record
from bench.train_step import CONFIGS
from data_gen.chat import encode_prompt
from data_gen.tasks import PRESETS, generate_split
from eval.decode import Generator
from jaxtrain import model

NEW_TOKENS = 32


def kv_prompt() -> list[int]:
    """One paper-simple prompt (~3.9K Mistral tokens)."""
    sample = next(generate_split(PRESETS["paper-simple"], 0, "eval", 1, progress=False))
    return encode_prompt(sample["messages"][0]["content"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = CONFIGS[args.config]
    prompt = kv_prompt()
    torch.manual_seed(0)
    reference = transformers.MistralForCausalLM(transformers.MistralConfig(**config.to_hf_dict("float32"))).eval()
    reference.config._attn_implementation = "sdpa"
    params = jax.tree.map(np.asarray, model.init_params(config, jax.random.key(0)))
    torch.set_num_threads(os.cpu_count())
    rows = []
    for batch in (1, 8):
        prompts = [prompt] * batch
        gen = Generator(config, params, batch_size=batch)

        def ours(n):
            return lambda: gen.generate(prompts, max_new_tokens=n, progress=False)

        ids = torch.tensor(prompts)

        def theirs(n):
            def run():
                with torch.no_grad():
                    reference.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return run

        lengths = {len(g.token_ids) for g in gen.generate(prompts, max_new_tokens=NEW_TOKENS, progress=False)}
        if lengths != {NEW_TOKENS}:
            raise SystemExit(f"the random model stopped early ({lengths} tokens); try another seed")
        for impl, make in (("ours (JAX, KV cache)", ours), ("transformers.generate", theirs)):
            prefill = best_time(make(1), repeats=args.repeats)
            total = best_time(make(NEW_TOKENS), repeats=args.repeats)
            rows.append({"batch": batch, "impl": impl, "prompt_tokens": len(prompt),
                         "prefill_tokens_per_s": round(batch * len(prompt) / prefill),
                         "decode_tokens_per_s": round(batch * (NEW_TOKENS - 1) / max(total - prefill, 1e-9), 1)})
    record(f"decode_{args.config}", f"python -m bench.decode --config {args.config}", rows,
           ["batch", "impl", "prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s"])


if __name__ == "__main__":
    main()
