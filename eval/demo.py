"""`make demo` (`python -m eval.demo`): the whole pipeline on CPU in about ten minutes.

generate (data_gen's task as multi-question training chats) → shards → pretrain a small Mistral from scratch
on dictionary recall with a widening key-value separator, then finetune it on the paper's key-value
retrieval chats (both with `jaxtrain.train.train`, the code behind `python -m jaxtrain train`) → held-out
retrieval accuracy at each stage (greedy decoding with `jaxtrain.generate.Generator`, single-question prompts in
the paper's format, exact match of value / dictionary / both) → LoRA on a harder variant of the task, on a
float32 and on an int8 base → export to a Hugging Face folder → reload it with `transformers`.

Why the warm-up (`data_gen.warmup`): the key → value lookup is an induction-style circuit. A two-layer
model forms it in a couple of hundred steps when the value follows its key directly, but not within hours
of this CPU when ": " separates them, as in the paper's dictionaries; moving the separator one token per
stage ("47" → "4:7" → "4: 7") gets there in minutes. docs/demo.md has the measurements. `--base HF_DIR`
finetunes an existing model instead, the paper's own setting.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from data_gen.chat import encode_chat, encode_prompt
from data_gen.shards import TokenizedExample, write_shards
from data_gen.tasks import TaskConfig, dumps_record, generate_split, multi_question_split
from data_gen.tokenizer import encode
from data_gen.warmup import SEPARATORS, dictionary_recall
from eval.synthetic import parse_answer, read_synthetic
from jaxtrain import model, runs
from jaxtrain.__main__ import ExportConfig, export
from jaxtrain.checkpoint import CheckpointConfig, load_params_from_run
from jaxtrain.config import ModelConfig
from jaxtrain.generate import Generator
from jaxtrain.hf_io import load_pretrained, load_quantized
from jaxtrain.lora import LoraSettings
from jaxtrain.train import OptimizerConfig, TrainConfig, train

# The demo model: plain Mistral architecture (exports to Hugging Face), 2 layers of width 128, 4 heads of 32.
DEMO_MODEL = ModelConfig.preset("demo")

# The demo task: the paper's simple task with 3 dictionaries of 2-3 entries, 1-digit keys and values.
DEMO_TASK = TaskConfig(num_train=6000, num_eval=200, num_dicts=3, gold_dict_size=2, dict_size_range=(2, 3),
                       key_digits=(1, 1), value_digits=(1, 1), max_tokens=1024)


# --------------------------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class DemoConfig:
    """Generate → shard → finetune a tiny Mistral on key-value retrieval → evaluate → LoRA on a harder
    variant (float32 and int8 base) → export → reload with transformers."""

    out: str = "demo_out"
    """working folder (data, shards, runs, Hugging Face model, summary.json); must not hold an earlier demo"""
    base: str = "scratch"
    """the model to finetune: "scratch" (a fresh model, pretrained on dictionary recall first) or a Hugging Face
    folder, e.g. one exported from a longer run of this demo (`python -m jaxtrain export --checkpoint
    demo_out/run --out BASE --dtype float32`)"""
    seed: int = 0
    """data and initialisation seed"""
    num_train: int = DEMO_TASK.num_train
    """training chats"""
    questions: int = 8
    """questions per training chat (the paper-format question plus follow-ups about other keys)"""
    num_eval: int = DEMO_TASK.num_eval
    """held-out single-question prompts (paper format)"""
    warmup_steps: tuple[int, int, int] = (250, 250, 100)
    """--base scratch: pretraining steps of each warm-up stage (separators "", ":", ": " between key and value;
    the first two forms take ~200 steps each, the last follows at once)"""
    warmup_batch: int = 32
    """sequences per warm-up step"""
    steps: int = 400
    """finetuning steps on the retrieval task"""
    global_batch: int = 8
    """chats per finetuning step"""
    lr: float = 1e-3
    """learning rate of the pretraining and the finetune (AdamW, constant after the warm-up)"""
    warmup_ratio: float = 0.1
    """fraction of each run's steps over which the learning rate rises linearly to `lr`"""
    weight_decay: float = 0.05
    b2: float = 0.98
    """Adam's second-moment decay"""
    lora_steps: int = 60
    """LoRA stage: steps on the harder variant (2-digit values), once on a float32 and once on an int8 base
    (0: skip)"""
    lora_rank: int = 8
    lora_lr: float = 3e-3
    progress: bool = True
    """progress bars"""

    def __post_init__(self):
        if self.base != "scratch" and not (Path(self.base) / "config.json").is_file():
            raise ValueError(f"--base {self.base!r}: neither 'scratch' nor a Hugging Face folder (no config.json there)")
        if self.base == "scratch" and (len(self.warmup_steps) != len(SEPARATORS) or min(self.warmup_steps) < 1):
            raise ValueError(f"--warmup-steps needs {len(SEPARATORS)} counts >= 1 with --base scratch (one per "
                             f"stage; got {self.warmup_steps}): without the warm-up the lookup does not form "
                             "(docs/demo.md)")


