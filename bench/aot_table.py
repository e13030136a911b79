"""The README's TPU-fit table: `python -m jaxtrain aot` for every row, next to Google's MaxText.

    .venv/bin/python bench/aot_table.py [--only v5e-8] [--jsonl results.jsonl]

Each row compiles the real Mistral-7B train step for a TPU slice on this machine (a few minutes per row
on 2 CPU cores; no TPU needed) and prints a Markdown table: per-chip memory, room to spare, compile
time and the exact command. The MaxText column is MaxText's own train step for the same model, slice,
length and batch, compiled with the same libtpu by `bench/maxtext_aot.sh` (its defaults: full remat,
splash attention, scanned layers, FSDP, fp32 weights and Adam; and with a bf16 first moment).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (topology, seq_len, global_batch, our flags, MaxText per-chip figure)
LOW_MEMORY = ("--remat", "offload_input", "--offload-state")
ROWS = [
    ("v5e-8", 4096, 8, LOW_MEMORY, "does not fit: 17.04 GiB (fp32 Adam), 17.29 with bf16 first moment"),
    ("v5e-8", 4096, 16, LOW_MEMORY, "does not fit: 19.03 GiB (fp32 Adam), 17.34 with bf16 first moment"),
    ("v4-8", 4096, 4, LOW_MEMORY, "does not fit: 31.84 GiB (fp32 Adam); 30.30 with bf16 first moment"),
    ("v5p-8", 4096, 4, (), "33.90 GiB (fp32 Adam), 30.53 with bf16 first moment"),
    ("v5p-8", 32768, 4, ("--remat", "offload_input"), "61.51 GiB (fp32 Adam), 58.14 with bf16 first moment"),
]


def command(topology: str, seq_len: int, batch: int, flags: tuple[str, ...]) -> list[str]:
    return ["python", "-m", "jaxtrain", "aot", "--model", "mistral-7b-v0.1", "--topology", topology,
            "--seq-len", str(seq_len), "--global-batch", str(batch), *flags]


def run(cmd: list[str]) -> dict:
    """One `aot` run in a subprocess (libtpu state stays per process); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def table_row(report: dict, cmd: list[str], maxtext: str) -> str:
    ours = (f"{report['per_chip_gib']:.2f} GiB, {report['headroom_gib']:.2f} to spare"
            if report["fits"] else f"does not fit ({report['error']})")
    flags = " ".join(cmd[cmd.index("--global-batch") + 2:])
    flags = f"`{flags}`" if flags else "(defaults)"
    return (f"| {report['topology']} ({report['hbm_gib']} GiB) | {report['seq_len']} | {report['global_batch']} "
            f"| **{ours}** | {maxtext} | {flags} | {report['compile_s']:.0f} s |")


HEADER = ("| slice (usable HBM per chip) | seq | global batch | ours per chip (args + temp + code) "
          "| MaxText per chip | flags | compile |\n|---|---|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only the rows of this topology")
    parser.add_argument("--jsonl", type=Path, help="also append every report to this file")
    args = parser.parse_args()
    rows = [r for r in ROWS if args.only in (None, r[0])]
    print(HEADER, flush=True)
    for topology, seq_len, batch, flags, maxtext in rows:
        cmd = command(topology, seq_len, batch, flags)
        start = time.perf_counter()
        report = run(cmd)
        report["wall_s"] = round(time.perf_counter() - start, 1)
        report["command"] = shlex.join(cmd)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(report) + "\n")
        print(table_row(report, cmd, maxtext), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
