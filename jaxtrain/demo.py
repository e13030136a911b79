"""`make demo` (`python -m jaxtrain.demo`): the whole pipeline on CPU in about ten minutes.

generate (data_gen's task, multi-question training chats; copy-task sequences) → shards → pretrain a tiny
Mistral from scratch on the copy task, export it, finetune it on the retrieval chats (both with
`jaxtrain.train.train`, the code behind `python -m jaxtrain train`) → held-out retrieval accuracy at each
stage (greedy decoding with `eval.decode.Generator`, single-question prompts in the paper's format, exact
match of value / dictionary / both) → export to a Hugging Face folder → reload it with
`transformers` and check its logits match ours → a summary table.

Why multi-question training chats: the key → value lookup is an induction-style circuit (match the two
key digits, copy what follows the colon) that a from-scratch model only forms once it gets many
supervised lookups per sequence, and only after a copy-task warm-up has built the induction circuit;
without either it stays at chance within a CPU budget (docs/demo.md has the measurements). The held-out
evaluation is the paper's single-question format.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np

from data_gen.chat import encode_chat
from data_gen.tasks import TaskConfig, _DRAW, _place, dumps_record, generate_split
from jaxtrain.config import MistralConfig

# The demo model: plain Mistral architecture (exports to Hugging Face), 2 layers of width 64, 8 heads of 8.
DEMO_MODEL = MistralConfig.preset("demo")

# The demo task: the paper's simple task with 3 dictionaries of 2-3 entries, 2-digit keys and values.
DEMO_TASK = TaskConfig(num_train=6000, num_eval=200, num_dicts=3, gold_dict_size=2, dict_size_range=(2, 3),
                       key_digits=(2, 2), value_digits=(2, 2), max_tokens=1024)


def follow_up_text(cfg: TaskConfig, key: int) -> str:
    """A follow-up question: the paper's question without its first sentence (shorter chats, same answer)."""
    text = f"Report the value of key {key} and the dictionary it is in."
    if cfg.template:
        text += (f" Answer in the following template:\nThe value of key {key} is <fill-in-value> and it is in "
                 "Dictionary [<fill-in-dictionary-name>].")
    return text


