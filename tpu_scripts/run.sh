#!/usr/bin/env bash
# Run one command on every worker at once (--worker=all): from ~/needles, with the project's venv first on
# PATH and the recipe's environment (WORK, CKPT_ROOT, BASE_MODEL, EVAL_DATA, RUN_NAME, REMOTE_ENV), each
# host logging to ~/needles_logs/LABEL.log on itself. Without a command: the paper's recipe
# (tpu_scripts/recipes/paper_mistral7b.sh). The command is a shell line run on the workers, as with ssh:
# quote '$VARS' to expand them there. A pod must run the same program on every host (training calls
# jax.distributed.initialize() itself). After a preemption, re-running resumes from the newest checkpoint
# under CKPT_ROOT (the recipe trains with --resume and skips finished steps).
#
# Usage: tpu_scripts/run.sh [common options] [--detach] [--label NAME] [-- COMMAND ...]
#   --detach      start in the background on every worker (survives a dropped connection); follow it
#                 with tpu_scripts/status.sh
#   --label NAME  name of the per-host log (default: run)
# Attached runs on a multi-host slice write one local log per host too: tpu_logs/TPU_NAME/TIME/<worker>.log
# (LOG_DIR overrides the folder).
# Example:
#   tpu_scripts/run.sh --label train -- python -m jaxtrain train --model mistral-7b-instruct-v0.1 \
#     --init-from '$BASE_MODEL' --data '$WORK/shards/template-seed0' --out '$CKPT_ROOT/template-seed0' --resume

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_common "$@"

detach=0 label=run cmd="bash tpu_scripts/recipes/paper_mistral7b.sh"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --detach) detach=1; shift ;;
    --label) (($# >= 2)) || die "--label needs a name"; label=$2; shift 2 ;;
    --) shift; (($#)) && cmd="$*"; break ;;
    *) die "unknown option '$1' (a command goes after --)" ;;
  esac
done
[[ $label =~ ^[A-Za-z0-9._-]+$ ]] || die "--label must be a plain name, got '$label'"

# shellcheck disable=SC2088  # expanded on the worker
log="~/needles_logs/$label.log"
prefix="cd ~/needles && mkdir -p ~/needles_logs && $(remote_env)"
if ((detach)); then
  tpu_ssh all "$prefix && { nohup bash -c $(shell_quote "$cmd") > $log 2>&1 < /dev/null & } && echo \"started on \$(hostname): $log\""
elif ((NUM_HOSTS > 1)); then
  log_dir=${LOG_DIR:-tpu_logs/$TPU_NAME/$(date +%Y%m%d-%H%M%S)}
  run mkdir -p "$log_dir"
  info "$NUM_HOSTS hosts: their output goes to $log_dir/<worker>.log (follow: tail -f $log_dir/0.log)"
  tpu_ssh all "set -o pipefail; $prefix && { $cmd ; } 2>&1 | tee $log" --output-directory="$log_dir"
else
  tpu_ssh all "set -o pipefail; $prefix && { $cmd ; } 2>&1 | tee $log"
fi
