#!/usr/bin/env bash
# Show the TPU's state (and the queued resource's, with --queued) and the last lines of every log on every
# worker.
#
# Usage: tpu_scripts/status.sh [common options] [--lines N]   (N = 0: no logs; default 5)

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_common "$@"

lines=5
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --lines) (($# >= 2)) || die "--lines needs a number"; lines=$2; shift 2 ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ $lines =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$lines'"

if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources describe "$QR_NAME" "${GC_LOC[@]}" --format='yaml(state)'
fi
run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GC_LOC[@]}" \
  --format='yaml(acceleratorType,state,health,healthDescription,schedulingConfig)' \
  || { info "no TPU VM $TPU_NAME (yet)"; exit 0; }
if ((lines > 0)); then
  tpu_ssh all "for f in ~/needles_logs/*.log; do [ -e \"\$f\" ] && echo \"== \$(hostname) \$f\" && tail -n $lines \"\$f\"; done; true"
fi
