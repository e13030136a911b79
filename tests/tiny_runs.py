"""Tiny models and training runs on disk, for tests that evaluate them (eval, the lm-eval backend)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtrain import lora, model, runs
from jaxtrain.checkpoint import CheckpointConfig, Checkpointer
from jaxtrain.config import ModelConfig
from jaxtrain.hf_io import save_pretrained
from jaxtrain.model import init_params


def save_decisive_tiny(path: Path) -> Path:
    """The random `tiny` model (fp32 Hugging Face folder) with its lm_head scaled by 20: greedy choices far
    from ties, so two implementations agree on them exactly and no run flips a coin."""
    config = ModelConfig.preset("tiny")
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    params["lm_head"] = params["lm_head"] * 20.0
    save_pretrained(path, config, params, dtype="float32")
    return path


def write_lora_run(run_dir: Path, base: Path, *, rank: int = 4, alpha: float = 8.0,
                   targets=("q", "v", "o", "down"), seed: int = 2) -> None:
    """A LoRA run over the Hugging Face folder `base` holding random non-zero adapters, in the checkpoint format
    of `python -m jaxtrain train --lora-rank` (training itself is tested in test_lora_cli.py)."""
    config = ModelConfig.from_pretrained(base)  # what eval uses for the exported folder too
    cfg = lora.LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets))
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda s: jnp.asarray(2.0 * rng.standard_normal(s.shape), jnp.float32),
                            model.adapter_shapes(config, cfg))
    metadata = {"lora": cfg.to_dict(), "base": runs.base_metadata(str(base), "float32", 0)}
    with Checkpointer(run_dir, CheckpointConfig(save_every=1, keep=1, async_save=False), model_config=config,
                      metadata=metadata) as ckpt:
        ckpt.save(3, params=adapters, opt_state=optax.adamw(1e-3).init(adapters), force=True)
