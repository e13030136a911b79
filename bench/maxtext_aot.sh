#!/usr/bin/env bash
# MaxText's own Mistral-7B train step, compiled ahead of time for the TPU-fit table's slices on this (CPU)
# machine with libtpu: the peer column of docs/tpu_fit.md. Not part of the test suite.
#
# Usage: bench/maxtext_aot.sh [--only SUBSTRING] [MAXTEXT_DIR [MAXTEXT_PYTHON]]
#
#   MAXTEXT_DIR     a MaxText checkout (the folder holding src/maxtext/); or set $MAXTEXT_DIR
#   MAXTEXT_PYTHON  a python with MaxText's requirements and libtpu installed; or set $MAXTEXT_PYTHON
#                   (default: MAXTEXT_DIR/.venv/bin/python)
#   --only S        run only the rows whose name contains S (e.g. v5e8, bf16mu_); the JSON then goes to
#                   LOG_DIR, not bench/results/
#   $LOG_DIR        one log per row (default: ${TMPDIR:-/tmp}/maxtext_aot); each starts with a CMD: line
#   $MAXTEXT_COMMIT recorded in the JSON when MAXTEXT_DIR is not a git checkout
#
# Every row runs twice: with MaxText's default fp32 Adam moments, and with mu_dtype=bfloat16 (first
# moment in bf16; rows named bf16mu_*). Prints a table (per chip = arguments + temporaries + generated
# code; the outputs alias the donated arguments) and writes bench/results/maxtext_aot.json.
# About 10 minutes on 2 cores.

set -euo pipefail

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }
die() { echo "maxtext_aot.sh: $*" >&2; exit 1; }

