"""Length buckets vs. padding everything to the longest example, on the paper's data.

For a mix of the paper's data (paper-simple, ~3.9K tokens) and the demo task (~250 tokens), as a user
finetuning on several sources would have: padding efficiency (real / padded tokens), train-step tokens/s
over one epoch with the tiny model, and the number of compilations (one per bucket length).

    python -m bench.bucketing
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from bench.common import record
from data_gen.tasks import PRESETS, generate
from jaxtrain.batches import MODEL_INPUT_KEYS, BatchConfig, BucketedBatches
from jaxtrain.config import ModelConfig
from jaxtrain.sharding import MeshConfig, make_mesh, rules_for
from jaxtrain.train import OptimizerConfig, TrainConfig, init_state, make_optimizer, make_train_step

TOKENS_PER_BATCH = 16384


def shards(folder: str, buckets: list[int]) -> str:
    out = f"{folder}/shards_{len(buckets)}"
    subprocess.run([sys.executable, "-m", "data_gen", "shards", "--input", f"{folder}/paper/train.jsonl",
                    f"{folder}/demo/train.jsonl", "--out", out, "--buckets", *map(str, buckets)],
                   check=True, capture_output=True)
    return out


def epoch(path: str, config: ModelConfig) -> dict:
    batches = BucketedBatches(path, BatchConfig(tokens_per_batch=TOKENS_PER_BATCH, global_batch=None,
                                                prefetch=0), num_epochs=1)
    stats = batches.padding_stats()
    mesh = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    optimizer, schedule = make_optimizer(OptimizerConfig(lr=1e-4), batches.steps_per_epoch)
    fns = make_train_step(config, optimizer, schedule, mesh, rules_for("fsdp"), max_loss_tokens=32)
    state = init_state(config, TrainConfig(data="", out=""), fns)
    lengths, real, start = set(), 0, time.perf_counter()
    for batch in batches:
        lengths.add(int(batch["bucket_len"]))
        real += int(np.asarray(batch["segment_ids"]).sum())
        inputs = {k: batch[k] for k in MODEL_INPUT_KEYS}
        state, metrics = fns.step(state, inputs)
        jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {"padding_efficiency": round(stats["efficiency"], 3), "steps": batches.steps_per_epoch,
            "compilations": len(lengths), "epoch_s_incl_compile": round(seconds, 1),
            "real_tokens_per_s": round(real / seconds)}


def main():
    folder = tempfile.mkdtemp()
    generate(PRESETS["paper-simple"].replace(num_train=24, num_eval=1), 0, f"{folder}/paper")
    generate(PRESETS["demo-simple"], 1, f"{folder}/demo")  # another seed: example ids must be unique
    config = ModelConfig.preset("tiny")
    rows = []
    for name, buckets in (("buckets 256 ... 4096", [256, 512, 1024, 2048, 4096]), ("pad to 4096", [4096])):
        rows.append({"layout": name, **epoch(shards(folder, buckets), config)})
    record("bucketing", "python -m bench.bucketing", rows,
           ["layout", "padding_efficiency", "steps", "compilations", "epoch_s_incl_compile", "real_tokens_per_s"])


if __name__ == "__main__":
    main()
