#!/usr/bin/env bash
# The paper's Mistral-7B experiment end to end: synthetic key-value data for seeds 0-2 with and without
# the answer template, one finetune of Mistral-7B-Instruct-v0.1 per data set (2 epochs, lr 5e-6, global
# batch 16), MDQA / synthetic / general benchmarks before and after, comparison tables and the MDQA plot.
# On a TPU VM, tpu_scripts/run.sh starts it on every host; it runs as well on one machine (TINY=1 on CPU).
# Re-running skips finished steps and training resumes from its newest checkpoint (after a preemption).
#
# Usage: [VAR=value ...] tpu_scripts/recipes/paper_mistral7b.sh [--dry-run]
# Steps:
#   1. python -m data_gen generate / shards for every seed and variant  -> $WORK/data, $WORK/shards
#   2. python -m eval TASK on the base model                              -> $WORK/results/base/
#   3. python -m jaxtrain train --init-from $BASE_MODEL ... --resume      -> $CKPT_ROOT/<variant>-seed<S>
#   4. python -m jaxtrain export, then the same evaluations               -> $WORK/results/<variant>-seed<S>/
#      (LoRA: python -m eval TASK --model $CKPT_ROOT/<run> --base $BASE_MODEL --base-dtype $BASE_EVAL_DTYPE,
#      the run itself with its adapters unmerged; the base model is evaluated in BASE_EVAL_DTYPE too)
#   5. python -m eval compare per task                     -> $WORK/results/compare/<task>/table.txt
#      and the MDQA accuracy-by-position plot, base vs. finetuned: $WORK/results/compare/mdqa/mdqa_compare.png;
#      the seeds of a variant are one column (mean ± standard deviation) and one line with error bars; with
#      several seeds also each variant's synthetic samples over its seeds: $WORK/results/compare/synthetic-<variant>
#   6. LoRA with EXPORT_MERGED=1: python -m jaxtrain export --merged      -> $WORK/hf/<variant>-seed<S>
# Environment (all optional but BASE_MODEL):
#   BASE_MODEL    Hugging Face folder of Mistral-7B-Instruct-v0.1 (the model finetuned, and "before")
#   EVAL_DATA     folder laid out like the project's shared data (mdqa/, mmlu/, hellaswag/, gsm8k/,
#                 triviaqa/, nq_open/), one --data-dir per task; needed for MDQA. Unset: tfds for the rest
#   WORK          working folder (default ./needles_work)
#   CKPT_ROOT     where the training runs go (default $WORK/runs); gs://... on a multi-host pod
#   SEEDS ("0 1 2")  VARIANTS ("template notemplate"; niah adds the paper's needle-in-a-haystack baseline,
#                 NIAH_ARGS: by default 4K-token haystacks of the distractor passages of $EVAL_DATA/mdqa)
#   DATA_PRESET (paper-simple)
#   MODEL_PRESET (mistral-7b-instruct-v0.1)  EPOCHS (2)  LR (5e-6)  GLOBAL_BATCH (16)  GRAD_ACCUM (1; LoRA:
#                 GLOBAL_BATCH)
#   TASKS ("mdqa synthetic mmlu hellaswag gsm8k triviaqa nq_open")  LIMIT (first N examples per task)
#   EXPORT_DTYPE  dtype of the Hugging Face export: a full finetune's, the folder evaluated, and LoRA's merged
#                 one (default bfloat16, Mistral's own)
#   TRAIN_ARGS, EVAL_ARGS  extra flags for every train / eval command (defaults: TRAIN_ARGS
#                 "--remat offload_input --offload-state", EVAL_ARGS "--dtype bfloat16 --shard")
#   LORA_RANK     > 0: LoRA adapters of this rank on the frozen base instead of a full finetune (one chip,
#                 e.g. Colab's v5e-1: LORA_RANK=16); LR then defaults to 2e-4, GRAD_ACCUM to GLOBAL_BATCH (one
#                 4K-token row per micro-batch), TRAIN_ARGS to
#                 "--remat offload_input" (8.7 GiB of 15.75 on a v5e-1, docs/lora.md) and EVAL_ARGS to
#                 "--batch-size 1" (no --dtype: BASE_EVAL_DTYPE sets it).
#                 BASE_DTYPE (int8) is the frozen base's dtype in training (int8 or bfloat16; docs/lora.md),
#                 BASE_EVAL_DTYPE (default BASE_DTYPE; int8, bfloat16 or float32) the base's dtype in evaluation,
#                 of the base model and under the adapters alike. EXPORT_MERGED (1) ends the recipe with each
#                 run merged into its base as a Hugging Face folder, on the host (~27 GiB of host memory for
#                 the 7B; 0 skips it: the run folder keeps the adapters for a later `jaxtrain export`)
#   PYTHON (python3)
#   TINY=1        CPU smoke run of the very same steps: a randomly initialised `tiny` model as the base
#                 (unless BASE_MODEL is given),
#                 DATA_PRESET=demo-simple SEEDS=0 VARIANTS=template LIMIT=2 LR=1e-3 JAX_PLATFORMS=cpu
#                 (each overridable)
#   DRY_RUN=1     print the commands instead of running them (as --dry-run does)

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
recipe_init needles_work "$@"
if [[ ${TINY:-0} == 1 ]]; then
  : "${MODEL_PRESET:=tiny}" "${DATA_PRESET:=demo-simple}"
  : "${SEEDS:=0}" "${VARIANTS:=template}" "${LIMIT:=2}" "${LR:=1e-3}" "${TRAIN_ARGS:=}" "${EVAL_ARGS:=}"