class _Stages:
    def __init__(self, total: int):
        self.total, self.n, self.times = total, 0, {}
        self._name, self._t = None, 0.0

    def __call__(self, name: str, text: str) -> None:
        self.done()
        self.n += 1
        self._name, self._t = name, time.perf_counter()
        print(f"\n[{self.n}/{self.total}] {text}", flush=True)

    def done(self) -> None:
        if self._name:
            self.times[self._name] = round(time.perf_counter() - self._t, 1)
            self._name = None


def _train_config(cfg: DemoConfig, data: Path, out: Path, steps: int, batch: int, init_from: Path | None, *,
                  lr: float | None = None, adapters: LoraSettings | None = None):
    return TrainConfig(
        data=str(data), out=str(out), model="demo", init_from=str(init_from) if init_from else None,
        dtype="float32", remat="none", epochs=10**6, max_steps=steps, global_batch=batch, seed=cfg.seed,
        log_every=10, progress=cfg.progress,
        optimizer=OptimizerConfig(lr=lr or cfg.lr, schedule="constant", warmup_ratio=cfg.warmup_ratio,
                                  weight_decay=cfg.weight_decay, b2=cfg.b2),
        checkpoint=CheckpointConfig(save_every=10**9, keep=1), adapters=adapters or LoraSettings())


def write_data(cfg: DemoConfig, task: TaskConfig, data_dir: Path) -> tuple[Path, Path]:
    """train.jsonl (multi-question chats) and eval.jsonl (data_gen's single-question samples)."""
    from tqdm.auto import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    with open(train_file, "w", encoding="utf-8", newline="\n") as f:
        records = multi_question_split(task, cfg.seed, "train", cfg.num_train, cfg.questions)
        for record in tqdm(records, total=cfg.num_train, desc="train chats", disable=not cfg.progress):
            f.write(dumps_record(record) + "\n")
    with open(eval_file, "w", encoding="utf-8", newline="\n") as f:
        for record in generate_split(task, cfg.seed, "eval", cfg.num_eval, progress=cfg.progress):
            f.write(dumps_record(record) + "\n")
    return train_file, eval_file


def encode_multi_question(record: dict):
    """Token ids of a training chat; the loss covers the first (paper-format) answer whole and only the
    digits (key, value, dictionary) of the follow-up answers: their fixed words are learnt from the first
    answer, and every supervised token costs a 32000-wide output projection on this CPU."""
    messages = record["messages"]
    chat = encode_chat(messages)
    first = len(encode_chat(messages[:2]).input_ids)
    digits = np.isin(chat.input_ids, [encode(str(d))[-1] for d in range(10)])
    mask = chat.loss_mask.copy()
    mask[first:] &= digits[first:]
    return TokenizedExample(record["meta"]["id"], chat.input_ids, mask)


