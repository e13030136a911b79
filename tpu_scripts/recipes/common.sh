# shellcheck shell=bash
# What the recipes share (each sources this file): their options, the TINY switch, resumable steps, the
# grid of data sets, and data generation / finetuning / the models evaluated / export / comparison. A recipe
# keeps only what differs: its presets, its evaluations and which results it compares.
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

# recipe_init DEFAULT_WORK "$@": the options (--dry-run, --help), WORK made absolute, and with TINY=1 a
# random tiny base model (unless BASE_MODEL is given; RANDOM_BASE=1) on the CPU.
recipe_init() {
  local arg
  : "${WORK:=$1}"
  shift
  for arg in "$@"; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown argument '$arg' (settings are environment variables: see --help)" ;;
    esac
  done
  [[ $WORK == /* ]] || WORK=$PWD/$WORK
  RANDOM_BASE=0
  if [[ ${TINY:-0} == 1 ]]; then
    [[ -n ${BASE_MODEL:-} ]] || RANDOM_BASE=1 BASE_MODEL=$WORK/base-tiny
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  fi
}

# recipe_settings FULL_TRAIN_ARGS FULL_EVAL_ARGS: the settings every recipe has (after its own defaults), the
# grid RUNS (<variant>-seed<S> for SEEDS x VARIANTS), the train flags TRAIN_FLAGS and the eval flags
# EVAL_FLAGS. A full finetune (the paper's: lr 5e-6) gets FULL_TRAIN_ARGS and FULL_EVAL_ARGS unless
# TRAIN_ARGS / EVAL_ARGS are set. LORA_RANK > 0 trains rank-r adapters on the frozen base in BASE_DTYPE
# instead (one chip, docs/lora.md: lr 2e-4, GRAD_ACCUM = GLOBAL_BATCH: one row per micro-batch, what fits a
# v5e-1) and evaluates on one chip, one prompt at a time, with the base in BASE_EVAL_DTYPE (default:
# BASE_DTYPE, the base the adapters were trained on), the base model too.
recipe_settings() {
  local seed variant extra
  : "${BASE_MODEL:=}" "${EVAL_DATA:=}" "${CKPT_ROOT:=$WORK/runs}" "${LIMIT:=}" "${PYTHON:=python3}"
  : "${EPOCHS:=2}" "${GLOBAL_BATCH:=16}" "${LORA_RANK:=0}" "${BASE_DTYPE:=int8}"
  : "${BASE_EVAL_DTYPE:=$BASE_DTYPE}" "${EXPORT_MERGED:=1}" "${EXPORT_DTYPE:=bfloat16}"
  CKPT_ROOT=${CKPT_ROOT%/}
  [[ $EXPORT_DTYPE =~ ^(bfloat16|float32|float16)$ ]] || die "EXPORT_DTYPE takes bfloat16, float32 or float16, not '$EXPORT_DTYPE'"
  [[ $LORA_RANK =~ ^[0-9]+$ ]] || die "LORA_RANK must be a whole number (0: full finetune), not '$LORA_RANK'"
  if ((LORA_RANK > 0)); then
    : "${LR:=2e-4}" "${GRAD_ACCUM:=$GLOBAL_BATCH}" "${TRAIN_ARGS=--remat offload_input}" "${EVAL_ARGS=--batch-size 1}"
    [[ $BASE_EVAL_DTYPE =~ ^(int8|bfloat16|float32)$ ]] || die "BASE_EVAL_DTYPE takes int8, bfloat16 or float32, not '$BASE_EVAL_DTYPE'"
    [[ " $EVAL_ARGS " != *" --dtype"* ]] || die "EVAL_ARGS='$EVAL_ARGS': with LORA_RANK the weights' dtype is BASE_EVAL_DTYPE (--base-dtype); drop --dtype"
    [[ $EXPORT_MERGED =~ ^[01]$ ]] || die "EXPORT_MERGED takes 1 (write the merged Hugging Face folders) or 0, not '$EXPORT_MERGED'"
    TRAIN_FLAGS=(--lora-rank "$LORA_RANK" --base-dtype "$BASE_DTYPE")
  else
    : "${LR:=5e-6}" "${GRAD_ACCUM:=1}" "${TRAIN_ARGS=$1}" "${EVAL_ARGS=$2}"
    TRAIN_FLAGS=()
  fi
  read -ra extra <<<"$TRAIN_ARGS"
  TRAIN_FLAGS+=("${extra[@]}")
  # shellcheck disable=SC2034  # the recipes' evaluations use it
  read -ra EVAL_FLAGS <<<"$EVAL_ARGS"
  RUNS=()
  for seed in $SEEDS; do
    for variant in $VARIANTS; do
      [[ $variant =~ ^(template|notemplate|niah)$ ]] || die "VARIANTS takes template, notemplate and niah, not '$variant'"
      RUNS+=("$variant-seed$seed")
    done
  done
}

# check_base_model NAME: BASE_MODEL is set and (unless it is made here, or in a dry run) a Hugging Face folder.
check_base_model() {
  [[ -n $BASE_MODEL ]] || die "set BASE_MODEL to the Hugging Face folder of $1 (or TINY=1)"
  if [[ $DRY_RUN != 1 && $RANDOM_BASE == 0 && ! -f $BASE_MODEL/config.json ]]; then
    die "BASE_MODEL=$BASE_MODEL is not a Hugging Face folder (no config.json)"
  fi
}

# step NAME CMD...: run CMD unless step NAME finished in an earlier run of this recipe; remember it when it
# succeeds (markers in $WORK/.done, so a crashed or preempted recipe picks up where it stopped). A failing CMD
# stops the recipe with its status; 75 (EX_TEMPFAIL: `jaxtrain train` stopped by SIGTERM after saving) says so.
step() {
  local name=$1 marker=$WORK/.done/$1 status=0
  shift
  if [[ $DRY_RUN != 1 && -e $marker ]]; then
    info "skip $name (done before; delete $marker to redo)"
    return
  fi
  run "$@" || status=$?
  if ((status == 75)); then
    info "$name: interrupted (exit status 75: stopped by SIGTERM after saving a checkpoint); not done:" \
      "run the recipe again to resume it"
  fi
  if ((status != 0)); then exit "$status"; fi
  if [[ $DRY_RUN != 1 ]]; then mkdir -p "$WORK/.done" && touch "$marker"; fi
}

# fresh_step NAME DIR CMD...: a step whose command refuses to write into an existing DIR; what an
# unfinished earlier attempt left there is removed first.
fresh_step() {
  if [[ $DRY_RUN == 1 || ! -e $WORK/.done/$1 ]]; then run rm -rf "$2"; fi
  step "$1" "${@:3}"
}

# make_data PRESET [SHARDS FLAGS...]: the finetuning data ($WORK/data/RUN) and its shards ($WORK/shards/RUN)
# for every data set of the grid: the synthetic KV task (with --template for the template variant, and
# DATA_ARGS, extra `data_gen generate` flags such as "--num-dicts 20 --tokenizer DIR", when the recipe sets
# them), or for the niah variant the paper's needle-in-a-haystack baseline (`data_gen niah` with NIAH_ARGS,
# which a recipe offering it sets: the haystack, its length, the tokenizer).
make_data() {
  local preset=$1 r template extra niah
  shift
  read -ra extra <<<"${DATA_ARGS:-}"
  read -ra niah <<<"${NIAH_ARGS:-}"
  info "== data ($preset)"
  for r in "${RUNS[@]}"; do
    if [[ $r == niah-* ]]; then
      ((${#niah[@]})) || die "VARIANTS=niah needs NIAH_ARGS, the \`data_gen niah\` flags (--haystack mdqa:DIR or txt:DIR, ...)"
      step "data-$r" "$PYTHON" -m data_gen niah --seed "${r##*-seed}" "${niah[@]}" --overwrite --out "$WORK/data/$r"
    else
      template=()
      if [[ $r == template-* ]]; then template=(--template); fi
      step "data-$r" "$PYTHON" -m data_gen generate --preset "$preset" --seed "${r##*-seed}" "${template[@]}" \
        "${extra[@]}" --overwrite --out "$WORK/data/$r"
    fi
    fresh_step "shards-$r" "$WORK/shards/$r" "$PYTHON" -m data_gen shards --input "$WORK/data/$r/train.jsonl" \
      --out "$WORK/shards/$r" "$@"
  done
}

# make_tiny_base PRESET: the random base model of a TINY run (nothing when BASE_MODEL was given).
make_tiny_base() {
  if ((RANDOM_BASE)); then
    step base-tiny "$PYTHON" "$TPU_SCRIPTS_DIR/recipes/make_tiny_base.py" --preset "$1" --out "$BASE_MODEL"
  fi
}

# finetune PRESET RUN: train on data set RUN from BASE_MODEL ($CKPT_ROOT/RUN, resuming from its newest
# checkpoint), with the data set's seed (<variant>-seed<S>) as the training seed too, so that the seeds of the grid
# vary the batch order (and LoRA's initialisation) along with the data. PRESET must describe BASE_MODEL's
# architecture (train checks it against its config.json). A full finetune is then exported, in EXPORT_DTYPE
# (bfloat16 unless the recipe says otherwise), as the Hugging Face folder $WORK/hf/RUN that is evaluated; a
# LoRA run is evaluated itself (model_flags), from a local copy $WORK/runs/RUN when CKPT_ROOT is a bucket
# (python -m eval reads local folders).
finetune() {
  local preset=$1 r=$2
  info "== finetune $r"
  step "train-$r" "$PYTHON" -m jaxtrain train --model "$preset" --init-from "$BASE_MODEL" --data "$WORK/shards/$r" \
    --out "$CKPT_ROOT/$r" --epochs "$EPOCHS" --lr "$LR" --global-batch "$GLOBAL_BATCH" --grad-accum "$GRAD_ACCUM" \
    --seed "${r##*-seed}" --resume "${TRAIN_FLAGS[@]}"
  if ((LORA_RANK == 0)); then
    fresh_step "export-$r" "$WORK/hf/$r" "$PYTHON" -m jaxtrain export --checkpoint "$CKPT_ROOT/$r" --out "$WORK/hf/$r" \
      --dtype "$EXPORT_DTYPE"
  elif [[ $CKPT_ROOT == gs://* ]]; then
    fresh_step "fetch-$r" "$WORK/runs/$r" gcloud storage rsync --recursive "$CKPT_ROOT/$r" "$WORK/runs/$r"
  fi
}

# model_flags LABEL: MODEL_FLAGS, how `python -m eval` loads "base" (BASE_MODEL) or the finetuned model of
# data set LABEL. A LoRA run is read as it is: its adapters, unmerged, on BASE_MODEL (hash-checked against
# the base it trained on) in BASE_EVAL_DTYPE, the dtype the base model is evaluated in too, so that before
# and after differ by the adapters only. int8 (the default with BASE_DTYPE=int8) leaves room on a 16 GiB
# chip; a merged bf16 copy would need the host memory of two 7B models (export_merged).
model_flags() {
  if [[ $1 == base ]]; then
    MODEL_FLAGS=(--model "$BASE_MODEL")
  elif ((LORA_RANK == 0)); then
    MODEL_FLAGS=(--model "$WORK/hf/$1")
  elif [[ $CKPT_ROOT == gs://* ]]; then
    MODEL_FLAGS=(--model "$WORK/runs/$1" --base "$BASE_MODEL")
  else
    MODEL_FLAGS=(--model "$CKPT_ROOT/$1" --base "$BASE_MODEL")
  fi
  if ((LORA_RANK > 0)); then MODEL_FLAGS+=(--base-dtype "$BASE_EVAL_DTYPE"); fi
}

# export_merged: the last, optional step of a LoRA recipe (EXPORT_MERGED=1): every run merged into its base
# as a Hugging Face folder $WORK/hf/RUN in EXPORT_DTYPE, like a full finetune's export (for serving elsewhere;
# the evaluations do not need it). On the host: merging holds the base and the merged model at once, ~27 GiB
# of host memory for Mistral 7B.
export_merged() {
  local r
  if ((LORA_RANK == 0 || EXPORT_MERGED == 0)); then return; fi
  info "== merged export"
  for r in "${RUNS[@]}"; do
    fresh_step "export-$r" "$WORK/hf/$r" env JAX_PLATFORMS=cpu "$PYTHON" -m jaxtrain export \
      --checkpoint "$CKPT_ROOT/$r" --out "$WORK/hf/$r" --merged --dtype "$EXPORT_DTYPE"
  done
}

# evaluate LABEL KEY: one evaluation of model LABEL (base or a run, model_flags) into $WORK/results/LABEL/KEY;
# KEY is a task, or synthetic-<run> for the held-out synthetic samples of that data set. A task's data flags
# come from the recipe's `task_data_flags KEY` (which sets DATA_FLAGS).
evaluate() {
  local label=$1 key=$2 task=$2
  if [[ $key == synthetic-* ]]; then
    task=synthetic DATA_FLAGS=(--data-file "$WORK/data/${key#synthetic-}/eval.jsonl")
  else
    task_data_flags "$key"
  fi
  model_flags "$label"
  step "eval-$label-$key" "$PYTHON" -m eval "$task" "${MODEL_FLAGS[@]}" "${DATA_FLAGS[@]}" ${LIMIT:+--limit "$LIMIT"} \
    --label "$label" --out "$WORK/results/$label/$key" "${EVAL_FLAGS[@]}"
}

# kv_sets RUN...: the synthetic KV data sets the models of RUN... are evaluated on, each once: a KV run's own;
# for a needle run (niah-seed<S>) the grid's KV data sets of its seed, so that KV data, needle data and the
# base model answer the same held-out KV prompts.
kv_sets() {
  local r v
  for r in "$@"; do
    if [[ $r == niah-* ]]; then
      for v in template notemplate; do
        if [[ " ${RUNS[*]} " == *" $v-${r#niah-} "* ]]; then echo "$v-${r#niah-}"; fi
      done
    else
      echo "$r"
    fi
  done | awk '!seen[$0]++'
}

# eval_keys RUN...: the keys a model is evaluated on: every task of TASKS, "synthetic" on kv_sets RUN....
eval_keys() {
  local t r
  for t in $TASKS; do
    if [[ $t == synthetic ]]; then
      for r in $(kv_sets "$@"); do echo "synthetic-$r"; done
    else
      echo "$t"
    fi
  done
}

# evaluate_all: the base model on every key, then each run of the grid: finetuned (finetune MODEL RUN) and
# evaluated on its keys (eval_keys RUN); then one comparison per key (the base model first, then every run
# evaluated on it) and, with several seeds, one per KV variant of its synthetic samples over the seeds (the base
# model on each seed's data set, then the variant's runs and the needle runs on their seed's):
# $WORK/results/compare/synthetic-<variant>.
evaluate_all() {
  local model=$1 r key files v u s seeds sets
  info "== before finetuning"
  while read -r key; do evaluate base "$key"; done < <(eval_keys "${RUNS[@]}")
  for r in "${RUNS[@]}"; do
    finetune "$model" "$r"
    while read -r key; do evaluate "$r" "$key"; done < <(eval_keys "$r")
  done
  info "== compare"
  while read -r key; do
    files=("$WORK/results/base/$key/results.json")
    for r in "${RUNS[@]}"; do
      sets=" $(kv_sets "$r" | tr '\n' ' ') "
      if [[ $key != synthetic-* || $sets == *" ${key#synthetic-} "* ]]; then
        files+=("$WORK/results/$r/$key/results.json")
      fi
    done
    compare_into "$WORK/results/compare/$key" "${files[@]}"
  done < <(eval_keys "${RUNS[@]}")
  read -ra seeds <<<"$SEEDS"
  if [[ " $TASKS " == *" synthetic "* ]] && ((${#seeds[@]} > 1)); then
    for v in $VARIANTS; do
      [[ $v != niah ]] || continue
      files=()
      for s in "${seeds[@]}"; do files+=("$WORK/results/base/synthetic-$v-seed$s/results.json"); done
      for u in $v niah; do
        [[ " $VARIANTS " == *" $u "* ]] || continue
        for s in "${seeds[@]}"; do files+=("$WORK/results/$u-seed$s/synthetic-$v-seed$s/results.json"); done
      done
      compare_into "$WORK/results/compare/synthetic-$v" "${files[@]}"
    done
  fi
}

# compare_into DIR RESULTS...: one comparison table of the results.json files ($WORK/results/<run>/<key>/...),
# kept in DIR/table.txt too. Each file is labelled by its run without the seed (template-seed1 -> template), so
# the seeds of a variant form one column (mean ± standard deviation) and one line with error bars in the plots.
compare_into() {
  local dir=$1 f run labels=()
  shift
  for f in "$@"; do
    run=${f%/*/results.json}
    run=${run##*/}
    labels+=("${run%-seed*}")
  done
  if [[ $DRY_RUN == 1 ]]; then
    run "$PYTHON" -m eval compare "$@" --labels "${labels[@]}" --out "$dir"
  else
    mkdir -p "$dir" && run "$PYTHON" -m eval compare "$@" --labels "${labels[@]}" --out "$dir" | tee "$dir/table.txt"
  fi
}