only=""
while (($#)); do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --only) (($# >= 2)) || die "--only needs a value"; only=$2; shift 2 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
MAXTEXT_DIR=${1:-${MAXTEXT_DIR:-}}
[[ -n $MAXTEXT_DIR ]] || { usage >&2; die "no MaxText checkout given (argument or \$MAXTEXT_DIR)"; }
MAXTEXT_DIR=$(cd "$MAXTEXT_DIR" 2>/dev/null && pwd) || die "no such folder: ${1:-$MAXTEXT_DIR}"
MAXTEXT_PYTHON=${2:-${MAXTEXT_PYTHON:-$MAXTEXT_DIR/.venv/bin/python}}
[[ -f $MAXTEXT_DIR/src/maxtext/trainers/pre_train/train_compile.py && -f $MAXTEXT_DIR/src/maxtext/configs/base.yml ]] \
  || die "$MAXTEXT_DIR is not a MaxText checkout (no src/maxtext/trainers/pre_train/train_compile.py):" \
         "clone AI-Hypercomputer/maxtext and install it into a venv (its docs/install_maxtext.md: pip install -e .[tpu])"
[[ -x $MAXTEXT_PYTHON ]] || die "no python at $MAXTEXT_PYTHON (second argument or \$MAXTEXT_PYTHON)"
"$MAXTEXT_PYTHON" -c 'import libtpu, jax' 2>/dev/null || die "$MAXTEXT_PYTHON cannot import jax and libtpu"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "${LOG_DIR:=${TMPDIR:-/tmp}/maxtext_aot}"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
json=$ROOT/bench/results/maxtext_aot.json
[[ -z $only ]] || json=$LOG_DIR/maxtext_aot.json

# name, compile_topology, max_target_length, per_device_batch_size (global batch = chips x that)
ROWS=(
  "v5e8_4096x8 v5e-8 4096 1"
  "v5e8_4096x16 v5e-8 4096 2"
  "v4_4096x4 v4-8 4096 1"
  "v5p8_4096x4 v5p-8 4096 1"
  "v5p8_32768x4 v5p-8 32768 1"
)
# Usable HBM per chip as libtpu's compiler reports it (docs/tpu_fit.md), GiB; and chips per slice.
declare -A HBM=([v5e-8]=15.75 [v4-8]=30.75 [v5p-8]=95.74) CHIPS=([v5e-8]=8 [v4-8]=4 [v5p-8]=4)

# Mistral 7B as MaxText ships it, with the settings of our table: full remat, flash (splash) attention,
# scanned layers, FSDP over all chips, fp32 weights, bf16 compute, AdamW.
compile_row() {  # name topology seq per_device_batch [extra key=value ...]
  local name=$1 topo=$2 seq=$3 pdb=$4 log="$LOG_DIR/$1.log" start rc=0
  shift 4
  local cmd=("$MAXTEXT_PYTHON" -m maxtext.trainers.pre_train.train_compile src/maxtext/configs/base.yml
    model_name=mistral-7b "compile_topology=$topo" compile_topology_num_slices=1
    "per_device_batch_size=$pdb" "max_target_length=$seq"
    remat_policy=full attention=flash scan_layers=true ici_fsdp_parallelism=-1
    weight_dtype=float32 dtype=bfloat16 opt_type=adamw
    enable_checkpointing=false "base_output_directory=$LOG_DIR/out" "run_name=$name" "$@")
  echo "CMD: ${cmd[*]}" >"$log"
  start=$(date +%s)
  (cd "$MAXTEXT_DIR" && PYTHONPATH="$MAXTEXT_DIR/src" JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 \
    TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v5litepod-1 TPU_WORKER_HOSTNAMES=localhost TPU_WORKER_ID=0 \
    "${cmd[@]}") >>"$log" 2>&1 || rc=$?
  echo "RC=$rc WALL=$(($(date +%s) - start))s" >>"$log"
}

# One tab-separated line per log: name topology seq global_batch mu hbm argument temp code output alias
# needed_gib wall
# (bytes from "Memory analysis: CompiledMemoryStats(...)"; needed_gib from a RESOURCE_EXHAUSTED line,
# which counts arguments + temporaries; empty fields where the log has neither).
summarise() {  # log topology seq global_batch mu
  local log=$1 stats field needed wall vals=()
  stats=$(grep -m1 -o 'CompiledMemoryStats([^)]*)' "$log" || true)
  for field in argument temp generated_code output alias; do
    field=${field}_size_in_bytes
    vals+=("$(grep -o "\b$field=[0-9]*" <<<"$stats" | cut -d= -f2 || true)")
  done
  needed=$(grep -m1 -o 'RESOURCE_EXHAUSTED: .*required for HLO temporaries ([0-9.]*G)' "$log" \
    | grep -o '([0-9.]*G)' | tr -d '()G' || true)
  wall=$(grep -o '^RC=.* WALL=[0-9]*' "$log" | tail -1 | sed 's/.*WALL=//' || true)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(basename "$log" .log)" "$2" "$3" "$4" "$5" \
    "${HBM[$2]}" "${vals[@]}" "$needed" "$wall"
}

tsv="$LOG_DIR/summary.tsv"
: >"$tsv"
for row in "${ROWS[@]}"; do
  read -r name topo seq pdb <<<"$row"
  batch=$((pdb * CHIPS[$topo]))
  for mu in float32 bfloat16; do
    run=$name extra=()
    [[ $mu == bfloat16 ]] && run=bf16mu_$name extra=(mu_dtype=bfloat16)
    [[ -z $only || $run == *"$only"* ]] || continue
    echo "compiling $run ($topo, $seq x $batch, Adam first moment $mu) -> $LOG_DIR/$run.log" >&2
    compile_row "$run" "$topo" "$seq" "$pdb" "${extra[@]}"
    line=$(summarise "$LOG_DIR/$run.log" "$topo" "$seq" "$batch" "$mu")
    if [[ -z $(cut -f7,12 <<<"$line" | tr -d '\t') ]]; then  # neither argument bytes nor "needed"
      tail -n 5 "$LOG_DIR/$run.log" >&2
      die "$run: MaxText neither compiled nor ran out of memory; see $LOG_DIR/$run.log (nothing recorded)"
    fi
    echo "$line" >>"$tsv"
  done
done
[[ -s $tsv ]] || die "no row matches --only '$only'"

# The JSON record (machine facts as bench/common.py records them) and the table.
maxtext_commit=$(git -C "$MAXTEXT_DIR" rev-parse HEAD 2>/dev/null || echo "${MAXTEXT_COMMIT:-unknown}")
maxtext_version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$MAXTEXT_DIR/src/maxtext/version.py" 2>/dev/null || true)
"$MAXTEXT_PYTHON" - "$tsv" "$json" "$maxtext_commit" "$maxtext_version" \
  "$LOG_DIR" <<'EOF'
import datetime, importlib.metadata as md, json, os, platform, sys
tsv, out, commit, version, log_dir = sys.argv[1:]
GIB = 2**30
rows = []
for line in open(tsv):
    name, topo, seq, batch, mu, hbm, arg, temp, code, output, alias, needed, wall = line.rstrip("\n").split("\t")
    row = {"name": name, "topology": topo, "seq_len": int(seq), "global_batch": int(batch), "mu_dtype": mu,
           "hbm_gib": float(hbm), "compile_wall_s": int(wall) if wall else None,
           "command": open(os.path.join(log_dir, name + ".log")).readline().removeprefix("CMD: ").strip()}
    if arg:
        per_chip = int(arg) + int(temp) + int(code)
        row.update(argument_bytes=int(arg), temp_bytes=int(temp), generated_code_bytes=int(code),
                   output_bytes=int(output), alias_bytes=int(alias),
                   per_chip_bytes=per_chip, per_chip_gib=round(per_chip / GIB, 2), fits=per_chip / GIB <= float(hbm))
    elif needed:
        row.update(needed_gib=float(needed), fits=False)
    else:
        sys.exit(f"{name}: neither memory stats nor RESOURCE_EXHAUSTED in its log")
    rows.append(row)
machine = {"date": datetime.date.today().isoformat(), "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "python": sys.version.split()[0], "jax": md.version("jax"), "libtpu": md.version("libtpu"),
           "backend": "cpu (AOT for TPU)", "device": "cpu"}
record = {"name": "maxtext_aot", "command": "bench/maxtext_aot.sh MAXTEXT_DIR MAXTEXT_PYTHON",
          "maxtext": {"commit": commit, "version": version}, "machine": machine,
          "note": "per chip = arguments + temporaries + generated code (the outputs alias the donated "
                  "arguments but for a few KB of metrics); "
                  "needed_gib: the compiler's RESOURCE_EXHAUSTED figure, arguments + temporaries",
          "rows": rows}
with open(out, "w") as f:
    f.write(json.dumps(record, indent=2) + "\n")
print(f"\nMaxText {version} ({commit}), jax {machine['jax']}, libtpu {machine['libtpu']}, "
      f"{machine['date']}, {machine['cores']} cores; written {out}")
print(f"{'row':22} {'slice (usable HBM)':20} {'seq x batch':12} {'Adam mu':9} {'per chip (arg + temp + code)':40} compile")
for r in rows:
    if "per_chip_gib" in r:
        parts = " + ".join(f"{r[k] / GIB:.2f}" for k in ("argument_bytes", "temp_bytes", "generated_code_bytes"))
        mem = f"{r['per_chip_gib']:.2f} GiB ({parts})" + ("" if r["fits"] else ", over HBM")
    else:
        mem = f"does not fit: {r['needed_gib']:.2f} GiB needed"
    wall = f"{r['compile_wall_s']} s" if r["compile_wall_s"] is not None else "?"
    print(f"{r['name']:22} {r['topology'] + ' (' + str(r['hbm_gib']) + ' GiB)':20} "
          f"{str(r['seq_len']) + ' x ' + str(r['global_batch']):12} {r['mu_dtype']:9} {mem:40} {wall}")
EOF
