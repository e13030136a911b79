"""Write a randomly initialised model preset as a Hugging Face folder.

The TINY recipe uses it as its "base model", so the CPU smoke run takes exactly the steps of the real
experiment (finetune with --init-from an HF folder, evaluate it before and after) instead of a special path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import tyro

from jaxtrain.config import ModelConfig
from jaxtrain.hf_io import save_pretrained
from jaxtrain.model import init_params


@dataclasses.dataclass
class Args:
    out: Path
    """Folder to write (config.json, safetensors, tokenizer files)."""
    preset: str = "tiny"
    """Model preset (see jaxtrain.config.PRESETS); only small ones make sense here."""
    seed: int = 0
    """Initialisation seed."""


def main(args: Args) -> None:
    config = ModelConfig.preset(args.preset)
    params = init_params(config, jax.random.key(args.seed))
    save_pretrained(args.out, config, params, dtype="float32")
    print(f"wrote a random {args.preset} model to {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
