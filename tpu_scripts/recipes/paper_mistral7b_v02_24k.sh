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
#   5. python -m eval compare (all results, one table)                 -> $WORK/results/compare/table.txt
# Environment (all optional but BASE_MODEL and EVAL_DATA):
#   BASE_MODEL     Hugging Face folder of Mistral-7B-Instruct-v0.2
#   EVAL_DATA      folder with mdqa/ (a nq-open-<N>_total_documents_gold_at_<k>.jsonl.gz file or more)
#   MDQA_RETRIEVAL Lost-in-the-Middle retrieval results (nq-open-contriever-msmarco-retrieved-documents.jsonl.gz)
#                  for the 120-document distractors; unset: the random-distractor variant (docs/eval.md)
#   MDQA_DOCS (120)  MDQA_POSITIONS ("0,29,59,89,119", 0-based)  FLENQA_FILE (FLenQA.jsonl/.zip; unset: skipped)
#   WORK (./needles_work_24k)  CKPT_ROOT ($WORK/runs)  SEEDS ("0")  VARIANTS ("template")
#   EPOCHS (2)  LR (5e-6)  GLOBAL_BATCH (16)  GRAD_ACCUM (2: fits a v5p-8, not a v5e-8; docs/long_context.md)
#   LIMIT (first N examples per task)  TRAIN_ARGS, EVAL_ARGS (default --dtype bfloat16 --shard --batch-size 1)
#   PYTHON (python3)  DRY_RUN=1 (as --dry-run)
#   TINY=1         CPU smoke run: random `tiny` base model, demo-simple data, MDQA_DOCS=30, LIMIT=1

set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "$0")/../lib.sh"
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$arg' (settings are environment variables: see --help)" ;;
  esac
done

