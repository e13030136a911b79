#!/usr/bin/env bash
# The paper's long-context variant: Mistral-7B-Instruct-v0.2 (RoPE theta 1e6, no sliding window) finetuned
# on synthetic key-value prompts of up to 24K tokens (data_gen preset paper-simple-24k), evaluated on MDQA
# with 120 documents (~20K-token prompts) before and after, plus the held-out synthetic samples (and FLenQA
# when FLENQA_FILE is given); one summary table of everything at the end. Runs like paper_mistral7b.sh.
#
# Usage: [VAR=value ...] tpu_scripts/recipes/paper_mistral7b_v02_24k.sh [--dry-run]
# Steps:
#   1. python -m data_gen generate --preset paper-simple-24k / shards --buckets 24576  -> $WORK/data, $WORK/shards
#   2. python -m eval mdqa --num-docs 120 ... (+ synthetic, flenqa) on the base model -> $WORK/results/base/
#   3. python -m jaxtrain train --model mistral-7b-instruct-v0.2 --init-from $BASE_MODEL ... --resume
#   4. python -m jaxtrain export, then the same evaluations           -> $WORK/results/<variant>-seed<S>/
#      (LoRA: the run itself is evaluated; the merged export comes last, as in paper_mistral7b.sh)
#   5. python -m eval compare (all results, one table)                 -> $WORK/results/compare/table.txt
# Environment (all optional but BASE_MODEL and EVAL_DATA):
#   BASE_MODEL     Hugging Face folder of Mistral-7B-Instruct-v0.2
#   EVAL_DATA      folder with mdqa/ (a nq-open-<N>_total_documents_gold_at_<k>.jsonl.gz file or more)
#   MDQA_RETRIEVAL Lost-in-the-Middle retrieval results (nq-open-contriever-msmarco-retrieved-documents.jsonl.gz)
#                  for the 120-document distractors; unset: the random-distractor variant (docs/eval.md)
#   MDQA_DOCS (120)  MDQA_POSITIONS ("0,29,59,89,119", 0-based)  FLENQA_FILE (FLenQA.jsonl/.zip; unset: skipped)
#   WORK (./needles_work_24k)  CKPT_ROOT ($WORK/runs)  SEEDS ("0")  VARIANTS ("template")
#   EPOCHS (2)  LR (5e-6)  GLOBAL_BATCH (16)  GRAD_ACCUM (2: fits a v5p-8, not a v5e-8; docs/long_context.md;
#                  LoRA: GLOBAL_BATCH, one row per micro-batch)
#   LIMIT (first N examples per task)  TRAIN_ARGS, EVAL_ARGS (default --dtype bfloat16 --shard --batch-size 1)
#   LORA_RANK, BASE_DTYPE, BASE_EVAL_DTYPE, EXPORT_MERGED (LoRA instead of a full finetune, as in
#                  paper_mistral7b.sh; EVAL_ARGS then defaults to --batch-size 1)
#   EXPORT_DTYPE (bfloat16: the dtype of the Hugging Face export, a full finetune's or LoRA's merged one)
#   PYTHON (python3)  DRY_RUN=1 (as --dry-run)
#   TINY=1         CPU smoke run: random `tiny` base model, demo-simple data, MDQA_DOCS=30, LIMIT=1

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
recipe_init needles_work_24k "$@"
model_preset=mistral-7b-instruct-v0.2 data_preset=paper-simple-24k buckets=(24576)
if [[ ${TINY:-0} == 1 ]]; then
  model_preset=tiny data_preset=demo-simple buckets=(256)
  : "${MDQA_DOCS:=30}" "${MDQA_POSITIONS:=0,29}" "${LIMIT:=1}" "${LR:=1e-3}" "${GRAD_ACCUM:=1}" "${EVAL_ARGS:=}"
fi
: "${SEEDS:=0}" "${VARIANTS:=template}"
if [[ ${LORA_RANK:-0} == 0 ]]; then : "${GRAD_ACCUM:=2}"; fi
: "${MDQA_DOCS:=120}" "${MDQA_POSITIONS:=0,29,59,89,119}" "${MDQA_RETRIEVAL:=}" "${FLENQA_FILE:=}"
# 120-document prompts are ~20K tokens: one at a time, weights in bfloat16 split over the chips.
recipe_settings "" "--dtype bfloat16 --shard --batch-size 1"

check_base_model Mistral-7B-Instruct-v0.2
[[ -n $EVAL_DATA && ( -d $EVAL_DATA/mdqa || $DRY_RUN == 1 ) ]] || die "set EVAL_DATA to a folder with mdqa/"

mdqa_flags=(--data-dir "$EVAL_DATA/mdqa" --num-docs "$MDQA_DOCS" --gold-positions "$MDQA_POSITIONS" --closed-book)
[[ -z $MDQA_RETRIEVAL ]] || mdqa_flags+=(--retrieval-file "$MDQA_RETRIEVAL")

# evaluate LABEL RUN: model LABEL (base or a run, model_flags) on MDQA at $MDQA_DOCS documents, the
# synthetic samples of RUN, FLenQA (+ CoT).
evaluate() {
  local label=$1 r=$2 dir=$WORK/results/$1
  model_flags "$label"
  step "eval-$label-mdqa" "$PYTHON" -m eval mdqa "${MODEL_FLAGS[@]}" "${mdqa_flags[@]}" ${LIMIT:+--limit "$LIMIT"} \
    --label "$label" --out "$dir/mdqa$MDQA_DOCS" "${EVAL_FLAGS[@]}"
  step "eval-$label-synthetic-$r" "$PYTHON" -m eval synthetic "${MODEL_FLAGS[@]}" \
    --data-file "$WORK/data/$r/eval.jsonl" ${LIMIT:+--limit "$LIMIT"} --label "$label" \
    --out "$dir/synthetic-$r" "${EVAL_FLAGS[@]}"
  if [[ -n $FLENQA_FILE ]]; then
    step "eval-$label-flenqa" "$PYTHON" -m eval flenqa "${MODEL_FLAGS[@]}" --data-file "$FLENQA_FILE" \
      ${LIMIT:+--limit "$LIMIT"} --label "$label" --out "$dir/flenqa" "${EVAL_FLAGS[@]}"
    step "eval-$label-flenqa-cot" "$PYTHON" -m eval flenqa "${MODEL_FLAGS[@]}" --data-file "$FLENQA_FILE" --cot \
      ${LIMIT:+--limit "$LIMIT"} --label "$label" --out "$dir/flenqa-cot" "${EVAL_FLAGS[@]}"
  fi
}

make_data "$data_preset" --buckets "${buckets[@]}"

info "== before finetuning"
make_tiny_base "$model_preset"
for r in "${RUNS[@]}"; do evaluate base "$r"; done

for r in "${RUNS[@]}"; do
  finetune "$model_preset" "$r"
  evaluate "$r" "$r"
done

info "== compare"
files=()
for label in base "${RUNS[@]}"; do
  files+=("$WORK/results/$label/mdqa$MDQA_DOCS/results.json")
  [[ -z $FLENQA_FILE ]] || files+=("$WORK/results/$label/flenqa/results.json" "$WORK/results/$label/flenqa-cot/results.json")
done
for r in "${RUNS[@]}"; do
  files+=("$WORK/results/base/synthetic-$r/results.json" "$WORK/results/$r/synthetic-$r/results.json")
done
compare_into "$WORK/results/compare" "${files[@]}"
export_merged
info "done: $WORK/results/compare/table.txt, MDQA plot $WORK/results/compare/mdqa_compare.png"
