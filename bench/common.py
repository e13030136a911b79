"""Shared by the bench scripts: machine facts, a matmul ceiling, timing, the table and the JSON record."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import jax

    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": sys.version.split()[0], "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind}


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Fastest of `repeats` calls after `warmup` calls (fn must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_ceiling(n: int = 2048) -> float:
    """FLOP/s of a large fp32 matmul under XLA: what this machine can do at best."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / best_time(lambda: f(a).block_until_ready())


def train_step_seconds(config, batch: dict, answer_only: bool, repeats: int) -> float:
    """Seconds per step (fastest of `repeats`) of our jitted train step (AdamW) on one device, on `batch`
    (input_ids, loss_mask, segment_ids, positions); `answer_only`: logits at the loss tokens only."""
    import jax
    import numpy as np

    from jaxtrain.batches import MODEL_INPUT_KEYS
    from jaxtrain.sharding import MeshConfig, make_mesh, rules_for
    from jaxtrain.train import OptimizerConfig, TrainConfig, init_state, make_optimizer, make_train_step

    mesh = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    optimizer, schedule = make_optimizer(OptimizerConfig(lr=1e-4, warmup_ratio=0.0), 100)
    answer_tokens = int(np.asarray(batch["loss_mask"]).sum(1).max()) if answer_only else None
    answer_tokens = None if answer_tokens is None else -(-answer_tokens // 8) * 8
    fns = make_train_step(config, optimizer, schedule, mesh, rules_for("fsdp"), max_loss_tokens=answer_tokens)
    state = init_state(config, TrainConfig(data="", out=""), fns)
    inputs = {k: jax.device_put(batch[k], fns.batch_sharding) for k in MODEL_INPUT_KEYS}
    holder = {"state": state}

    def step():
        holder["state"], metrics = fns.step(holder["state"], inputs)
        jax.block_until_ready(metrics)

    return best_time(step, repeats=repeats)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def record(name: str, command: str, rows: list[dict], headers: list[str], **facts) -> None:
    """Write bench/results/<name>.json (with `facts` of the run, e.g. its matmul ceiling) and print the
    table last."""
    RESULTS.mkdir(exist_ok=True)
    out = {"name": name, "command": command, "machine": machine(), **facts, "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{name} ({out['machine']['date']}, {out['machine']['device']}, {out['machine']['cores']} cores)")
    print(table(headers, [[r.get(h, "") for h in headers] for r in rows]))
