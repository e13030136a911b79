"""`--model PATH` for every task: a Hugging Face folder or one of our training runs, told apart by config.json."""

from __future__ import annotations

from pathlib import Path

from eval.datafiles import DataError


def _param_shardings(config, mesh, rules: str):
    """Parameters laid out as in training (logical axes -> mesh), so a 7B model is split over the chips."""
    from jaxtrain.model import param_logical_axes
    from jaxtrain.sharding import logical_to_sharding, rules_for

    return logical_to_sharding(param_logical_axes(config), mesh, rules_for(rules))


def load_model(path: str | Path, *, dtype: str | None = None, mesh=None, rules: str = "fsdp"):
    """(MistralConfig, params) from an HF folder (config.json + safetensors, e.g. the base model or
    `python -m jaxtrain export` output) or from a training run directory (newest complete checkpoint).

    `dtype` casts the weights on load (HF folders only; checkpoints keep their stored dtype). With a `mesh`,
    each device receives only its shard of every parameter (`rules`: the sharding table of training).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"--model {path}: no such file or directory")
    if (path / "config.json").is_file():
        from jaxtrain.config import MistralConfig
        from jaxtrain.hf_io import load_pretrained

        shardings = None if mesh is None else _param_shardings(MistralConfig.from_pretrained(path), mesh, rules)
        return load_pretrained(path, dtype=dtype, shardings=shardings)
    if not path.is_dir():
        raise DataError(f"--model {path}: expected a Hugging Face folder (with config.json) "
                        "or a training run directory")
    from jaxtrain.checkpoint import Checkpointer, load_params_from_run

    try:
        shardings = None
        if mesh is not None:
            with Checkpointer(path, read_only=True) as ckpt:
                _, config, _ = ckpt.read_json()
            shardings = None if config is None else _param_shardings(config, mesh, rules)
        return load_params_from_run(path, shardings=shardings)
    except FileNotFoundError as e:
        raise DataError(f"--model {path}: {e}") from None
