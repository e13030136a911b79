"""MDQA prompts per second on the real SmolLM2-135M-Instruct: our JAX evaluation vs `transformers.generate`.

The same prompts on both sides: the first `--questions` questions of the 20-document MDQA file (gold at
position 1), in the model's chat template (~3.1K tokens each), greedy, at most 100 new tokens, stopping at
the first newline of the answer as `python -m eval mdqa` does (transformers: its `stop_strings`), float32,
batched (`--batch`: both sides left-pad the batch; ours also pads it to its length bucket). Whole calls are
timed, prefill and decoding together, which is what an evaluation costs; ours after a first call of the
same shapes (compilation is reported apart), PyTorch with 1 thread and with all cores, keeping its faster.
Our calls and theirs alternate, so load from other jobs hits both alike.

    python -m bench.mdqa_speed [--model models/smollm2-135m-instruct] [--questions 16] [--batch 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import torch
import transformers

from bench.common import record
from data_gen.tokenizer import get_tokenizer
from eval.mdqa import prompt_text
from eval.readers import find_position_files, read_mdqa_file
from jaxtrain.generate import Generator
from jaxtrain.hf_io import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 100


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mdqa")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    tokenizer = get_tokenizer(args.model)
    examples = read_mdqa_file(find_position_files(args.data, 20)[0])[:args.questions]
    prompts = [tokenizer.encode_prompt(prompt_text(ex.question, ex.documents)) for ex in examples]
    config, params = load_pretrained(args.model, config_overrides=dict(dtype="float32", remat="none"))
    gen = Generator(config, params, tokenizer=tokenizer, batch_size=args.batch)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, padding_side="left")
    reference = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    reference.config._attn_implementation = "sdpa"

    def ours():
        return [g.text for g in gen.generate(prompts, max_new_tokens=MAX_NEW_TOKENS, stop_strings=("\n",),
                                             progress=False, skip_leading_whitespace=True)]

    def theirs(threads):
        torch.set_num_threads(threads)
        texts = []
        for i in range(0, len(prompts), args.batch):
            rows = prompts[i:i + args.batch]
            width = max(map(len, rows))
            ids = torch.tensor([[hf_tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            with torch.no_grad():
                out = reference.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                         stop_strings=["\n"], tokenizer=hf_tokenizer,
                                         pad_token_id=hf_tokenizer.pad_token_id)
            texts += hf_tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return texts

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    runs = {"ours (JAX)": ours, "transformers.generate, 1 thread": lambda: theirs(1),
            "transformers.generate, all cores": lambda: theirs(os.cpu_count())}
    best = {impl: float("inf") for impl in runs}
    answers = {}
    for _ in range(args.repeats):
        for impl, run in runs.items():
            start = time.perf_counter()
            answers[impl] = run()
            best[impl] = min(best[impl], time.perf_counter() - start)
    theirs_s = min(best["transformers.generate, 1 thread"], best["transformers.generate, all cores"])
    same = sum(a.strip().split("\n")[0] == b.strip().split("\n")[0]
               for a, b in zip(answers["ours (JAX)"], answers["transformers.generate, 1 thread"], strict=True))
    tokens = sum(map(len, prompts))
    rows = [{"impl": "ours (JAX)", "seconds": round(best["ours (JAX)"], 1),
             "prompts_per_s": round(len(prompts) / best["ours (JAX)"], 3),
             "vs_transformers": round(theirs_s / best["ours (JAX)"], 2)},
            {"impl": "transformers.generate", "seconds": round(theirs_s, 1),
             "prompts_per_s": round(len(prompts) / theirs_s, 3), "vs_transformers": 1.0}]
    command = (f"python -m bench.mdqa_speed --questions {args.questions} --batch {args.batch} "
               f"--repeats {args.repeats}")
    record("mdqa_speed_smollm2", command, rows, ["impl", "seconds", "prompts_per_s", "vs_transformers"],
           prompts=len(prompts), prompt_tokens=tokens, batch=args.batch, compile_s=round(compile_s, 1),
           same_first_line=f"{same}/{len(prompts)}")


if __name__ == "__main__":
    main()
