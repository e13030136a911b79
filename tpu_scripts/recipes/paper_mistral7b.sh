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
#   5. python -m eval compare per task                     -> $WORK/results/compare/<task>/table.txt
#      and the MDQA accuracy-by-position plot, base vs. finetuned: $WORK/results/compare/mdqa/mdqa_compare.png
# Environment (all optional but BASE_MODEL):
#   BASE_MODEL    Hugging Face folder of Mistral-7B-Instruct-v0.1 (the model finetuned, and "before")
#   EVAL_DATA     folder laid out like the project's shared data (mdqa/, mmlu/, hellaswag/, gsm8k/,
#                 triviaqa/, nq_open/), one --data-dir per task; needed for MDQA. Unset: tfds for the rest
#   WORK          working folder (default ./needles_work)
#   CKPT_ROOT     where the training runs go (default $WORK/runs); gs://... on a multi-host pod
#   SEEDS ("0 1 2")  VARIANTS ("template notemplate")  DATA_PRESET (paper-simple)
#   MODEL_PRESET (mistral-7b-instruct-v0.1)  EPOCHS (2)  LR (5e-6)  GLOBAL_BATCH (16)
#   TASKS ("mdqa synthetic mmlu hellaswag gsm8k triviaqa nq_open")  LIMIT (first N examples per task)
#   TRAIN_ARGS, EVAL_ARGS  extra flags for every train / eval command (defaults: TRAIN_ARGS
#                 "--remat offload_input --offload-state", EVAL_ARGS "--dtype bfloat16")
#   PYTHON (python3)
#   TINY=1        CPU smoke run of the very same steps: a randomly initialised `tiny` model as the base
#                 (unless BASE_MODEL is given),
#                 DATA_PRESET=demo-simple SEEDS=0 VARIANTS=template LIMIT=2 LR=1e-3 JAX_PLATFORMS=cpu
#                 (each overridable)
#   DRY_RUN=1     print the commands instead of running them (as --dry-run does)

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

