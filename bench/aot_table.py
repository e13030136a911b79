"""The README's TPU-fit table: `python -m jaxtrain aot` for every row, next to Google's MaxText.

    .venv/bin/python bench/aot_table.py [--only v5e-8] [--jsonl results.jsonl]
    .venv/bin/python bench/aot_table.py --matrix [--only v5e-8]

Each row compiles the real Mistral-7B train step for a TPU slice on this machine (a few minutes per row
on 2 CPU cores; no TPU needed) and prints a Markdown table: per-chip memory, room to spare, compile
time and the exact command. The MaxText column is MaxText's own train step for the same model, slice,
length and batch, compiled with the same libtpu by `bench/maxtext_aot.sh` (its defaults: full remat,
splash attention, scanned layers, FSDP, fp32 weights and Adam; and with a bf16 first moment).

`--matrix` compiles every remat policy with each `--state-dtype` (dtype of Adam's first moment; the
optimizer state stays in HBM, no offloading) for each slice at one row per chip, and prints per-chip memory
and the compiler's FLOPs per step; it keeps every report in bench/results/aot_matrix.jsonl and skips the
cells already there, so an interrupted run resumes and a finished one only prints (70 compiles, ~1.5 hours
on 2 cores; a refused one stops after seconds).
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


# --matrix: (topology, seq_len, global_batch): one row per chip.
MATRIX_SLICES = [("v5e-8", 4096, 8), ("v6e-8", 4096, 8), ("v4-8", 4096, 4), ("v5p-8", 4096, 4), ("v5p-8", 32768, 4)]
STATE_DTYPES = ("float32", "bfloat16")
MATRIX_JSONL = ROOT / "bench" / "results" / "aot_matrix.jsonl"


def matrix_cell(report: dict) -> str:
    """Per-chip GiB and the compiler's TFLOPs per chip and step, or what the compiler said it needs."""
    flops = report.get("flops_compiler")
    flops = f" ({flops / 1e12:.0f} TF)" if flops else ""
    if report["fits"]:
        return f"{report['per_chip_gib']:.2f}{flops}"
    if report.get("per_chip_gib"):
        return f"no: {report['per_chip_gib']:.2f}{flops}"
    temps = report.get("required_gib_reported")
    return f"no: temporaries {temps:.2f}" if temps else "no"


def run_matrix(only: str | None, seq_len_only: int | None = None) -> int:
    """Every remat policy x state dtype per slice; reports appended to MATRIX_JSONL, known cells skipped."""
    from jaxtrain.config import REMAT_POLICIES

    done = {}
    if MATRIX_JSONL.exists():
        for line in MATRIX_JSONL.read_text().splitlines():
            r = json.loads(line)
            done[(r["topology"], r["seq_len"], r["global_batch"], r["remat"], r["state_dtype"])] = r
    slices = [s for s in MATRIX_SLICES if only in (None, s[0]) and seq_len_only in (None, s[1])]
    for topology, seq_len, batch in slices:
        for dtype in STATE_DTYPES:
            for remat in REMAT_POLICIES:
                key = (topology, seq_len, batch, remat, dtype)
                if key in done:
                    continue
                cmd = command(topology, seq_len, batch, ("--remat", remat, "--state-dtype", dtype))
                start = time.perf_counter()
                report = run(cmd)
                report.update(remat=remat, state_dtype=dtype, wall_s=round(time.perf_counter() - start, 1),
                              command=shlex.join(cmd))
                done[key] = report
                MATRIX_JSONL.parent.mkdir(exist_ok=True)
                with MATRIX_JSONL.open("a") as f:
                    f.write(json.dumps(report) + "\n")
                print(f"{topology} {seq_len}x{batch} remat={remat} state={dtype}: {matrix_cell(report)} "
                      f"({report['wall_s']:.0f} s)", flush=True)
    for dtype in STATE_DTYPES:
        print(f"\n`--state-dtype {dtype}` (Adam's first moment; the second stays float32), optimizer state in "
              "HBM: per-chip GiB (compiler TFLOPs per chip and step, the scanned layer counted once; no: what "
              "the compiler needed)\n")
        print("| slice (usable HBM) | seq x batch | " + " | ".join(REMAT_POLICIES) + " |")
        print("|---|---|" + "---|" * len(REMAT_POLICIES))
        for topology, seq_len, batch in slices:
            cells = [done.get((topology, seq_len, batch, remat, dtype)) for remat in REMAT_POLICIES]
            hbm = next((c["hbm_gib"] for c in cells if c), "?")
            print(f"| {topology} ({hbm} GiB) | {seq_len} x {batch} | "
                  + " | ".join(matrix_cell(c) if c else "" for c in cells) + " |")
    return 0


HEADER = ("| slice (usable HBM per chip) | seq | global batch | ours per chip (args + temp + code) "
          "| MaxText per chip | flags | compile |\n|---|---|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only the rows of this topology")
    parser.add_argument("--jsonl", type=Path, help="also append every report to this file")
    parser.add_argument("--matrix", action="store_true", help="every remat policy x optimizer-state dtype")
    parser.add_argument("--seq-len", type=int, help="--matrix: only the rows of this sequence length")
    args = parser.parse_args()
    if args.matrix:
        return run_matrix(args.only, args.seq_len)
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