def multi_question_split(cfg: TaskConfig, seed: int, split: str, n: int, questions: int):
    """Yield n chat records: a paper-format prompt and answer, then `questions - 1` follow-up turns asking
    the same question about other keys of the same dictionaries (each answer supervised)."""
    rng = random.Random(f"needles/demo-multi/seed={seed}/{split}")
    for i in range(n):
        draw = _DRAW["simple"](cfg, rng)
        position = rng.randint(1, cfg.num_dicts)
        prompt, answer = _place(cfg, draw, position)
        dicts = draw.dicts[1:]
        dicts.insert(position - 1, draw.dicts[0])
        others = [(k, v, d) for d, entries in enumerate(dicts, 1) for k, v in entries if k != draw.gold_key]
        rng.shuffle(others)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        for key, value, d in others[:questions - 1]:
            messages += [{"role": "user", "content": follow_up_text(cfg, key)},
                         {"role": "assistant", "content": f"The value of key {key} is {value} and it is in "
                                                          f"Dictionary [{d}]."}]
        yield {"messages": messages,
               "meta": {"id": f"demo-multi-seed{seed}-{split}-{i:05d}", "num_questions": len(messages) // 2}}


def copy_task_examples(seed: int, n: int, length: int):
    """Warm-up data: `<s>` + a random digit sequence + the same sequence again, loss on the repeat.

    Predicting the repeat needs a previous-token head feeding an induction head, the circuit the key →
    value lookup is built from; a model that has it learns the retrieval task in a few hundred steps,
    one that has not stays at chance (docs/demo.md). It plays the part of the pretraining that a real
    base model brings to the paper's finetune.
    """
    from data_gen.shards import TokenizedExample
    from data_gen.tokenizer import BOS_ID, encode

    digits = np.asarray([encode(str(d))[-1] for d in range(10)], np.int32)
    rng = np.random.default_rng([seed, 0xC0B1])
    for i in range(n):
        seq = digits[rng.integers(0, 10, length)]
        ids = np.concatenate([[BOS_ID], seq, seq]).astype(np.int32)
        mask = np.zeros(ids.size, bool)
        mask[length + 1:] = True
        yield TokenizedExample(f"copy-seed{seed}-{i:05d}", ids, mask)


# --------------------------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class DemoConfig:
    """Generate → shard → pretrain a tiny Mistral on a copy task → finetune it on key-value retrieval →
    evaluate → export → reload with transformers."""

    out: str = "demo_out"
    """working folder (data, shards, runs, Hugging Face model, summary.json); must not hold an earlier demo"""
    seed: int = 0
    """data and initialisation seed"""
    num_train: int = DEMO_TASK.num_train
    """training chats"""
    questions: int = 8
    """questions per training chat (the paper-format question plus follow-ups about other keys)"""
    num_eval: int = DEMO_TASK.num_eval
    """held-out single-question prompts (paper format)"""
    copy_steps: int = 150
    """pretraining steps on the copy task (0: skip pretraining, train the retrieval task from scratch)"""
    copy_batch: int = 16
    """sequences per copy-task step"""
    copy_length: int = 24
    """digits per copy sequence (the sequence is then repeated)"""
    steps: int = 600
    """finetuning steps on the retrieval task"""
    global_batch: int = 8
    """chats per finetuning step"""
    lr: float = 5e-3
    """peak learning rate of both runs (AdamW, cosine decay to 10%)"""
    warmup_ratio: float = 0.05
    """fraction of each run's steps spent warming up"""
    weight_decay: float = 0.05
    b2: float = 0.98
    """Adam's second-moment decay"""
    progress: bool = True
    """progress bars"""


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


def _train_config(cfg: DemoConfig, data: Path, out: Path, steps: int, batch: int, init_from: Path | None):
    from jaxtrain.checkpoint import CheckpointConfig
    from jaxtrain.train import OptimizerConfig, TrainConfig

    return TrainConfig(
        data=str(data), out=str(out), model="demo", init_from=str(init_from) if init_from else None,
        dtype="float32", remat="none", epochs=10**6, max_steps=steps, global_batch=batch, seed=cfg.seed,
        log_every=10, progress=cfg.progress,
        optimizer=OptimizerConfig(lr=cfg.lr, schedule="cosine", warmup_ratio=cfg.warmup_ratio, final_lr_ratio=0.1,
                                  weight_decay=cfg.weight_decay, b2=cfg.b2),
        checkpoint=CheckpointConfig(save_every=10**9, keep=1))


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
    from data_gen.shards import TokenizedExample
    from data_gen.tokenizer import encode

    messages = record["messages"]
    chat = encode_chat(messages)
    first = len(encode_chat(messages[:2]).input_ids)
    digits = np.isin(chat.input_ids, [encode(str(d))[-1] for d in range(10)])
    mask = chat.loss_mask.copy()
    mask[first:] &= digits[first:]
    return TokenizedExample(record["meta"]["id"], chat.input_ids, mask)


def write_demo_shards(train_file: Path, shard_dir: Path, progress: bool) -> dict:
    """One length bucket just above the longest chat (every batch compiles to the same shape)."""
    from data_gen.shards import write_shards

    with open(train_file, encoding="utf-8") as f:
        examples = [encode_multi_question(json.loads(line)) for line in f]
    bucket = -(-max(len(ex.input_ids) for ex in examples) // 64) * 64
    return write_shards(examples, shard_dir, buckets=(bucket,), progress=progress)


def retrieval_accuracy(config: MistralConfig, params, eval_file: Path, progress: bool) -> dict:
    """Greedy answers to the held-out prompts, scored like `python -m eval synthetic`."""
    from data_gen.tokenizer import encode
    from eval.decode import Generator
    from eval.synthetic import parse_answer, read_synthetic
    from eval.tokens import encode_generation_prompt

    examples = read_synthetic(eval_file)
    prompts = [encode_generation_prompt(ex.prompt, chat=True) for ex in examples]
    max_new = max(len(encode(ex.reference)) for ex in examples) + 4
    generations = Generator(config.replace(dtype="float32", remat="none"), params, batch_size=50).generate(
        prompts, max_new_tokens=max_new, progress=progress)
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

    from eval.synthetic import read_synthetic
    from eval.tokens import encode_generation_prompt
    from jaxtrain import model
    from jaxtrain.hf_io import load_pretrained

    ids = encode_generation_prompt(read_synthetic(eval_file)[0].prompt, chat=True)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    config, params = load_pretrained(hf_dir, dtype="float32", config_overrides=dict(dtype="float32", remat="none"))
    ours = np.asarray(model.forward(config, params, jnp.asarray([ids], jnp.int32))[0])
    diff = float(np.abs(ours - theirs).max())
    return {"max_abs_logit_diff": diff, "same_argmax": bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
            "ok": diff < 1e-3, "architecture": type(hf).__name__, "tokens": len(ids)}


def run(cfg: DemoConfig) -> dict:
    import jax

    from data_gen.shards import write_shards
    from jaxtrain import model
    from jaxtrain.__main__ import ExportConfig, export
    from jaxtrain.checkpoint import load_params_from_run
    from jaxtrain.train import train

    out = Path(cfg.out)
    task = DEMO_TASK.replace(num_train=cfg.num_train, num_eval=cfg.num_eval)
    stage = _Stages(7 if cfg.copy_steps else 6)
    start = time.perf_counter()
    acc: dict[str, dict] = {}

    stage("generate", f"generate: {cfg.num_train} training chats of {cfg.questions} questions, {cfg.num_eval} "
                      f"held-out single-question prompts ({task.num_dicts} dictionaries of {task.dict_size_range[0]}-"
                      f"{task.dict_size_range[1]} entries, 2-digit keys and values)")
    train_file, eval_file = write_data(cfg, task, out / "data")

    stage("shards", "shards")
    manifest = write_demo_shards(train_file, out / "shards", cfg.progress)
    print(f"{manifest['num_examples']} retrieval chats in bucket {manifest['buckets'][0]['max_len']}")
    if cfg.copy_steps:
        n = cfg.copy_steps * cfg.copy_batch
        write_shards(copy_task_examples(cfg.seed, n, cfg.copy_length), out / "copy_shards",
                     buckets=(2 * cfg.copy_length + 1,), progress=cfg.progress)
        print(f"{n} copy-task sequences of {cfg.copy_length} digits")

    stage("eval_init", "held-out accuracy of the random initialisation")
    acc["random init"] = retrieval_accuracy(DEMO_MODEL, model.init_params(DEMO_MODEL, jax.random.key(cfg.seed)),
                                            eval_file, cfg.progress)
    base = None
    if cfg.copy_steps:
        stage("pretrain", f"pretrain from scratch on the copy task: {DEMO_MODEL.num_params / 1e6:.1f}M parameters, "
                          f"{cfg.copy_steps} steps of {cfg.copy_batch} sequences")
        train(_train_config(cfg, out / "copy_shards", out / "pretrain_run", cfg.copy_steps, cfg.copy_batch, None))
        base = out / "pretrained_hf"
        export(ExportConfig(checkpoint=str(out / "pretrain_run"), out=str(base), dtype="float32"))
        config, params = load_params_from_run(out / "pretrain_run")
        acc["after pretraining"] = retrieval_accuracy(config, params, eval_file, cfg.progress)

    stage("finetune", f"{'finetune' if base else 'train from scratch'} on key-value retrieval: {cfg.steps} steps "
                      f"of {cfg.global_batch} chats, lr {cfg.lr}")
    last = train(_train_config(cfg, out / "shards", out / "run", cfg.steps, cfg.global_batch, base))

    stage("eval_after", "held-out accuracy after training")
    config, params = load_params_from_run(out / "run")
    acc["after finetuning"] = retrieval_accuracy(config, params, eval_file, cfg.progress)

    stage("export_reload", "export to Hugging Face and reload with transformers")
    hf_dir = out / "hf"
    export(ExportConfig(checkpoint=str(out / "run"), out=str(hf_dir)))
    reload = check_hf_reload(hf_dir, eval_file)
    stage.done()
    stage.times["total"] = round(time.perf_counter() - start, 1)

    summary = {"config": dataclasses.asdict(cfg), "task": task.to_dict(), "model": json.loads(DEMO_MODEL.to_json()),
               "accuracy": acc, "final_train_metrics": last, "hf_reload": reload, "seconds": stage.times}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print_summary(summary, out)
    if not reload["ok"]:
        raise SystemExit(f"the exported model's logits differ from ours by {reload['max_abs_logit_diff']:.2e}")
    return summary


def print_summary(s: dict, out: Path) -> None:
    acc = s["accuracy"]
    last = acc["after finetuning"]
    print(f"\nheld-out retrieval accuracy ({last['n']} single-question prompts, paper format, greedy decoding)")
    print(f"  {'exact match of':<20}" + "".join(f"{name:>20}" for name in acc))
    for metric in ("value", "dictionary", "both"):
        print(f"  {metric:<20}" + "".join(f"{a[metric]:>20.1%}" for a in acc.values()))
    print(f"  example: ...{last['example']['prompt_tail']!r}\n    -> {last['example']['output']!r}"
          f"\n    (reference {last['example']['reference']!r})")
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
