#!/usr/bin/env bash
# Runs ON each TPU worker, from the unpacked project in ~/needles (setup.sh starts it there): creates the
# venv ~/needles/.venv with the project and its tpu+eval extras, then fetches the weights into
# ~/weights/<name> and the evaluation data into ~/eval_data/<name> when their sources are gs:// or hf:.
# Environment: PYTHON_VERSION, WEIGHTS_SRC, EVAL_DATA_SRC (empty = skip), HF_TOKEN (gated Hub models).

set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p ~/weights ~/eval_data ~/needles_logs

# The TPU images ship an older system Python; uv fetches the one the project needs.
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install --user --quiet uv
[[ -x .venv/bin/python ]] || uv venv --python "${PYTHON_VERSION:-3.11}" .venv
uv pip install --python .venv/bin/python --quiet -e '.[tpu,eval]'

fetch() {  # fetch SRC (gs://... or hf:org/name) into ~/DIR/<last part of SRC>
  local dest
  dest=~/$2/$(basename "${1#hf:}")
  case $1 in
    gs://*) mkdir -p "$dest" && gcloud storage rsync --recursive "$1" "$dest" ;;
    hf:*) .venv/bin/hf download "${1#hf:}" --local-dir "$dest" --include '*.json' '*.safetensors' 'tokenizer*' ;;
  esac
}
if [[ -n ${WEIGHTS_SRC:-} ]]; then fetch "$WEIGHTS_SRC" weights; fi
if [[ -n ${EVAL_DATA_SRC:-} ]]; then fetch "$EVAL_DATA_SRC" eval_data; fi
echo "worker $(hostname) ready"
