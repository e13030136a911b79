#!/usr/bin/env bash
# Create the TPU VM (single host or pod slice) described by the configuration.
#
# Usage: tpu_scripts/create.sh [common options]
#   on-demand (default), --spot or --preemptible: `gcloud compute tpus tpu-vm create`
#   --queued [--spot | --best-effort | --reserved]: a queued resource that waits for capacity; follow it
#   with tpu_scripts/status.sh until it is ACTIVE. Spot, preemptible and best-effort TPUs can be taken
#   back at any time: delete, create and set up again, then run.sh resumes from the newest checkpoint.

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_common "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"

info "TPU $TPU_NAME: $ACCELERATOR_TYPE ($NUM_HOSTS host(s)), runtime $RUNTIME_VERSION, $PROVISIONING, zone $ZONE"
if [[ $QUEUED == 1 ]]; then
  gc=(gcloud compute tpus queued-resources create "$QR_NAME" "${GC_LOC[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" --node-id="$TPU_NAME")
  case $PROVISIONING in
    spot | reserved) gc+=(--"$PROVISIONING") ;;
    best-effort) gc=(gcloud alpha "${gc[@]:1}" --best-effort) ;;  # --best-effort exists only in alpha
    preemptible) die "queued resources take --spot, not --preemptible" ;;
  esac
  run "${gc[@]}"
  info "queued as $QR_NAME; tpu_scripts/status.sh shows when it is ACTIVE"
else
  gc=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GC_LOC[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  case $PROVISIONING in
    spot | preemptible | reserved) gc+=(--"$PROVISIONING") ;;
    best-effort) die "best-effort needs a queued resource: add --queued" ;;
  esac
  run "${gc[@]}"
fi