: "${WORK:=needles_work_24k}"
[[ $WORK == /* ]] || WORK=$PWD/$WORK
random_base=0 model_preset=mistral-7b-instruct-v0.2 data_preset=paper-simple-24k buckets=(24576)
if [[ ${TINY:-0} == 1 ]]; then
  [[ -n ${BASE_MODEL:-} ]] || random_base=1 BASE_MODEL=$WORK/base-tiny
  model_preset=tiny data_preset=demo-simple buckets=(256)
  : "${MDQA_DOCS:=30}" "${MDQA_POSITIONS:=0,29}" "${LIMIT:=1}" "${LR:=1e-3}" "${GRAD_ACCUM:=1}" "${EVAL_ARGS:=}"
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
fi
: "${BASE_MODEL:=}" "${EVAL_DATA:=}" "${CKPT_ROOT:=$WORK/runs}" "${LIMIT:=}" "${PYTHON:=python3}"
: "${SEEDS:=0}" "${VARIANTS:=template}" "${EPOCHS:=2}" "${LR:=5e-6}" "${GLOBAL_BATCH:=16}" "${GRAD_ACCUM:=2}"
: "${MDQA_DOCS:=120}" "${MDQA_POSITIONS:=0,29,59,89,119}" "${MDQA_RETRIEVAL:=}" "${FLENQA_FILE:=}"
# 120-document prompts are ~20K tokens: one at a time, weights in bfloat16 split over the chips.
: "${EVAL_ARGS=--dtype bfloat16 --shard --batch-size 1}"
read -ra train_extra <<<"${TRAIN_ARGS:-}"
read -ra eval_extra <<<"$EVAL_ARGS"
CKPT_ROOT=${CKPT_ROOT%/}

[[ -n $BASE_MODEL ]] || die "set BASE_MODEL to the Hugging Face folder of Mistral-7B-Instruct-v0.2 (or TINY=1)"
if [[ $DRY_RUN != 1 && $random_base == 0 && ! -f $BASE_MODEL/config.json ]]; then
  die "BASE_MODEL=$BASE_MODEL is not a Hugging Face folder (no config.json)"
fi
[[ -n $EVAL_DATA && ( -d $EVAL_DATA/mdqa || $DRY_RUN == 1 ) ]] || die "set EVAL_DATA to a folder with mdqa/"

# step NAME CMD...: run CMD unless step NAME finished in an earlier run (markers in $WORK/.done).
step() {
  local name=$1 marker=$WORK/.done/$1
  shift
  if [[ $DRY_RUN != 1 && -e $marker ]]; then
    info "skip $name (done before; delete $marker to redo)"
    return
  fi
  run "$@"
  if [[ $DRY_RUN != 1 ]]; then mkdir -p "$WORK/.done" && touch "$marker"; fi
}

mdqa_flags=(--data-dir "$EVAL_DATA/mdqa" --num-docs "$MDQA_DOCS" --gold-positions "$MDQA_POSITIONS" --closed-book)
[[ -z $MDQA_RETRIEVAL ]] || mdqa_flags+=(--retrieval-file "$MDQA_RETRIEVAL")

# evaluate LABEL MODEL RUN: MDQA at $MDQA_DOCS documents, the synthetic samples of RUN, FLenQA (+ CoT).
evaluate() {
  local label=$1 model=$2 r=$3 dir=$WORK/results/$1
  step "eval-$label-mdqa" "$PYTHON" -m eval mdqa --model "$model" "${mdqa_flags[@]}" ${LIMIT:+--limit "$LIMIT"} \
    --label "$label" --out "$dir/mdqa$MDQA_DOCS" "${eval_extra[@]}"
  step "eval-$label-synthetic-$r" "$PYTHON" -m eval synthetic --model "$model" \
    --data-file "$WORK/data/$r/eval.jsonl" ${LIMIT:+--limit "$LIMIT"} --label "$label" \
    --out "$dir/synthetic-$r" "${eval_extra[@]}"
  if [[ -n $FLENQA_FILE ]]; then
    step "eval-$label-flenqa" "$PYTHON" -m eval flenqa --model "$model" --data-file "$FLENQA_FILE" \
      ${LIMIT:+--limit "$LIMIT"} --label "$label" --out "$dir/flenqa" "${eval_extra[@]}"
    step "eval-$label-flenqa-cot" "$PYTHON" -m eval flenqa --model "$model" --data-file "$FLENQA_FILE" --cot \
      ${LIMIT:+--limit "$LIMIT"} --label "$label" --out "$dir/flenqa-cot" "${eval_extra[@]}"
  fi
}

runs=()
for seed in $SEEDS; do
  for variant in $VARIANTS; do
    [[ $variant == template || $variant == notemplate ]] || die "VARIANTS takes template and notemplate, not '$variant'"
    runs+=("$variant-seed$seed")
  done
done

info "== data ($data_preset)"
for r in "${runs[@]}"; do
  template=()
  [[ $r == template-* ]] && template=(--template)
  step "data-$r" "$PYTHON" -m data_gen generate --preset "$data_preset" --seed "${r##*-seed}" "${template[@]}" \
    --overwrite --out "$WORK/data/$r"
  if [[ $DRY_RUN == 1 || ! -e $WORK/.done/shards-$r ]]; then run rm -rf "$WORK/shards/$r"; fi
  step "shards-$r" "$PYTHON" -m data_gen shards --input "$WORK/data/$r/train.jsonl" --out "$WORK/shards/$r" \
    --buckets "${buckets[@]}"
done

info "== before finetuning"
if ((random_base)); then
  step base-tiny "$PYTHON" "$TPU_SCRIPTS_DIR/recipes/make_tiny_base.py" --preset "$model_preset" --out "$BASE_MODEL"
fi
for r in "${runs[@]}"; do evaluate base "$BASE_MODEL" "$r"; done

for r in "${runs[@]}"; do
  info "== finetune $r"
  step "train-$r" "$PYTHON" -m jaxtrain train --model "$model_preset" --init-from "$BASE_MODEL" \
    --data "$WORK/shards/$r" --out "$CKPT_ROOT/$r" --epochs "$EPOCHS" --lr "$LR" --global-batch "$GLOBAL_BATCH" \
    --grad-accum "$GRAD_ACCUM" --resume "${train_extra[@]}"
  if [[ $DRY_RUN == 1 || ! -e $WORK/.done/export-$r ]]; then run rm -rf "$WORK/hf/$r"; fi
  step "export-$r" "$PYTHON" -m jaxtrain export --checkpoint "$CKPT_ROOT/$r" --out "$WORK/hf/$r"
  evaluate "$r" "$WORK/hf/$r" "$r"
done

info "== compare"
files=()
for label in base "${runs[@]}"; do
  files+=("$WORK/results/$label/mdqa$MDQA_DOCS/results.json")
  [[ -z $FLENQA_FILE ]] || files+=("$WORK/results/$label/flenqa/results.json" "$WORK/results/$label/flenqa-cot/results.json")
done
for r in "${runs[@]}"; do
  files+=("$WORK/results/base/synthetic-$r/results.json" "$WORK/results/$r/synthetic-$r/results.json")
done
if [[ $DRY_RUN == 1 ]]; then
  run "$PYTHON" -m eval compare "${files[@]}" --out "$WORK/results/compare"
else
  mkdir -p "$WORK/results/compare"
  run "$PYTHON" -m eval compare "${files[@]}" --out "$WORK/results/compare" | tee "$WORK/results/compare/table.txt"
fi
info "done: $WORK/results/compare/table.txt, MDQA plot $WORK/results/compare/mdqa_compare.png"
