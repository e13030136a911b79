"""Expected time and chip-hours of the paper's experiment on TPUs: an estimate, not a measurement.

    .venv/bin/python bench/tpu_cost.py [--utilisation 0.3 0.5] [--price v5e=1.2 ...]

Training: the FLOPs one optimizer step executes (`jaxtrain.flops.train_step_flops`, the `flops_analytic`
of `python -m jaxtrain aot`, plus one more forward pass of the layers for remat, which both setups use;
LoRA computes no weight gradients of the frozen base) over the slice's peak bf16 FLOP/s
(`jaxtrain.flops.PEAK_FLOPS`) at an assumed utilisation (fraction of peak reached; not measured here).
Evaluation (MDQA at 20 documents x 5 gold positions + the 150 held-out synthetic prompts per model):
prefill FLOPs at the same utilisation, then decoding at HBM bandwidth (every new token reads the weights
and the KV cache once; a roofline bound, so real decoding is slower). The general benchmarks are not in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from jaxtrain.config import ModelConfig
from jaxtrain.flops import PEAK_FLOPS, attention_flops_per_token, train_step_flops
from jaxtrain.topology import parse_accelerator_type

SAMPLES, EPOCHS, FINETUNES, MODELS = 350, 2, 6, 7     # paper-simple; 3 seeds x 2 variants; base + 6
SEQ, GLOBAL_BATCH, ANSWER_TOKENS = 4096, 16, 64       # the 4096 bucket; the recipe's batch; aot's default
MDQA_PROMPTS, MDQA_TOKENS, MDQA_NEW = 2655 * 5, 3344, 20  # questions x positions; mean prompt measured on
SYN_PROMPTS, SYN_TOKENS, SYN_NEW = 150, 3900, 32          # ../shared/data (40 questions); new tokens assumed
HBM_BANDWIDTH = {"v5e": 819e9, "v6e": 1640e9, "v4": 1228e9, "v5p": 2765e9}  # bytes/s per chip, spec sheets
PEAK_NAME = {"v5e": "TPU v5e", "v6e": "TPU v6e", "v4": "TPU v4", "v5p": "TPU v5p"}


@dataclasses.dataclass(frozen=True)
class Setup:
    accelerator: str
    how: str
    lora_rank: int = 0          # 0: full finetune
    eval_batch: int = 8         # prompts decoded together (one chip: 1, what fits beside the bf16 weights)


SETUPS = [
    Setup("v5e-1", "LoRA r16, int8 base, 4096 x 1 x grad-accum 16 (Colab)", 16, eval_batch=1),
    Setup("v6e-1", "LoRA r16, bf16 base (Colab paid tier)", 16, eval_batch=1),
    Setup("v5e-8", "full, --remat offload_input --offload-state"),
    Setup("v6e-8", "full"),
    Setup("v4-8", "full, 4096 x 4 x grad-accum 4"),
    Setup("v5p-8", "full, 4096 x 4 x grad-accum 4"),
    Setup("v4-32", "full"),
]


def step_flops(config: ModelConfig, lora_rank: int) -> float:
    """FLOPs one optimizer step of GLOBAL_BATCH rows of SEQ tokens executes."""
    tokens = GLOBAL_BATCH * SEQ
    model = train_step_flops(config, tokens, SEQ, logit_tokens=GLOBAL_BATCH * ANSWER_TOKENS)
    attention = attention_flops_per_token(config, SEQ) * tokens
    dense_forward = train_step_flops(config, tokens, SEQ, logit_tokens=0) / 3 - attention  # 2 x body x tokens
    remat = dense_forward + attention  # the layers' forward again, inside the backward pass
    if not lora_rank:
        return model + remat
    layers, d, kv = config.num_layers, config.hidden_size, config.num_kv_heads * config.head_dim
    adapters = layers * lora_rank * (6 * d + 2 * kv + 3 * (d + config.intermediate_size))  # q k v o gate up down
    return model - dense_forward + remat + 6 * adapters * tokens  # no weight gradients for the frozen base


def eval_seconds(config: ModelConfig, setup: Setup, chips: int, flops_per_s: float, bandwidth: float) -> float:
    """One model's MDQA + synthetic evaluation in bf16: prefill at flops_per_s, decode at HBM bandwidth."""
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    seconds = 0.0
    for prompts, length, new in ((MDQA_PROMPTS, MDQA_TOKENS, MDQA_NEW), (SYN_PROMPTS, SYN_TOKENS, SYN_NEW)):
        prefill = train_step_flops(config, length, length, logit_tokens=1) / 3
        read_per_step = 2 * config.num_params + setup.eval_batch * length * kv_per_token
        seconds += prompts * prefill / flops_per_s
        seconds += math.ceil(prompts / setup.eval_batch) * new * read_per_step / (chips * bandwidth)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utilisation", type=float, nargs=2, default=(0.3, 0.5), metavar=("LOW", "HIGH"),
                        help="assumed fraction of the peak FLOP/s the steps reach (default: 0.3 0.5)")
    parser.add_argument("--price", nargs="*", default=[], metavar="GEN=USD",
                        help="price per chip-hour to multiply by, e.g. v5e=1.2 (check your zone's price list)")
    args = parser.parse_args()
    prices = dict((k, float(v)) for k, v in (p.split("=", 1) for p in args.price))
    config = ModelConfig.preset("mistral-7b-instruct-v0.1")
    steps = math.ceil(SAMPLES / GLOBAL_BATCH) * EPOCHS
    lo, hi = sorted(args.utilisation)
    print(f"Mistral-7B, {SAMPLES} samples x {EPOCHS} epochs = {steps} steps of {GLOBAL_BATCH} x {SEQ} tokens; "
          f"utilisation {lo:.0%}-{hi:.0%} of peak (assumed)\n")
    head = ["accelerator", "finetune", "TFLOP/step", "epoch (min)", "one finetune (h)",
            "eval per model (h)", "full recipe (chip-h)"]
    if prices:
        head.append("USD")
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for setup in SETUPS:
        topo = parse_accelerator_type(setup.accelerator)
        gen = topo.generation.name
        flops = step_flops(config, setup.lora_rank)
        row = [setup.accelerator, setup.how, f"{flops / 1e12:,.0f}"]
        spans = []
        for u in (hi, lo):  # fast, slow
            per_s = u * PEAK_FLOPS[PEAK_NAME[gen]] * topo.chips
            train = steps * flops / per_s
            evaluation = eval_seconds(config, setup, topo.chips, per_s, HBM_BANDWIDTH[gen])
            spans.append((train / EPOCHS / 60, train / 3600, evaluation / 3600,
                          topo.chips * (FINETUNES * train + MODELS * evaluation) / 3600))
        row += [f"{a:.2g}-{b:.2g}" for a, b in zip(*spans)]
        if prices:
            row.append(f"{spans[0][3] * prices[gen]:,.0f}-{spans[1][3] * prices[gen]:,.0f}" if gen in prices else "")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