def write_demo_shards(train_file: Path, shard_dir: Path, progress: bool) -> dict:
    """One length bucket just above the longest chat (every batch compiles to the same shape)."""
    with open(train_file, encoding="utf-8") as f:
        examples = [encode_multi_question(json.loads(line)) for line in f]
    bucket = -(-max(len(ex.input_ids) for ex in examples) // 64) * 64
    return write_shards(examples, shard_dir, buckets=(bucket,), progress=progress)


def retrieval_accuracy(config: ModelConfig, params, eval_file: Path, progress: bool, adapters=None) -> dict:
    """Greedy answers to the held-out prompts, scored like `python -m eval synthetic`."""
    examples = read_synthetic(eval_file)
    prompts = [encode_prompt(ex.prompt) for ex in examples]
    max_new = max(len(encode(ex.reference)) for ex in examples) + 4
    generator = Generator(config.replace(dtype="float32", remat="none"), params, batch_size=50, adapters=adapters)
    generations = generator.generate(prompts, max_new_tokens=max_new, progress=progress)
    value = dictionary = both = 0
    for ex, gen in zip(examples, generations, strict=True):
        v, d = parse_answer(gen.text, ex.gold_key)
        value += v == ex.gold_value
        dictionary += d == ex.gold_dict
        both += v == ex.gold_value and d == ex.gold_dict
    n = len(examples)
    return {"value": value / n, "dictionary": dictionary / n, "both": both / n, "n": n,
            "example": {"prompt_tail": examples[0].prompt[-60:], "reference": examples[0].reference,
                        "output": generations[0].text}}


def check_hf_reload(hf_dir: Path, eval_file: Path) -> dict:
    """Load the export with transformers and compare its logits with ours on one held-out prompt."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    ids = encode_prompt(read_synthetic(eval_file)[0].prompt)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    config, params = load_pretrained(hf_dir, dtype="float32", config_overrides=dict(dtype="float32", remat="none"))
    ours = np.asarray(model.forward(config, params, jnp.asarray([ids], jnp.int32))[0])
    diff = float(np.abs(ours - theirs).max())
    return {"max_abs_logit_diff": diff, "same_argmax": bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
            "ok": diff < 1e-3, "architecture": type(hf).__name__, "tokens": len(ids)}


def write_task(cfg: DemoConfig, task: TaskConfig, out: Path) -> tuple[Path, Path]:
    """Training chats and held-out prompts of `task` under `out`, the chats as shards: (shards, eval.jsonl)."""
    train_file, eval_file = write_data(cfg, task, out / "data")
    manifest = write_demo_shards(train_file, out / "shards", cfg.progress)
    print(f"{manifest['num_examples']} training chats in bucket {manifest['buckets'][0]['max_len']}, "
          f"{task.num_eval} held-out prompts")
    return out / "shards", eval_file


def pretrain_from_scratch(cfg: DemoConfig, task: TaskConfig, out: Path) -> Path:
    """`--base scratch`: a fresh model trained on dictionary recall, one stage per key-value separator, each
    stage starting from the last one's export; the last export (float32 Hugging Face folder) is returned."""
    base = None
    for stage, (separator, steps) in enumerate(zip(SEPARATORS, cfg.warmup_steps, strict=True)):
        n = steps * cfg.warmup_batch
        examples = list(dictionary_recall(cfg.seed, n, separator, max_dicts=task.num_dicts,
                                          dict_sizes=task.dict_size_range, key_digits=task.key_digits[1],
                                          value_digits=task.value_digits[1]))
        shards = out / f"warmup{stage}_shards"
        bucket = -(-max(len(ex.input_ids) for ex in examples) // 16) * 16
        write_shards(examples, shards, buckets=(bucket,), progress=cfg.progress)
        print(f"warm-up stage {stage + 1}/{len(SEPARATORS)}: {n} recall sequences, key{separator!r}value")
        run = out / f"warmup{stage}_run"
        train(_train_config(cfg, shards, run, steps, cfg.warmup_batch, base))
        base = out / f"warmup{stage}_hf"
        export(ExportConfig(checkpoint=str(run), out=str(base), dtype="float32"))
    return base


def int8_agreement(hf_dir: Path, eval_file: Path) -> dict:
    """How often the int8 model's greedy next token equals the float32 model's, teacher-forced over every
    position of the held-out prompts and their reference answers (issue: >= 99%)."""
    import jax.numpy as jnp

    overrides = dict(dtype="float32", remat="none")
    models = [load_pretrained(hf_dir, dtype="float32", config_overrides=overrides),
              load_quantized(hf_dir, dtype="float32", config_overrides=overrides)]
    rows = [encode_chat([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.reference}]
                        ).input_ids for ex in read_synthetic(eval_file)]
    width = -(-max(map(len, rows)) // 64) * 64            # one padded shape: one compilation per model
    ids = np.zeros((len(rows), width), np.int32)
    segments = np.zeros((len(rows), width), np.int32)     # right padding: segment 0, ignored below
    for i, row in enumerate(rows):
        ids[i, :len(row)], segments[i, :len(row)] = row, 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    greedy = [np.asarray(model.forward(c, p, jnp.asarray(ids), positions=jnp.asarray(positions),
                                       segment_ids=jnp.asarray(segments)).argmax(-1)) for c, p in models]
    real = segments == 1
    return {"agreement": float((greedy[0] == greedy[1])[real].mean()), "positions": int(real.sum())}


def lora_stage(cfg: DemoConfig, finetuned_hf: Path, out: Path) -> dict:
    """LoRA on a harder variant of the task (2-digit values: the finetuned model answers with one digit),
    once on the float32 finetuned model and once on its int8 quantisation: held-out accuracy before and
    after each."""
    task = DEMO_TASK.replace(value_digits=(2, 2), num_train=cfg.num_train, num_eval=cfg.num_eval)
    shards, eval_file = write_task(cfg, task, out)
    overrides = dict(dtype="float32", remat="none")
    acc = {"finetuned": retrieval_accuracy(*load_pretrained(finetuned_hf, dtype="float32",
                                                            config_overrides=overrides), eval_file, cfg.progress),
           "finetuned, int8": retrieval_accuracy(*load_quantized(finetuned_hf, dtype="float32",
                                                                      config_overrides=overrides),
                                                 eval_file, cfg.progress)}
    for base_dtype, name in (("float32", "+ LoRA"), ("int8", "+ LoRA, int8 base")):
        run_dir = out / f"run_{base_dtype}"
        print(f"LoRA rank {cfg.lora_rank} on the {base_dtype} base: {cfg.lora_steps} steps")
        train(_train_config(cfg, shards, run_dir, cfg.lora_steps, cfg.global_batch, finetuned_hf, lr=cfg.lora_lr,
                            adapters=LoraSettings(lora_rank=cfg.lora_rank, base_dtype=base_dtype)))
        run = runs.load_run(run_dir)
        config, params, adapters = run.config, run.params, run.adapters
        acc[name] = retrieval_accuracy(config, params, eval_file, cfg.progress, adapters=adapters)
    return {"task": task.to_dict(), "accuracy": acc, "int8_vs_float32": int8_agreement(finetuned_hf, eval_file)}


def run(cfg: DemoConfig) -> dict:
    import jax


    out = Path(cfg.out)
    task = DEMO_TASK.replace(num_train=cfg.num_train, num_eval=cfg.num_eval)
    stage = _Stages(6 + (cfg.base == "scratch") + bool(cfg.lora_steps))
    start = time.perf_counter()
    acc: dict[str, dict] = {}

    stage("generate", f"generate and shard: {cfg.num_train} training chats of {cfg.questions} questions, "
                      f"{cfg.num_eval} held-out single-question prompts ({task.num_dicts} dictionaries of "
                      f"{task.dict_size_range[0]}-{task.dict_size_range[1]} entries, {task.key_digits[1]}-digit keys, "
                      f"{task.value_digits[1]}-digit values)")
    shards, eval_file = write_task(cfg, task, out)

    stage("eval_init", "held-out accuracy of a random initialisation")
    acc["random init"] = retrieval_accuracy(DEMO_MODEL, model.init_params(DEMO_MODEL, jax.random.key(cfg.seed)),
                                            eval_file, cfg.progress)
    if cfg.base == "scratch":
        stage("pretrain", f"pretrain from scratch on dictionary recall: {DEMO_MODEL.num_params / 1e6:.1f}M parameters, "
                          f"{len(SEPARATORS)} stages of {'/'.join(map(str, cfg.warmup_steps))} steps of {cfg.warmup_batch} "
                          "sequences")
        base = pretrain_from_scratch(cfg, task, out)
    else:
        base = Path(cfg.base)
    stage("eval_base", f"held-out accuracy of the base model ({base})")
    acc["base model"] = retrieval_accuracy(*load_pretrained(base, dtype="float32", config_overrides=dict(
        dtype="float32", remat="none")), eval_file, cfg.progress)

    stage("finetune", f"finetune on key-value retrieval: {cfg.steps} steps of {cfg.global_batch} chats, lr {cfg.lr}")
    last = train(_train_config(cfg, shards, out / "run", cfg.steps, cfg.global_batch, base))

    stage("eval_after", "held-out accuracy after finetuning")
    config, params = load_params_from_run(out / "run")
    acc["after finetuning"] = retrieval_accuracy(config, params, eval_file, cfg.progress)
    finetuned_hf = out / "finetuned_hf"
    export(ExportConfig(checkpoint=str(out / "run"), out=str(finetuned_hf), dtype="float32"))

    lora = None
    if cfg.lora_steps:
        stage("lora", "LoRA on a harder variant (2-digit values), float32 and int8 base")
        lora = lora_stage(cfg, finetuned_hf, out / "lora")

    stage("export_reload", "export to Hugging Face (bf16) and reload with transformers")
    hf_dir = out / "hf"
    export(ExportConfig(checkpoint=str(out / "run"), out=str(hf_dir)))
    reload = check_hf_reload(hf_dir, eval_file)
    stage.done()
    stage.times["total"] = round(time.perf_counter() - start, 1)

    summary = {"config": dataclasses.asdict(cfg), "task": task.to_dict(), "model": json.loads(config.to_json()),
               "base": str(base), "accuracy": acc, "lora": lora, "final_train_metrics": last, "hf_reload": reload,
               "seconds": stage.times}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(summary, out)
    if not reload["ok"]:
        raise SystemExit(f"the exported model's logits differ from ours by {reload['max_abs_logit_diff']:.2e}")
    return summary


def _accuracy_table(title: str, acc: dict) -> None:
    n = next(iter(acc.values()))["n"]
    print(f"\n{title} ({n} single-question prompts, paper format, greedy decoding)")
    print(f"  {'exact match of':<16}" + "".join(f"{name:>20}" for name in acc))
    for metric in ("value", "dictionary", "both"):
        print(f"  {metric:<16}" + "".join(f"{a[metric]:>20.1%}" for a in acc.values()))


def print_summary(s: dict, out: Path) -> None:
    acc = s["accuracy"]
    last = acc["after finetuning"]
    _accuracy_table("held-out retrieval accuracy", acc)
    print(f"  example: ...{last['example']['prompt_tail']!r}\n    -> {last['example']['output']!r}"
          f"\n    (reference {last['example']['reference']!r})")
    if s["lora"]:
        _accuracy_table(f"harder variant, {s['lora']['task']['value_digits'][1]}-digit values", s["lora"]["accuracy"])
        q = s["lora"]["int8_vs_float32"]
        print(f"  int8 vs float32 finetuned model: same greedy next token at {q['agreement']:.2%} of "
              f"{q['positions']} held-out positions")
    r = s["hf_reload"]
    print(f"transformers reload: {r['architecture']}, max |logit difference| {r['max_abs_logit_diff']:.1e} over "
          f"{r['tokens']} tokens, same argmax: {r['same_argmax']}")
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()))
    print(f"files: {out}/hf (Hugging Face model), {out}/run (checkpoint, metrics.jsonl), {out}/summary.json")


def main(argv: list[str] | None = None) -> None:
    import tyro

    run(tyro.cli(DemoConfig, args=argv))


if __name__ == "__main__":
    main()
