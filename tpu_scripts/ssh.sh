#!/usr/bin/env bash
# Open a shell on one worker, or run a command line on some (as with ssh: quote '$VARS' to expand them
# there; the command starts in the home folder, the project is in ~/needles with its venv in .venv).
#
# Usage: tpu_scripts/ssh.sh [common options] [--worker N|all|1,3|0-2] [-- COMMAND ...]   (default worker 0)

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_common "$@"

worker=0 cmd=""
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --worker) (($# >= 2)) || die "--worker needs a value"; worker=$2; shift 2 ;;
    --worker=*) worker=${1#*=}; shift ;;
    --) shift; cmd="$*"; break ;;
    *) die "unknown option '$1' (a command goes after --)" ;;
  esac
done

if [[ -n $cmd ]]; then
  tpu_ssh "$worker" "$cmd"
else
  [[ $worker =~ ^[0-9]+$ ]] || die "an interactive shell needs one worker index, not '$worker'"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GC_LOC[@]}" --worker="$worker"
fi
