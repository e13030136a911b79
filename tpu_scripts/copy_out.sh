#!/usr/bin/env bash
# Copy the results out of the TPU before deleting it: the recipe's results folder (evaluation results,
# comparison tables, the MDQA plot) from worker 0 and every worker's logs go to
# $BUCKET/needles/$RUN_NAME/ (checkpoints are already there); --local DIR also copies the results here.
#
# Usage: tpu_scripts/copy_out.sh [common options] [--local DIR] [--models]
#   --models     also upload the exported Hugging Face folders (about 14 GB each for Mistral 7B)

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_common "$@"

local_dir="" models=0
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --local) (($# >= 2)) || die "--local needs a folder"; local_dir=$2; shift 2 ;;
    --models) models=1; shift ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ -n $BUCKET || -n $local_dir ]] || die "nowhere to copy to: set BUCKET or pass --local DIR"

if [[ -n $BUCKET ]]; then
  dest=$(shell_quote "$BUCKET/needles/$RUN_NAME")
  up="gcloud storage rsync --recursive ~/needles_work/results $dest/results"
  ((models)) && up+=" && gcloud storage rsync --recursive ~/needles_work/hf $dest/hf"
  tpu_ssh 0 "$up"
  tpu_ssh all "gcloud storage rsync --recursive ~/needles_logs $dest/logs/\$(hostname)"
fi
if [[ -n $local_dir ]]; then
  run mkdir -p "$local_dir"
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:needles_work/results" "$local_dir" "${GC_LOC[@]}" --worker=0
fi
