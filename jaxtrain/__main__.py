"""`python -m jaxtrain {train,export,aot,import-gguf}`: finetune, write a Hugging Face folder, prove a TPU fit,
bring a GGUF checkpoint in as a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Literal

import jax
import tyro

from jaxtrain import aot, import_gguf, runs
from jaxtrain.aot import AotConfig
from jaxtrain.import_gguf import ImportGgufConfig
from jaxtrain.train import EX_TEMPFAIL, NonFiniteLoss, Preempted, TrainConfig, train


@dataclasses.dataclass
class ExportConfig:
    checkpoint: str
    """training run folder (its newest intact checkpoint is exported)"""
    out: str
    """Hugging Face folder to write; an existing export there is replaced whole"""
    step: int | None = None
    """export this step instead of the newest"""
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    max_shard_size: str = "5GB"
    merged: bool = False
    """LoRA runs: write the base model with the adapters folded in (the default for LoRA runs)"""
    peft: bool = False
    """LoRA runs: write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) instead"""
    verify: bool = True
    """check the checkpoint's files against their recorded sha256 first (one read pass over the weights)"""


def export(cfg: ExportConfig) -> None:
    what = runs.export_run(cfg.checkpoint, cfg.out, step=cfg.step, merged=cfg.merged, peft=cfg.peft, dtype=cfg.dtype,
                           max_shard_size=cfg.max_shard_size, verify=cfg.verify)
    loader = ("peft.PeftModel.from_pretrained(base, folder)" if cfg.peft
              else "transformers.AutoModelForCausalLM.from_pretrained")
    print(f"wrote {cfg.out}: {what}; load it with {loader}")


Command = (
    Annotated[TrainConfig, tyro.conf.subcommand("train", description="Finetune on data_gen shards.")]
    | Annotated[ExportConfig, tyro.conf.subcommand("export", description="Checkpoint -> HF folder.")]
    | Annotated[AotConfig, tyro.conf.subcommand(
        "aot", description="Compile a step (full or LoRA train step, or decode) for a TPU slice here; report memory "
                           "per chip.")]
    | Annotated[ImportGgufConfig, tyro.conf.subcommand(
        "import-gguf", description="GGUF file -> HF folder (default: SmolLM2-135M-Instruct).")])


def main(argv: list[str] | None = None) -> int:
    cfg = tyro.cli(Command, args=argv, prog="python -m jaxtrain")
    try:
        if isinstance(cfg, TrainConfig):
            train(cfg)
        elif isinstance(cfg, AotConfig):
            return aot.main(cfg)
        elif isinstance(cfg, ImportGgufConfig):
            return import_gguf.main(cfg)
        else:
            export(cfg)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, KeyError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"error: out of device memory ({str(e).splitlines()[0]}): lower --global-batch or raise --grad-accum, "
              "or keep fewer activations (--remat full, the default of Hugging Face models)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
