# shellcheck shell=bash
# Shared by every tpu_scripts/ script and the recipes: configuration, argument parsing, and the one
# wrapper (`run`) through which every side effect goes, so that --dry-run can print it instead.
# Sourcing this file has no side effects; scripts call parse_common "$@" themselves.

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034  # used by the scripts that source this file
PROJECT_ROOT=$(dirname "$TPU_SCRIPTS_DIR")
DRY_RUN=${DRY_RUN:-0}

die() { echo "error: $*" >&2; exit 1; }
info() { echo "$*" >&2; }

# Quote one word for a POSIX shell, leaving plain words (flags, paths, gs:// URLs) readable and quoting
# only the value of --flag=value.
shell_quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shell_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# All arguments quoted and joined by spaces: one copy-pasteable command line.
quote_all() {
  local out=() w
  for w in "$@"; do out+=("$(shell_quote "$w")"); done
  printf '%s' "${out[*]}"
}

# Run a command, or under DRY_RUN=1 print it on stdout (and only there) instead.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_all "$@"
    echo
  else
    info "+ $(quote_all "$@")"
    "$@"
  fi
}

# The script's header comment (the lines after the shebang up to the first blank line) is its --help.
usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$0"
}

usage_common() {
  usage
  cat <<'EOF'
Common options (every tpu_scripts/ script):
  --config FILE     configuration file (default: $TPU_CONFIG or tpu_scripts/config.sh)
  --dry-run         print every command instead of running it
  --spot | --preemptible | --best-effort | --reserved | --on-demand
                    how the TPU is provisioned (overrides PROVISIONING)
  --queued          create/delete it through a queued resource (overrides QUEUED=1)
  -h, --help        this help
EOF
}

# Parse the common options, load the configuration, derive the rest; leaves the other arguments in ARGS
# (a "--" and everything after it are kept as they are, for scripts that take a command).
parse_common() {
  local config=${TPU_CONFIG:-$TPU_SCRIPTS_DIR/config.sh} prov="" queued=""
  ARGS=()
  while (($#)); do
    case $1 in
      --config) (($# >= 2)) || die "--config needs a file"; config=$2; shift 2 ;;
      --config=*) config=${1#*=}; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --spot | --preemptible | --best-effort | --reserved | --on-demand) prov=${1#--}; shift ;;
      --queued) queued=1; shift ;;
      -h | --help) usage_common; exit 0 ;;
      --) ARGS+=("$@"); break ;;
      *) ARGS+=("$1"); shift ;;
    esac
  done
  [[ -f $config ]] || die "configuration file not found: $config"
  # shellcheck source=config.sh
  source "$config"
  [[ -n $prov ]] && PROVISIONING=$prov
  [[ -n $queued ]] && QUEUED=$queued
  derive_config
}

# Chips-named types (v5e, v6e) have up to 8 chips on one host and 4 per host beyond; core-named types
# (v2, v3, v4, v5p) have 8 TensorCores per host.
num_hosts() {
  local gen=${1%-*} n=${1##*-}
  [[ $1 =~ ^v[0-9][a-z]*-[0-9]+$ ]] || die "unknown ACCELERATOR_TYPE '$1' (expected e.g. v5litepod-8, v4-32, v5p-8, v6e-8)"
  case $gen in
    v5litepod | v6e) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    v2 | v3 | v4 | v5p) if ((n <= 8)); then echo 1; else echo $((n / 8)); fi ;;
    *) die "unknown TPU generation '$gen' in ACCELERATOR_TYPE '$1'" ;;
  esac
}

default_runtime_version() {
  case ${1%-*} in
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    v2 | v3 | v4) echo tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for '$1': set RUNTIME_VERSION" ;;
  esac
}

# The folder name a source (gs://..., hf:org/name or a local folder) gets on the workers.
src_name() {
  local src=${!1%/} name
  [[ -z $src ]] && return
  name=$(basename "${src#hf:}")
  [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "$1 must end in a plain folder name, got '$src'"
  printf '%s' "$name"
}

derive_config() {
  local v
  for v in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE; do
    [[ -n ${!v:-} ]] || die "$v is not set (edit your config file or export $v=...)"
  done
  [[ $ACCELERATOR_TYPE == v5e-* ]] && ACCELERATOR_TYPE=v5litepod-${ACCELERATOR_TYPE#v5e-}
  NUM_HOSTS=$(num_hosts "$ACCELERATOR_TYPE")
  RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
  QR_NAME=${QR_NAME:-$TPU_NAME-qr}
  case $PROVISIONING in
    on-demand | spot | preemptible | best-effort | reserved) ;;
    *) die "PROVISIONING must be on-demand, spot, preemptible, best-effort or reserved, not '$PROVISIONING'" ;;
  esac
  BUCKET=${BUCKET%/}
  CKPT_ROOT=${CKPT_ROOT:-${BUCKET:+$BUCKET/needles/$RUN_NAME/runs}}
  if ((NUM_HOSTS > 1)) && [[ $CKPT_ROOT != gs://* ]]; then
    die "$ACCELERATOR_TYPE has $NUM_HOSTS hosts: they must share checkpoints on GCS; set BUCKET (or CKPT_ROOT) to a gs:// path"
  fi
  WEIGHTS_NAME=$(src_name WEIGHTS_SRC)
  EVAL_DATA_NAME=$(src_name EVAL_DATA_SRC)
  GC_LOC=(--project="$PROJECT" --zone="$ZONE")
}

# Run a shell command line on TPU workers ("all" or an index) over `gcloud ... ssh`.
tpu_ssh() {
  local worker=$1 cmd=$2
  shift 2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GC_LOC[@]}" --worker="$worker" --command="$cmd" "$@"
}

# The environment every remote command gets: the project's venv first on PATH, and where the recipe finds
# weights, evaluation data, its work folder and the (shared) checkpoint root. The $HOME parts are expanded
# by the worker's shell, the rest is quoted here.
remote_env() {
  # shellcheck disable=SC2016  # expanded on the worker, not here
  local e='export PYTHONUNBUFFERED=1 PATH="$HOME/needles/.venv/bin:$PATH" WORK="$HOME/needles_work"' kv
  e+=" RUN_NAME=$(shell_quote "$RUN_NAME")"
  [[ -n $CKPT_ROOT ]] && e+=" CKPT_ROOT=$(shell_quote "$CKPT_ROOT")"
  [[ -n $WEIGHTS_NAME ]] && e+=" BASE_MODEL=\"\$HOME/weights/$WEIGHTS_NAME\""
  [[ -n $EVAL_DATA_NAME ]] && e+=" EVAL_DATA=\"\$HOME/eval_data/$EVAL_DATA_NAME\""
  for kv in $REMOTE_ENV; do e+=" $(shell_quote "$kv")"; done
  printf '%s' "$e"
}
