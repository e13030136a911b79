"""Decoding throughput: our KV-cache generator vs. `transformers.generate`, same model, same machine.

Prefill of a ~4K-token key-value prompt (the paper's format) and greedy decoding of 32 new tokens, at
batch 1 and 8, float32 on both sides. Each phase is timed inside one `generate` call: ours by the
generator's own `Timings`, transformers' by a streamer that timestamps the prompt and every new token.
Our runs and theirs alternate, so load from other jobs on a shared machine hits both alike; the table
keeps the fastest of `--repeats` runs of each. PyTorch runs with 1 thread and with all cores, and each
phase keeps its faster setting: on a busy machine its multi-threaded CPU kernels stall on descheduled
threads (measured: 1 thread was 2-8x faster with two other jobs on the two cores).

    python -m bench.decode [--config mistral-100m] [--repeats 3] [--batches 1 8] [--prompt-tokens 2100]

`--prompt-tokens N` cuts the prompt to its first N tokens: our generator pads a prompt to its length
bucket (`jaxtrain.generate.bucket_length`: 2100 tokens -> 2560) and transformers does not, so this measures what
the padding costs us.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
import transformers

from transformers.generation.streamers import BaseStreamer

from bench.common import record
from bench.train_step import CONFIGS
from data_gen.chat import encode_prompt
from data_gen.tasks import PRESETS, generate_split
from jaxtrain.generate import Generator
from jaxtrain import model

NEW_TOKENS = 32


def kv_prompt() -> list[int]:
    """One paper-simple prompt (~3.9K Mistral tokens)."""
    sample = next(generate_split(PRESETS["paper-simple"], 0, "eval", 1, progress=False))
    return encode_prompt(sample["messages"][0]["content"])


class StepClock(BaseStreamer):
    """Timestamps of what `generate` streams: the prompt first (before the prefill), then each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=None, help="cut the prompt to this many tokens")
    args = parser.parse_args()
    config = CONFIGS[args.config]
    prompt = kv_prompt()
    if args.prompt_tokens is not None:
        if not 1 <= args.prompt_tokens <= len(prompt):
            parser.error(f"--prompt-tokens must be between 1 and the prompt's {len(prompt)} tokens")
        prompt = prompt[:args.prompt_tokens]
    torch.manual_seed(0)
    reference = transformers.MistralForCausalLM(transformers.MistralConfig(**config.to_hf_dict("float32"))).eval()
    reference.config._attn_implementation = "sdpa"
    params = jax.tree.map(np.asarray, model.init_params(config, jax.random.key(0)))
    rows = []
    for batch in args.batches:
        prompts = [prompt] * batch
        gen = Generator(config, params, batch_size=batch)
        ids = torch.tensor(prompts)

        def ours():
            out = gen.generate(prompts, max_new_tokens=NEW_TOKENS, progress=False)
            if {len(g.token_ids) for g in out} != {NEW_TOKENS}:
                raise SystemExit("the random model stopped early; try another seed")
            t = gen.timings
            return t.prefill_s, t.decode_s / t.decode_steps

        def theirs(threads):
            torch.set_num_threads(threads)
            clock = StepClock()
            with torch.no_grad():
                reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0, streamer=clock)
            prompt_at, first, *_, last = clock.times
            return first - prompt_at, (last - first) / (NEW_TOKENS - 1)

        runs = {"ours (JAX, KV cache)": ours, "transformers.generate": lambda: theirs(1),
                "transformers.generate, all cores": lambda: theirs(os.cpu_count())}
        best = {impl: [float("inf")] * 2 for impl in runs}
        for i in range(args.repeats + 1):   # the first round compiles / warms up and is not counted
            for impl, run in runs.items():
                prefill, step = run()
                if i:
                    best[impl] = [min(best[impl][0], prefill), min(best[impl][1], step)]
        theirs_best = best.pop("transformers.generate, all cores")
        best["transformers.generate"] = [min(a, b) for a, b in zip(best["transformers.generate"], theirs_best)]
        for impl, (prefill, step) in best.items():
            rows.append({"batch": batch, "impl": impl, "prompt_tokens": len(prompt),
                         "prefill_s": round(prefill, 4), "prefill_tokens_per_s": round(batch * len(prompt) / prefill),
                         "decode_ms_per_step": round(step * 1e3, 2), "decode_tokens_per_s": round(batch / step, 1)})
        ours_row, theirs_row = rows[-2], rows[-1]
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            ours_row[key.replace("tokens_per_s", "vs_transformers")] = round(ours_row[key] / theirs_row[key], 2)
    name, command = f"decode_{args.config}", f"python -m bench.decode --config {args.config} --repeats {args.repeats}"
    if args.batches != parser.get_default("batches"):
        command += " --batches " + " ".join(map(str, args.batches))
    if args.prompt_tokens is not None:
        name, command = f"{name}_{args.prompt_tokens}tok", f"{command} --prompt-tokens {args.prompt_tokens}"
    record(name, command, rows,
           ["batch", "impl", "prompt_tokens", "prefill_tokens_per_s", "prefill_vs_transformers",
            "decode_tokens_per_s", "decode_vs_transformers"])


if __name__ == "__main__":
    main()
