# shellcheck shell=bash
# Configuration of the tpu_scripts/ (sourced by them). Edit it, or copy it and pass --config FILE (or set
# TPU_CONFIG=FILE). Every value can also be overridden from the environment for one command, e.g.
#   ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b tpu_scripts/create.sh --spot
# shellcheck disable=SC2034  # the values are used by the scripts that source this file

# Where the TPU lives.
: "${PROJECT:=}"                       # your GCP project id (required)
: "${ZONE:=us-west4-a}"                # a zone that has your accelerator type (and quota for it)
: "${TPU_NAME:=needles}"

# What to rent. Accelerator types: v5litepod-8 (= v5e-8, one host), v4-8, v4-32 (4 hosts), v5p-8,
# v6e-8, ... An empty RUNTIME_VERSION picks the standard JAX image for the generation
# (v2-alpha-tpuv5-lite, tpu-ubuntu2204-base, v2-alpha-tpuv5, v2-alpha-tpuv6e).
: "${ACCELERATOR_TYPE:=v5litepod-8}"
: "${RUNTIME_VERSION:=}"
# on-demand | spot | preemptible (not with QUEUED=1) | best-effort (QUEUED=1 only) | reserved
: "${PROVISIONING:=on-demand}"
: "${QUEUED:=0}"                       # 1 = ask through a queued resource (waits for capacity)
: "${QR_NAME:=}"                       # queued-resource id; empty = "$TPU_NAME-qr"

# Where results and checkpoints go. Checkpoints go to "$BUCKET/needles/$RUN_NAME/runs" so a run survives
# a preemption; multi-host slices need this (or CKPT_ROOT) on gs://.
: "${BUCKET:=}"                        # e.g. gs://my-bucket
: "${RUN_NAME:=paper_mistral7b}"
: "${CKPT_ROOT:=}"                     # empty = derived from BUCKET (or the worker's disk when no bucket)

# What setup.sh installs on every worker.
: "${SOURCE_REF:=HEAD}"                # git revision of this checkout that is shipped (committed files only)
: "${PYTHON_VERSION:=3.11}"
# Hugging Face weights: gs://bucket/path/Mistral-7B-Instruct-v0.1 (fastest on pods),
# hf:mistralai/Mistral-7B-Instruct-v0.1 (gated: export HF_TOKEN first), or a local folder (scp'd).
: "${WEIGHTS_SRC:=}"
# Evaluation data laid out like ../shared/data (mdqa/, mmlu/, gsm8k/, hellaswag/, nq_open/, triviaqa/):
# gs://... or a local folder; see docs/tpu.md.
: "${EVAL_DATA_SRC:=}"

# Extra environment for the commands run.sh starts, as space-separated KEY=VALUE words,
# e.g. "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true".
: "${REMOTE_ENV:=}"
