#!/usr/bin/env bash
# Install the project on every worker of the TPU (--worker=all): ships the committed files of this
# checkout (SOURCE_REF), makes a Python $PYTHON_VERSION venv with the project and its tpu+eval extras
# (tpu_scripts/remote/setup_worker.sh), and fetches the Hugging Face weights (WEIGHTS_SRC) and the
# evaluation data (EVAL_DATA_SRC) onto each worker. Safe to re-run (e.g. after a code change).
#
# Usage: tpu_scripts/setup.sh [common options]

set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
parse_common "$@"
((${#ARGS[@]} == 0)) || die "unexpected arguments: ${ARGS[*]}"

tarball=${TMPDIR:-/tmp}/needles-src-$TPU_NAME.tar.gz
if [[ $DRY_RUN != 1 ]] && ! git -C "$PROJECT_ROOT" diff --quiet "$SOURCE_REF" 2>/dev/null; then
  info "note: uncommitted changes are not shipped (only $SOURCE_REF is)"
fi
run git -C "$PROJECT_ROOT" archive --format=tar.gz -o "$tarball" "$SOURCE_REF"
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:needles-src.tar.gz" "${GC_LOC[@]}" --worker=all

# Sources on gs:// or the Hub are fetched by each worker itself; local folders are copied from here.
remote_src() { if [[ $1 == gs://* || $1 == hf:* ]]; then printf '%s' "$1"; fi; }
env_words=(PYTHON_VERSION="$PYTHON_VERSION" WEIGHTS_SRC="$(remote_src "$WEIGHTS_SRC")"
  EVAL_DATA_SRC="$(remote_src "$EVAL_DATA_SRC")")
if [[ $WEIGHTS_SRC == hf:* && -n ${HF_TOKEN:-} ]]; then
  # The token must reach the workers, but never a printed command line.
  if [[ $DRY_RUN == 1 ]]; then env_words+=("HF_TOKEN=<hidden>"); else env_words+=("HF_TOKEN=$HF_TOKEN"); fi
fi
tpu_ssh all "mkdir -p needles && tar -xzf needles-src.tar.gz -C needles && env $(quote_all "${env_words[@]}") bash needles/tpu_scripts/remote/setup_worker.sh"

copy_local() {  # copy the local folder $VAR names into ~/DIR/ on every worker
  local src=${!1%/}
  [[ -z $src || -n $(remote_src "$src") ]] && return
  [[ -d $src || $DRY_RUN == 1 ]] || die "$1='$src' is neither gs://..., hf:... nor a local folder"
  run gcloud compute tpus tpu-vm scp --recurse "$src" "$TPU_NAME:$2/" "${GC_LOC[@]}" --worker=all
}
copy_local WEIGHTS_SRC weights
copy_local EVAL_DATA_SRC eval_data
info "setup done on $NUM_HOSTS host(s); next: tpu_scripts/run.sh"
