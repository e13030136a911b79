"""Does the real 7B LoRA step (and int8 decode step) fit one TPU chip? AOT-compiled with libtpu, on CPU.

    python bench/lora_aot.py --topology v5e-1 --seq-len 4096 --batch 1 --base-dtype int8
    python bench/lora_aot.py --topology v5e-1 --decode --seq-len 4096 --batch 8 --new-tokens 100

Prints one JSON line per run (`jaxtrain.aot.AotReport`, the same fields as `python -m jaxtrain aot`).
The LoRA step is exactly the training step of `python -m jaxtrain train --lora-rank 16` (jaxtrain.train.
make_train_step): scanned layers, full remat, splash attention with the sliding window, loss on the last
32 tokens, adapters r16 on all seven projections in fp32 with AdamW, state donated, base not donated.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import tyro


@dataclasses.dataclass
class Args:
    topology: str = "v5e-1"
    model: str = "mistral-7b-v0.1"
    seq_len: int = 4096
    batch: int = 1
    base_dtype: Literal["bf16", "int8"] = "int8"
    rank: int = 16
    loss_tokens: int = 32
    remat: str = "full"
    decode: bool = False
    """compile the greedy decode (prefill + one chunk of steps) instead of the LoRA train step"""
    new_tokens: int = 100


def lora_step(args: Args):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtrain import aot, lora
    from jaxtrain.checkpoint import abstract_state
    from jaxtrain.config import MistralConfig
    from jaxtrain.sharding import MeshConfig, make_mesh, rules_for
    from jaxtrain.topology import parse_accelerator_type
    from jaxtrain.train import OptimizerConfig, make_optimizer, make_train_step

    topology = parse_accelerator_type(args.topology)
    config = MistralConfig.preset(args.model).replace(remat=args.remat, attention_impl="splash")
    mesh, rules = make_mesh(MeshConfig(), devices=topology.devices()), rules_for("fsdp")
    lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    optimizer, schedule = make_optimizer(OptimizerConfig(lr=2e-4), 1000)
    fns = make_train_step(config, optimizer, schedule, mesh, rules, max_loss_tokens=args.loss_tokens,
                          lora=lcfg, base_dtype=args.base_dtype)
    adapters = lora.adapter_shapes(config, lcfg)
    shapes = {"params": adapters, "opt_state": jax.eval_shape(optimizer.init, adapters),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state = abstract_state(shapes, fns.state_shardings)
    frozen = abstract_state(lora.base_shapes(config, args.base_dtype), fns.frozen_shardings)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=fns.batch_sharding)
    batch = {"input_ids": tokens, "loss_mask": jax.ShapeDtypeStruct(tokens.shape, jnp.bool_, sharding=fns.batch_sharding),
             "segment_ids": tokens, "positions": tokens}
    extra = {"step": f"lora r{args.rank}, {args.base_dtype} base", "model": args.model, "seq_len": args.seq_len,
             "global_batch": args.batch, "adapter_params": lora.num_params(adapters)}
    del NamedSharding, PartitionSpec
    return aot.compile_lowered(lambda: fns.lower(state, batch, frozen), topology, extra=extra)


def decode_step(args: Args):
    import functools

    import jax
    import jax.numpy as jnp

    from eval import decode
    from jaxtrain import aot, lora
    from jaxtrain.checkpoint import abstract_state
    from jaxtrain.config import MistralConfig
    from jaxtrain.sharding import MeshConfig, make_mesh, rules_for
    from jaxtrain.topology import parse_accelerator_type

    topology = parse_accelerator_type(args.topology)
    config = MistralConfig.preset(args.model).replace(remat="none", attention_impl="splash")
    mesh, rules = make_mesh(MeshConfig(), devices=topology.devices()), rules_for("fsdp")
    shardings = lora.base_shardings(config, args.base_dtype, mesh, rules)
    params = abstract_state(lora.base_shapes(config, args.base_dtype), shardings)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ids = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)

    def generate(params, ids, positions, segments, rng, temperature, top_p):
        state = decode._prefill.__wrapped__(params, None, ids, positions, segments, rng, temperature, top_p,
                                            config=config, max_new_tokens=args.new_tokens, greedy=True)
        return decode._decode_chunk.__wrapped__(params, None, state, temperature, top_p, config=config, greedy=True)

    extra = {"step": f"greedy decode, {args.base_dtype} base, {args.new_tokens} new tokens (prefill + "
                     f"{decode.CHUNK_STEPS}-step chunk)", "model": args.model, "seq_len": args.seq_len,
             "global_batch": args.batch}
    del functools
    return aot.compile_for_topology(generate, (params, ids, ids, ids, rng, scalar, scalar),
                                    in_shardings=None, out_shardings=None, donate_argnums=(), topology=topology,
                                    mesh=mesh, rules=rules, extra=extra)


def main():
    args = tyro.cli(Args)
    report = decode_step(args) if args.decode else lora_step(args)
    print(json.dumps({**report.as_dict(), "error": (report.error or "")[:300]}))


if __name__ == "__main__":
    main()