: "${WORK:=needles_work}"
[[ $WORK == /* ]] || WORK=$PWD/$WORK
random_base=0
if [[ ${TINY:-0} == 1 ]]; then
  [[ -n ${BASE_MODEL:-} ]] || random_base=1 BASE_MODEL=$WORK/base-tiny
  : "${MODEL_PRESET:=tiny}" "${DATA_PRESET:=demo-simple}"
  : "${SEEDS:=0}" "${VARIANTS:=template}" "${LIMIT:=2}" "${LR:=1e-3}"
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
fi
: "${BASE_MODEL:=}" "${EVAL_DATA:=}" "${CKPT_ROOT:=$WORK/runs}" "${LIMIT:=}" "${PYTHON:=python3}"
: "${SEEDS:=0 1 2}" "${VARIANTS:=template notemplate}" "${DATA_PRESET:=paper-simple}"
: "${MODEL_PRESET:=mistral-7b-instruct-v0.1}" "${EPOCHS:=2}" "${LR:=5e-6}" "${GLOBAL_BATCH:=16}"
: "${TASKS:=mdqa synthetic mmlu hellaswag gsm8k triviaqa nq_open}"
# Mistral 7B is evaluated in bfloat16, the dtype it is published in (float32 would double the memory).
[[ ${TINY:-0} == 1 ]] || : "${EVAL_ARGS=--dtype bfloat16}"
# What makes the 7B finetune fit a v5e-8 at global batch 16 (python -m jaxtrain aot; README "Will it fit?").
[[ ${TINY:-0} == 1 ]] || : "${TRAIN_ARGS=--remat offload_input --offload-state}"
read -ra train_extra <<<"${TRAIN_ARGS:-}"
read -ra eval_extra <<<"${EVAL_ARGS:-}"
read -ra tasks <<<"$TASKS"
CKPT_ROOT=${CKPT_ROOT%/}

[[ -n $BASE_MODEL ]] || die "set BASE_MODEL to the Hugging Face folder of Mistral-7B-Instruct-v0.1 (or TINY=1)"
if [[ $DRY_RUN != 1 && $random_base == 0 && ! -f $BASE_MODEL/config.json ]]; then
  die "BASE_MODEL=$BASE_MODEL is not a Hugging Face folder (no config.json)"
fi
[[ -z $EVAL_DATA || -d $EVAL_DATA || $DRY_RUN == 1 ]] || die "EVAL_DATA=$EVAL_DATA is not a folder"
if [[ " ${tasks[*]} " == *" mdqa "* && -z $EVAL_DATA ]]; then
  die "MDQA needs EVAL_DATA (a folder with mdqa/nq-open-20_total_documents_gold_at_{0,4,9,14,19}.jsonl.gz); or drop mdqa from TASKS"
fi

# step NAME CMD...: run CMD unless step NAME finished in an earlier run of this recipe; remember it when it
# succeeds (so a crashed or preempted recipe picks up where it stopped).
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

# fresh_step NAME DIR CMD...: a step whose command refuses to write into an existing DIR; what an
# unfinished earlier attempt left there is removed first.
fresh_step() {
  if [[ $DRY_RUN == 1 || ! -e $WORK/.done/$1 ]]; then run rm -rf "$2"; fi
  step "$1" "${@:3}"
}

# evaluate LABEL MODEL KEY: one evaluation into $WORK/results/LABEL/KEY; KEY is a task, or
# synthetic-<run> for the held-out synthetic samples of that data set.
evaluate() {
  local label=$1 model=$2 key=$3 task=$3 data=()
  if [[ $key == synthetic-* ]]; then
    task=synthetic data=(--data-file "$WORK/data/${key#synthetic-}/eval.jsonl")
  elif [[ -n $EVAL_DATA ]]; then
    data=(--data-dir "$EVAL_DATA/$key")
  fi
  step "eval-$label-$key" "$PYTHON" -m eval "$task" --model "$model" "${data[@]}" ${LIMIT:+--limit "$LIMIT"} \
    --label "$label" --out "$WORK/results/$label/$key" "${eval_extra[@]}"
}

# Keys a model is evaluated on: every task, with "synthetic" on the data sets in $@.
eval_keys() {
  local t r
  for t in "${tasks[@]}"; do
    if [[ $t == synthetic ]]; then
      for r in "$@"; do echo "synthetic-$r"; done
    else
      echo "$t"
    fi
  done
}

runs=()
for seed in $SEEDS; do
  for variant in $VARIANTS; do
    [[ $variant == template || $variant == notemplate ]] || die "VARIANTS takes template and notemplate, not '$variant'"
    runs+=("$variant-seed$seed")
  done
done

info "== data"
for r in "${runs[@]}"; do
  template=()
  [[ $r == template-* ]] && template=(--template)
  step "data-$r" "$PYTHON" -m data_gen generate --preset "$DATA_PRESET" --seed "${r##*-seed}" "${template[@]}" \
    --overwrite --out "$WORK/data/$r"
  fresh_step "shards-$r" "$WORK/shards/$r" "$PYTHON" -m data_gen shards --input "$WORK/data/$r/train.jsonl" --out "$WORK/shards/$r"
done

info "== before finetuning"
if ((random_base)); then
  step base-tiny "$PYTHON" "$TPU_SCRIPTS_DIR/recipes/make_tiny_base.py" --preset "$MODEL_PRESET" --out "$BASE_MODEL"
fi
while read -r key; do evaluate base "$BASE_MODEL" "$key"; done < <(eval_keys "${runs[@]}")

for r in "${runs[@]}"; do
  info "== finetune $r"
  step "train-$r" "$PYTHON" -m jaxtrain train --model "$MODEL_PRESET" --init-from "$BASE_MODEL" \
    --data "$WORK/shards/$r" --out "$CKPT_ROOT/$r" --epochs "$EPOCHS" --lr "$LR" --global-batch "$GLOBAL_BATCH" \
    --resume "${train_extra[@]}"
  fresh_step "export-$r" "$WORK/hf/$r" "$PYTHON" -m jaxtrain export --checkpoint "$CKPT_ROOT/$r" --out "$WORK/hf/$r"
  while read -r key; do evaluate "$r" "$WORK/hf/$r" "$key"; done < <(eval_keys "$r")
done

info "== compare"
while read -r key; do
  files=("$WORK/results/base/$key/results.json")
  for r in "${runs[@]}"; do
    [[ $key == synthetic-* && $key != "synthetic-$r" ]] || files+=("$WORK/results/$r/$key/results.json")
  done
  table_dir=$WORK/results/compare/$key
  if [[ $DRY_RUN == 1 ]]; then
    run "$PYTHON" -m eval compare "${files[@]}" --out "$table_dir"
  else
    mkdir -p "$table_dir" && run "$PYTHON" -m eval compare "${files[@]}" --out "$table_dir" | tee "$table_dir/table.txt"
  fi
done < <(eval_keys "${runs[@]}")
info "done: tables in $WORK/results/compare/*/table.txt, MDQA plot $WORK/results/compare/mdqa/mdqa_compare.png"
