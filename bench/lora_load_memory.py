"""Peak host memory of loading a Hugging Face Mistral folder: bf16 (`hf_io.load_pretrained`) vs int8
(`hf_io.load_quantized`, quantising tensor by tensor). Each load runs in a fresh process; the figure is
its peak resident set (VmHWM) minus the same process's baseline after imports.

    python bench/lora_load_memory.py                       # a synthetic 1.1 GB (bf16) Mistral, written once
    python bench/lora_load_memory.py --model-dir /path/to/Mistral-7B-Instruct-v0.1
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tyro

CHILD = r"""
import json, sys, time
import jax
from jaxtrain import quant
from jaxtrain.hf_io import load_pretrained, load_quantized
def hwm():  # peak resident set of this process in KiB (ru_maxrss would include the parent's, inherited)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
base = hwm()
t = time.perf_counter()
if sys.argv[2] == "int8":
    _, params = load_quantized(sys.argv[1])
else:
    _, params = load_pretrained(sys.argv[1], dtype="bfloat16")
jax.block_until_ready(params)
peak = hwm()
print(json.dumps({"load": sys.argv[2], "seconds": round(time.perf_counter() - t, 1),
                  "peak_host_gib": round((peak - base) / 2**20, 3), "baseline_gib": round(base / 2**20, 3), "params_gib": round(quant.nbytes(params) / 2**30, 3)}))
"""


@dataclasses.dataclass
class Args:
    model_dir: str | None = None
    """Hugging Face folder to load (default: write a synthetic one: 8 layers of width 2048)"""


def _synthetic(folder: Path) -> None:
    import jax

    from jaxtrain import model
    from jaxtrain.config import ModelConfig
    from jaxtrain.hf_io import save_pretrained

    config = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=7168, num_layers=8, num_heads=16,
                           num_kv_heads=4, head_dim=128, rope_theta=1e4, sliding_window=4096,
                           max_position_embeddings=32768, rms_norm_eps=1e-5, param_dtype="bfloat16")
    params = jax.jit(lambda r: model.init_params(config, r))(jax.random.key(0))
    save_pretrained(folder, config, params, dtype="bfloat16", max_shard_size="300MB", tokenizer=None)


def main() -> None:
    args = tyro.cli(Args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir) if args.model_dir else Path(tmp) / "model"
        if not args.model_dir:
            _synthetic(folder)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(json.dumps({"model": str(folder), "safetensors_gib": round(size / 2**30, 3)}))
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        for kind in ("bf16", "int8"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), kind], env=env, capture_output=True,
                                 text=True, cwd=Path(__file__).resolve().parents[1])
            print(out.stdout.strip() or out.stderr[-2000:])


if __name__ == "__main__":
    main()
