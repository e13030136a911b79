#!/usr/bin/env bash
# Delete the TPU VM (with QUEUED=1 / --queued: the queued resource and its TPU). gcloud asks first.
# Checkpoints on gs:// stay; copy results out first (tpu_scripts/copy_out.sh).
#
# Usage: tpu_scripts/delete.sh [common options]

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_common "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"

if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$QR_NAME" "${GC_LOC[@]}" --force
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GC_LOC[@]}"
fi