fi
: "${SEEDS:=0 1 2}" "${VARIANTS:=template notemplate}" "${DATA_PRESET:=paper-simple}"
: "${MODEL_PRESET:=mistral-7b-instruct-v0.1}"
: "${TASKS:=mdqa synthetic mmlu hellaswag gsm8k triviaqa nq_open}"
# What makes the 7B finetune fit a v5e-8 at global batch 16 (python -m jaxtrain aot; README "Will it fit?").
# Mistral 7B is evaluated in bfloat16, the dtype it is published in (float32 would double the memory), split
# over the chips: 13.5 GiB of weights and the KV caches of 8 prompts of 4K tokens (4 GiB) exceed one v5e chip.
recipe_settings "--remat offload_input --offload-state" "--dtype bfloat16 --shard"
read -ra tasks <<<"$TASKS"

check_base_model Mistral-7B-Instruct-v0.1
[[ -z $EVAL_DATA || -d $EVAL_DATA || $DRY_RUN == 1 ]] || die "EVAL_DATA=$EVAL_DATA is not a folder"
if [[ " ${tasks[*]} " == *" mdqa "* && -z $EVAL_DATA ]]; then
  die "MDQA needs EVAL_DATA (a folder with mdqa/nq-open-20_total_documents_gold_at_{0,4,9,14,19}.jsonl.gz); or drop mdqa from TASKS"
fi

# task_data_flags KEY: a task's data, EVAL_DATA/<task> (tfds without EVAL_DATA).
task_data_flags() {
  DATA_FLAGS=()
  if [[ -n $EVAL_DATA ]]; then DATA_FLAGS=(--data-dir "$EVAL_DATA/$1"); fi
}

if [[ -n $EVAL_DATA ]]; then : "${NIAH_ARGS:=--haystack mdqa:$EVAL_DATA/mdqa}"; fi
make_data "$DATA_PRESET"
make_tiny_base "$MODEL_PRESET"
evaluate_all "$MODEL_PRESET"
export_merged
info "done: tables in $WORK/results/compare/*/table.txt, MDQA plot $WORK/results/compare/mdqa/mdqa_compare.png"
