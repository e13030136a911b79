"""`python -m eval` against lm-evaluation-harness 0.4.13 on the same rows, example by example.

    python -m bench.lmeval_compare --model HF_DIR [--limit 50] [--max-gen-toks 256] [--chat-template] [--out DIR]

The reference is the harness itself: its own task configs, included from the installed package by absolute
path (so its prompts, few-shot samplers, filters and metrics are the ones that run), pointed at the shared
data files (`../shared/data`) and run offline through `lm_eval.simple_evaluate` with its `hf` backend (or any
other, e.g. `needles`). Only the data source changes (`datasets`' json builder over local files); where a
shared file is not in the harness's input format it is converted here, plainly and without our readers:
HellaSwag's 6-lines-an-example text (ctx_a / ctx_b split at the last sentence end, so the harness does its
own `ctx_b.capitalize()`), MMLU's CSV slices (a `choices` list, as `cais/mmlu`), TriviaQA's llm-foundry rows
(the question from `context`, `answer.aliases` as `mandarjoshi/trivia_qa`).

`--chat-template` runs the harness with `--apply_chat_template` (and `--fewshot_as_multiturn`, its default then)
and ours with `--chat-template`. For each task it reports, over the rows both scored: identical prompt text
(sha256) and token ids (the harness's tokenizer, i.e. `transformers.AutoTokenizer` of the model folder, as its
`hf` backend applies it, against ours), identical raw
generations, the share of rows with the same choice / extracted answer, both metrics, and the largest
log-likelihood gap; plus each side's wall time (the harness's includes loading its model). The default
suite runs it on a tiny model (tests/test_eval_lmeval.py); docs/eval.md has the table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # before `datasets` is imported: local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SUBJECTS = ("abstract_algebra", "medical_genetics")
TASKS = ("hellaswag", "mmlu", "mmlu_5shot", "gsm8k", "triviaqa", "nq_open")


# --- the harness's side ---------------------------------------------------------------------------------
def harness_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_lines(path: Path) -> list[str]:
    import gzip

    with gzip.open(path, "rt") as f:
        return f.read().splitlines()


def _hellaswag_rows(path: Path):
    lines = path.read_text().split("\n")
    for start in range(0, len(lines) - 5, 6):
        ctx_line, label, *endings = lines[start:start + 6]
        activity, ctx = ctx_line.split(": ", 1)
        end = list(re.finditer(r"[.!?] ", ctx))[-1]
        yield {"activity_label": activity, "ctx_a": ctx[:end.start() + 1], "ctx_b": ctx[end.end():],
               "endings": endings, "label": label}


def _mmlu_rows(path: Path, subject: str):
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            yield {"question": r["question"], "subject": subject,
                   "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}


def _triviaqa_rows(path: Path):
    for line in path.read_text().splitlines():
        obj = json.loads(line)
        question = obj["context"].removeprefix("Question: ").removesuffix("\nAnswer:")
        yield {"question": question, "answer": {"aliases": obj["aliases"], "value": obj["answer"]}}


def write_tasks(shared_data: Path, out: Path, *, subjects=SUBJECTS) -> dict[str, list[str]]:
    """Task YAMLs (and converted data) under `out`; returns the harness task names of each of `TASKS`:
    needles_<task>, and per MMLU subject needles_mmlu_<subject> (0-shot, as `mmlu`) and
    needles_mmlu5_<subject> (`num_fewshot: 5`, as `--num_fewshot 5`). Also `wikitext`: the harness's
    `loglikelihood_rolling` task over 8 pages of MDQA passages (for model backends; eval has no such task)."""
    out.mkdir(parents=True, exist_ok=True)
    harness = harness_tasks_dir()
    cache = str(out / "hf_datasets_cache")

    def task(name: str, include: Path, data_files: dict, **fields) -> str:
        config = {"include": str(include), "task": name, "dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {k: str(v) for k, v in data_files.items()}, "cache_dir": cache},
                  **fields}
        import yaml

        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return name

    hellaswag = _write_jsonl(out / "hellaswag.jsonl", _hellaswag_rows(shared_data / "hellaswag" / "hellaswag_val.txt"))
    triviaqa = _write_jsonl(out / "triviaqa.jsonl", _triviaqa_rows(shared_data / "triviaqa" / "triviaqa_sm_sub.jsonl"))
    names = {
        "hellaswag": [task("needles_hellaswag", harness / "hellaswag" / "hellaswag.yaml", {"validation": hellaswag},
                           training_split=None)],
        "gsm8k": [task("needles_gsm8k", harness / "gsm8k" / "gsm8k.yaml",
                       {"train": shared_data / "gsm8k" / "gsm8k_train_fewshot.jsonl",
                        "test": shared_data / "gsm8k" / "gsm8k_test.jsonl"})],
        "triviaqa": [task("needles_triviaqa", harness / "triviaqa" / "default.yaml", {"validation": triviaqa},
                          training_split=None)],
        "nq_open": [task("needles_nq_open", harness / "nq_open" / "nq_open.yaml",
                         {"validation": shared_data / "nq_open" / "nq_open_dev.jsonl"}, training_split=None)],
        "mmlu": [], "mmlu_5shot": [],
    }
    pages = [{"page": "\n\n".join(f"{c['title']}\n{c['text']}" for c in json.loads(line)["ctxs"][:4])}
             for line in _read_lines(shared_data / "mdqa" / "nq-open-20_total_documents_gold_at_0.jsonl.gz")[:8]]
    names["wikitext"] = [task("needles_wikitext", harness / "wikitext" / "wikitext.yaml",
                              {"test": _write_jsonl(out / "pages.jsonl", pages)}, training_split=None,
                              validation_split=None)]
    for subject in subjects:
        files = {split: _write_jsonl(out / f"mmlu_{subject}_{split}.jsonl",
                                     _mmlu_rows(shared_data / "mmlu" / split / f"{subject}_{split}.csv", subject))
                 for split in ("test", "dev")}
        include = harness / "mmlu" / "default" / f"mmlu_{subject}.yaml"
        names["mmlu"].append(task(f"needles_mmlu_{subject}", include, files))
        names["mmlu_5shot"].append(task(f"needles_mmlu5_{subject}", include, files, num_fewshot=5))
    return names


def run_harness(model: str, model_args: dict, tasks_dir: Path, tasks: list[str], *, limit: int | None,
                batch_size: int = 8, gen_kwargs: dict | None = None, chat: bool = False) -> dict:
    """`lm_eval.simple_evaluate` offline over the YAMLs of `write_tasks`, samples logged: `results[task]`
    holds the metrics and `samples[task]` each document's arguments, raw and filtered responses. `chat`:
    `apply_chat_template` with `fewshot_as_multiturn` (the command line's default with a chat template). Only the
    few-shot sampler is seeded (the harness's default 1234); the global `random`, numpy and torch generators,
    which the harness would reseed, are left alone so that running it in-process changes nothing else."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                   limit=limit, batch_size=batch_size, log_samples=True, bootstrap_iters=0,
                                   gen_kwargs=gen_kwargs, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                   random_seed=None, numpy_random_seed=None, torch_random_seed=None)


# --- our side -------------------------------------------------------------------------------------------
def our_argv(task: str, shared_data: Path, *, max_gen_toks: int | None, subjects=SUBJECTS) -> list[str]:
    """`python -m eval` arguments of each of `TASKS` over the same files."""
    gen = [] if max_gen_toks is None else ["--max-new-tokens", str(max_gen_toks)]
    mmlu = ["mmlu", "--data-dir", str(shared_data / "mmlu"), "--subjects", *subjects]
    return {"hellaswag": ["hellaswag", "--data-file", str(shared_data / "hellaswag" / "hellaswag_val.txt")],
            "mmlu": mmlu, "mmlu_5shot": [*mmlu, "--num-fewshot", "5"],
            "gsm8k": ["gsm8k", "--data-dir", str(shared_data / "gsm8k"), *gen],
            "triviaqa": ["triviaqa", "--data-file", str(shared_data / "triviaqa" / "triviaqa_sm_sub.jsonl"), *gen],
            "nq_open": ["nq_open", "--data-file", str(shared_data / "nq_open" / "nq_open_dev.jsonl"), *gen]}[task]


def run_ours(task: str, model: Path, shared_data: Path, out: Path, *, limit: int | None,
             max_gen_toks: int | None, flags=(), subjects=SUBJECTS) -> tuple[dict, list[dict]]:
    """`python -m eval <task>` in-process (float32 compute); its results and predictions."""
    from eval.__main__ import main

    argv = our_argv(task, shared_data, max_gen_toks=max_gen_toks, subjects=subjects)
    results = main([argv[0], "--model", str(model), "--out", str(out), "--compute-dtype", "float32",
                    "--no-progress", *(["--limit", str(limit)] if limit else []), *argv[1:], *flags])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return results, predictions


# --- comparison -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Comparison:
    task: str
    rows: int
    same_prompt: int
    """rows whose prompt text is the harness's (sha256)"""
    same_ids: int
    """rows whose prompt token ids are the harness's tokenizer's"""
    same_output: int | None
    """rows whose raw generation is the harness's (generative tasks)"""
    agree: int
    """rows with the same choice (and per-example metrics) or the same extracted answer"""
    metrics: dict[str, tuple[float, float]]
    """metric -> (ours, harness)"""
    max_ll_gap: float | None

    @property
    def agreement(self) -> float:
        return self.agree / self.rows

    @property
    def max_metric_gap(self) -> float:
        return max(abs(a - b) for a, b in self.metrics.values())


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _by_doc(samples: list[dict], filter_name: str | None = None) -> dict[int, dict]:
    return {s["doc_id"]: s for s in samples if filter_name is None or s["filter"] == filter_name}


def _harness_metric(results: dict, tasks: list[str], key: str) -> float:
    """One metric over `tasks`, weighted by their sizes (the harness's group aggregation for MMLU)."""
    sizes = [results["results"][t]["sample_len"] for t in tasks]
    return sum(float(results["results"][t][key]) * n for t, n in zip(tasks, sizes)) / sum(sizes)


def compare(task: str, harness: dict, tasks: list[str], ours: tuple[dict, list[dict]],
            harness_ids: Callable[[str], list[int]], our_ids: Callable[[str], list[int]]) -> Comparison:
    """Row by row: the harness's logged samples of `tasks` against our predictions of the same rows."""
    results, predictions = ours
    contexts, same_prompt, same_output, agree, ll_gap = [], 0, 0, 0, 0.0
    if task in ("hellaswag", "mmlu", "mmlu_5shot"):
        if task == "hellaswag":
            pairs = [(_by_doc(harness["samples"][tasks[0]])[p["index"]], p) for p in predictions]
        else:   # one harness task per subject; doc_id is the row in the subject's test file
            subject_task = {t.split("_", 2)[2]: t for t in tasks}   # needles_mmlu[5]_<subject>
            pairs = [(_by_doc(harness["samples"][subject_task[p["subject"]]])[p["row"]], p) for p in predictions]
        for sample, p in pairs:
            context = sample["arguments"][0][0]
            contexts.append(context)
            same_prompt += _sha(context) == p["prompt_sha256"]
            lls = [r[0] for r in sample["filtered_resps"]]
            ll_gap = max(ll_gap, *(abs(a - b) for a, b in zip(lls, p["loglikelihoods"], strict=True)))
            choice = max(range(len(lls)), key=lambda j: lls[j])
            ours_choice = p["prediction"] if task == "hellaswag" else "ABCD".index(p["prediction"])
            names = ("acc", "acc_norm") if task == "hellaswag" else ("acc",)
            agree += choice == ours_choice and all(float(sample[m]) == p[m] for m in names)
        if task == "hellaswag":
            metrics = {m: (results["metrics"][m], _harness_metric(harness, tasks, f"{m},none"))
                       for m in ("acc", "acc_norm")}
        else:
            metrics = {"acc": (results["metrics"]["acc"], _harness_metric(harness, tasks, "acc,none"))}
    else:
        filters = ({"exact_match_strict": ("strict-match", "strict"),
                    "exact_match_flexible": ("flexible-extract", "flexible")} if task == "gsm8k" else
                   {"exact_match": ("remove_whitespace", "answer")})
        per_filter = {name: _by_doc(harness["samples"][tasks[0]], f) for name, (f, _) in filters.items()}
        for p in predictions:
            samples = {name: by_doc[p["index"]] for name, by_doc in per_filter.items()}
            first = next(iter(samples.values()))
            context = first["arguments"][0][0]
            contexts.append(context)
            same_prompt += _sha(context) == p["prompt_sha256"]
            same_output += first["resps"][0][0] == p["output"]
            agree += all(samples[name]["filtered_resps"][0] == p[field] and
                         float(samples[name]["exact_match"]) == p[name] for name, (_, field) in filters.items())
        metrics = {name: (results["metrics"][name], _harness_metric(harness, tasks, f"exact_match,{f}"))
                   for name, (f, _) in filters.items()}
    same_ids = sum(harness_ids(c) == our_ids(c) for c in contexts)
    generative = task in ("gsm8k", "triviaqa", "nq_open")
    return Comparison(task, len(predictions), same_prompt, same_ids, same_output if generative else None, agree,
                      metrics, None if generative else ll_gap)


def read_cli_output(output_path: Path) -> dict:
    """What `lm_eval ... --output_path DIR --log_samples` wrote, in `run_harness`'s form: the results, and
    per task the samples with their arguments as tuples and their responses parsed back from the strings
    the harness writes ((log-likelihood, is-greedy) pairs; generated texts stay as they are)."""
    (results_file,) = Path(output_path).rglob("results_*.json")
    samples = {}
    for path in results_file.parent.glob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row["arguments"] = [tuple(a.values()) for a in row["arguments"].values()]
            row["resps"] = [[(float(r[0][0]), r[0][1] == "True") if isinstance(r[0], list) else r[0]]
                            for r in row["resps"]]
        samples[task] = rows
    return {"results": json.loads(results_file.read_text())["results"], "samples": samples}


@dataclasses.dataclass
class BackendComparison:
    """Two harness runs of one task (say the `needles` and `hf` backends), request by request."""

    task: str
    rows: int
    same_arguments: int
    """rows whose requests (prompt, continuation or generation settings) are identical"""
    same_texts: int
    """generated texts that are identical (of `texts`)"""
    texts: int
    same_greedy: int
    """log-likelihoods whose is-greedy flag is identical (of `scores`)"""
    scores: int
    max_ll_gap: float
    """largest |difference| of a log-likelihood (a choice's, or a whole text's rolling one)"""
    max_rel_gap: float
    """the same relative to the harness's value (rolling log-likelihoods sum thousands of tokens)"""
    metrics: dict[str, tuple[float, float]]


def compare_runs(a: dict, b: dict, task: str) -> BackendComparison:
    """`a` against `b` (both `run_harness` results) on `task`: every logged sample's arguments and raw responses
    (texts, (log-likelihood, is-greedy) pairs, rolling log-likelihoods), and the task's numeric metrics."""
    rows = same_arguments = same_texts = texts = same_greedy = scores = 0
    ll_gap = rel_gap = 0.0
    b_samples = {(s["doc_id"], s["filter"]): s for s in b["samples"][task]}
    for sa in a["samples"][task]:
        sb = b_samples[(sa["doc_id"], sa["filter"])]
        rows += 1
        same_arguments += sa["arguments"] == sb["arguments"]
        for ra, rb in zip((r[0] for r in sa["resps"]), (r[0] for r in sb["resps"]), strict=True):
            if isinstance(ra, str):
                texts += 1
                same_texts += ra == rb
                continue
            if isinstance(ra, tuple):   # (log-likelihood, is greedy)
                (la, ga), (lb, gb) = ra, rb
                scores += 1
                same_greedy += ga == gb
            else:                       # a rolling log-likelihood
                la, lb = ra, rb
            ll_gap = max(ll_gap, abs(la - lb))
            rel_gap = max(rel_gap, abs(la - lb) / max(abs(lb), 1e-30))
    metrics = {k: (float(v), float(b["results"][task][k])) for k, v in a["results"][task].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len" and "stderr" not in k}
    return BackendComparison(task, rows, same_arguments, same_texts, texts, same_greedy, scores, ll_gap, rel_gap,
                             metrics)


def hf_token_ids(model_dir: Path) -> Callable[[str], list[int]]:
    """What the harness's `hf` backend feeds the model for a prompt (its `tok_encode`): the folder's tokenizer,
    with the special tokens it adds (BOS) unless the text already starts with the prefix token (BOS, else EOS)
    as a rendered chat template does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return lambda text: tokenizer.encode(text, **({"add_special_tokens": False}
                                                  if text.startswith(tokenizer.decode(prefix)) else {}))


# --- the table ------------------------------------------------------------------------------------------
HEADER = ("| task | rows | same prompt / ids / output | same choice or answer | metric: needles vs lm-eval | "
          "max log-lik. gap | needles s | lm-eval s |\n|---|---|---|---|---|---|---|---|")


def table(rows: list[tuple[Comparison, float, float]], header: bool = True) -> str:
    lines = [HEADER] if header else []
    for c, ours_s, harness_s in rows:
        output = "-" if c.same_output is None else c.same_output
        metrics = "; ".join(f"{m} {100 * a:.1f} vs {100 * b:.1f}" for m, (a, b) in c.metrics.items())
        gap = "-" if c.max_ll_gap is None else f"{c.max_ll_gap:.1e}"
        lines.append(f"| {c.task} | {c.rows} | {c.same_prompt} / {c.same_ids} / {output} | {100 * c.agreement:.1f}% | "
                     f"{metrics} | {gap} | {ours_s:.1f} | {harness_s:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face folder both sides load")
    parser.add_argument("--limit", type=int, default=50, help="rows per task (per subject for MMLU)")
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="generation budget on both sides (default: the harness's 256)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--subjects", nargs="+", default=None,
                        help="MMLU subjects (default: every subject with a test file in the data)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--out", type=Path, default=Path("lmeval_compare_out"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chat-template", action="store_true",
                        help="the harness's --apply_chat_template --fewshot_as_multiturn against our --chat-template")
    args = parser.parse_args(argv)
    from data_gen.tokenizer import get_tokenizer
    from jaxtrain.generate import harness_ids

    our_ids = functools.partial(harness_ids, get_tokenizer(args.model))   # the folder's tokenizer, as eval uses it
    subjects = args.subjects or sorted(p.name.removesuffix("_test.csv")
                                       for p in (args.data / "mmlu" / "test").glob("*_test.csv"))
    names = write_tasks(args.data, args.out / "tasks", subjects=subjects)
    gen_kwargs = None if args.max_gen_toks is None else {"max_gen_toks": args.max_gen_toks}
    reference_ids = hf_token_ids(args.model)
    rows = []
    for task in args.tasks:
        t0 = time.perf_counter()
        flags = ["--batch-size", str(args.batch_size), *(["--chat-template"] if args.chat_template else [])]
        ours = run_ours(task, args.model, args.data, args.out / "needles" / task, limit=args.limit,
                        max_gen_toks=args.max_gen_toks, flags=flags, subjects=subjects)
        t1 = time.perf_counter()
        harness = run_harness("hf", {"pretrained": str(args.model), "dtype": "float32", "device": "cpu"},
                              args.out / "tasks", names[task], limit=args.limit, batch_size=args.batch_size,
                              gen_kwargs=gen_kwargs, chat=args.chat_template)
        t2 = time.perf_counter()
        rows.append((compare(task, harness, names[task], ours, reference_ids, our_ids), t1 - t0, t2 - t1))
        print(table(rows[-1:], header=len(rows) == 1), flush=True)
    return table(rows)


if __name__ == "__main__":
    main()
