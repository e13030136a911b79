"""FLenQA (Levy, Jacoby, Goldberg, *Same Task, More Tokens*, ACL 2024): True/False reasoning over facts that
are spread through 250 to 3000 tokens of padding, with and without chain of thought.

Prompts, decoding and scoring follow the authors' analysis notebook (`alonj/Same-Task-More-Tokens`,
"FLenQA analysis.ipynb") exactly; see docs/eval.md. Each prompt is sent as one Mistral-Instruct user turn,
byte for byte as the authors sent it to their chat API (its trailing newline included), decoded greedily.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence
from pathlib import Path

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, find_file, get_int, get_str, iter_jsonl
from eval.plots import plot_flenqa
from eval.results import file_source

SOURCE = "https://github.com/alonj/Same-Task-More-Tokens"
"""Where the released file comes from (the authors' repository; also the Hugging Face dataset alonj/FLenQA)."""
FILE_NAMES = ("FLenQA.zip", "FLenQA.jsonl", "FLenQA.jsonl.gz", "flenqa.jsonl")
"""What --data-dir looks for: the release's zip, or the JSONL inside it."""
DATASETS = ("PIR", "MonoRel", "Simplified RuleTaker")
TRUE, FALSE, REFUSED = "true", "false", "other/refused"

# The authors' templates, verbatim (odd quotes and the line break inside the PIR CoT prompt included).
TEMPLATES = {
    "Simplified RuleTaker": (
        'Answer whether the statement {question} can be derived from the rule and the facts. Answer with either '
        '"True" or "False".\n'
        "Rule: {rule}\n"
        "Facts: {mixin}\n"
        'Answer with either "True or "False".\n'),
    "Simplified RuleTaker_cot": (
        "Answer whether the statement {question} can be derived from the rule and the facts.\n"
        'Show your steps then answer with either "True" or "False".\n'
        "Rule: {rule}\n"
        "Facts: {mixin}\n"
        'Answer with either "True or "False". Let\'s work this out in a step by step way to be sure we have the '
        "right answer.\n"),
    "PIR": (
        "{mixin}\n"
        "True/False Question: {question}\n"
        "Answer only True or False.\n"),
    "PIR_cot": (
        "Show your steps then answer with \u2019true\u2019 or \u2019false\u2019.\n"
        "{mixin}\n"
        "True/False Question: {question}\n"
        "Let\u2019s work this out in a step by step way to\n"
        "be sure we have the right answer.\n"),
    "MonoRel": (
        "Here are some facts. Answer the exact following question based on the text: {question} Answer the "
        "question as it appears exactly.\n"
        "{mixin}\n"
        "{question}\n"
        "Answer only True or False.\n"),
    "MonoRel_cot": (
        "Here are some facts. Answer the exact following question based on the text: {question} Answer the "
        "question as it appears exactly.\n"
        "Show your steps then answer with \u2019true\u2019 or \u2019false\u2019.\n"
        "{mixin}\n"
        "{question}\n"
        "Let\u2019s work this out in a step by step way to be sure we have the right answer. Show your work and "
        "finally answer with \u2019true\u2019 or \u2019false\u2019. The final step should include the exact text "
        "of the question and the answer.\n"),
}


@dataclasses.dataclass(frozen=True)
class FlenqaRow:
    line: int
    global_sample_id: object
    sample_id: object
    label: str
    """"True" or "False"."""
    dataset: str
    question: str
    mixin: str
    ctx_size: int
    dispersion: str
    padding_type: str
    rule: object = None
    """Simplified RuleTaker: rendered with str() as the authors' f-string does (a list shows as a list)."""
    facts: tuple[str, ...] = ()
    """What chain-of-thought coverage looks for: `facts` (PIR, MonoRel) or `statement` (Simplified RuleTaker)."""


# --------------------------------------------------------------------------------------------- reading
def _facts(obj: dict, field: str, where: str) -> tuple[str, ...]:
    value = obj.get(field)
    if isinstance(value, str) and value.strip():
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of strings, got {value!r:.80}")


def read_flenqa_file(path: Path) -> list[FlenqaRow]:
    """Every row of the released FLenQA JSONL (plain, .gz or the released FLenQA.zip), validated."""
    rows = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        dataset = get_str(obj, "dataset", where)
        if dataset not in DATASETS:
            raise DataError(f"{where}: field 'dataset' must be one of {list(DATASETS)}, got {dataset!r}")
        label = obj.get("label")
        if isinstance(label, bool):  # tolerate JSON booleans; the release writes the strings
            label = str(label)
        if label not in ("True", "False"):
            raise DataError(f"{where}: field 'label' must be \"True\" or \"False\", got {obj.get('label')!r}")
        rule_taker = dataset == "Simplified RuleTaker"
        if rule_taker and "rule" not in obj:
            raise DataError(f"{where}: missing field 'rule' (needed by the Simplified RuleTaker prompt)")
        rows.append(FlenqaRow(
            line=lineno, global_sample_id=obj.get("global_sample_id"), sample_id=obj.get("sample_id"),
            label=label, dataset=dataset, question=get_str(obj, "assertion/question", where),
            mixin=get_str(obj, "mixin", where), ctx_size=get_int(obj, "ctx_size", where, lo=1),
            dispersion=get_str(obj, "dispersion", where), padding_type=get_str(obj, "padding_type", where),
            rule=obj["rule"] if rule_taker else None,
            facts=_facts(obj, "statement" if rule_taker else "facts", where)))
    return rows


def prompt_text(row: FlenqaRow, *, cot: bool) -> str:
    """The authors' prompt for this row (a list-valued field renders as Python's str() of it)."""
    template = TEMPLATES[row.dataset + ("_cot" if cot else "")]
    return template.format(question=row.question, rule=row.rule, mixin=row.mixin)


# --------------------------------------------------------------------------------------------- scoring
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """The notebook's `normalize_answer`: lower case, a/an/the removed as words, whitespace collapsed.

    Its punctuation step, `s.replace("".join(set(string.punctuation)), "")`, removes the whole run of
    all 32 punctuation characters only where it occurs as one substring, so in practice punctuation is
    kept ("true." stays "true."). We keep that behaviour, with the characters in `string.punctuation`
    order (the notebook's set order changes from one Python process to the next)."""
    s = str(text).lower().replace(string.punctuation, "")
    return " ".join(_ARTICLES.sub(" ", s).split())


def response_category(text: str) -> str:
    """"true", "false" or "other/refused": `not true` counts as false, then whichever word occurs last
    (as a substring: "untrue" contains "true")."""
    s = normalize(text).replace("not true", "false")
    last_true, last_false = s.rfind(TRUE), s.rfind(FALSE)
    if last_true > last_false:
        return TRUE
    if last_false > last_true:
        return FALSE
    return REFUSED


@dataclasses.dataclass(frozen=True)
class Score:
    answer: str
    correct: bool
    coverage: int
    """Facts (statements) found, normalised, in the normalised response (chain of thought only)."""
    early: bool
    """The answer occurs within the first 10 characters of the normalised response (chain of thought only)."""


def score_response(response: str, label: str, facts: Sequence[str], *, cot: bool) -> Score:
    """The notebook's `response_analysis` for one response."""
    normalized = normalize(response)
    answer = response_category(normalized)
    correct = answer in label.lower()
    if not cot:
        return Score(answer, correct, 0, False)
    coverage = sum(normalize(fact) in normalized for fact in facts)
    return Score(answer, correct, coverage, answer in normalized[:10])


# --------------------------------------------------------------------------------------------- the task
@dataclasses.dataclass(kw_only=True)
class FlenqaArgs(CommonArgs):
    """FLenQA True/False reasoning accuracy by context length (writes results.json and flenqa_accuracy.png).

    The data is not downloaded for you: get FLenQA.zip from https://github.com/alonj/Same-Task-More-Tokens and
    pass it as --data-file FLenQA.zip (as it is, or the JSONL inside it, plain or .gz), or put it in a folder
    given as --data-dir (e.g. EVAL_DATA/flenqa/FLenQA.zip beside the other tasks' folders)."""

    cot: bool = False
    """Chain-of-thought prompts (also reports coverage and early-answer rates)."""
    max_new_tokens: int = 400
    """Generation budget (the authors' 400, with and without --cot)."""
    datasets: tuple[str, ...] | None = None
    """Keep only these tasks: PIR, MonoRel, "Simplified RuleTaker" (default: all)."""
    ctx_sizes: tuple[int, ...] | None = None
    """Keep only these context sizes (250, 500, 1000, 2000, 3000; default: all)."""
    dispersions: tuple[str, ...] = ("random",)
    """Keep only these dispersions (first, middle, last, random), or `all`. Default: random, the one the
    paper's main plots use."""
    padding_types: tuple[str, ...] | None = None
    """Keep only these padding types (same, books; default: all)."""
    chat_template: bool = True
    """Send the prompt as one user turn of the model's chat template (as the authors sent it to chat models)."""


ALL = "all"


def _keep(rows: list[FlenqaRow], field: str, wanted, flag: str) -> list[FlenqaRow]:
    if wanted is None or ALL in wanted:
        return rows
    present = sorted({getattr(r, field) for r in rows}, key=str)
    missing = [w for w in wanted if w not in present]
    if missing:
        raise DataError(f"{flag} {' '.join(map(str, missing))}: not in the data (present: "
                        f"{', '.join(map(str, present))})")
    return [r for r in rows if getattr(r, field) in wanted]


def load(args: FlenqaArgs) -> LoadedData:
    check_source_args(args)
    if args.data_file is None and args.data_dir is None:
        raise DataError("flenqa needs the released data, which is not downloaded for you: get FLenQA.zip from "
                        f"{SOURCE} and pass --data-file PATH/FLenQA.zip (the .zip as it is, or the JSONL inside it), "
                        f"or --data-dir with a folder holding one of {', '.join(FILE_NAMES)}")
    path = args.data_file or find_file(args.data_dir, list(FILE_NAMES), f"FLenQA (download it from {SOURCE})")
    if args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    rows = read_flenqa_file(path)
    for field, flag in (("dataset", "--datasets"), ("ctx_size", "--ctx-sizes"), ("dispersion", "--dispersions"),
                        ("padding_type", "--padding-types")):
        rows = _keep(rows, field, getattr(args, field + "s"), flag)
    rows = limited(rows, args.limit)
    return LoadedData(rows, [file_source(path)], len(rows))


def _group_metrics(scored: list[tuple[FlenqaRow, Score]], cot: bool) -> dict:
    metrics = {**M.summarize("accuracy", [float(s.correct) for _, s in scored]),
               "refusal_rate": sum(s.answer == REFUSED for _, s in scored) / len(scored),
               "true_rate": sum(s.answer == TRUE for _, s in scored) / len(scored)}
    if cot:
        metrics["coverage"] = sum(s.coverage for _, s in scored) / len(scored)
        metrics["coverage_rate"] = sum(s.coverage / len(r.facts) for r, s in scored) / len(scored)
        metrics["early_answer_rate"] = sum(s.early for _, s in scored) / len(scored)
    return metrics | {"n": len(scored)}


def _by(scored, key) -> dict[str, list]:
    groups: dict[str, list] = {}
    for row, score in sorted(scored, key=lambda rs: key(rs[0])):
        groups.setdefault(str(key(row)), []).append((row, score))
    return groups


def evaluate(args: FlenqaArgs, data: LoadedData, generator) -> Evaluation:
    max_new = args.max_new_tokens
    rows: list[FlenqaRow] = data.examples
    # The prompt goes as it is, trailing newline included: mistral_common encodes a user message unstripped.
    tokenizer = generator.tokenizer
    encode = tokenizer.encode_prompt if args.chat_template else tokenizer.encode_text
    prompts = [encode(prompt_text(r, cot=args.cot)) for r in rows]
    generations = generator.generate(prompts, max_new_tokens=max_new, progress=args.progress)
    scored, predictions = [], []
    for row, prompt, gen in zip(rows, prompts, generations, strict=True):
        score = score_response(gen.text, row.label, row.facts, cot=args.cot)
        scored.append((row, score))
        predictions.append({"line": row.line, "global_sample_id": row.global_sample_id, "sample_id": row.sample_id,
                            "dataset": row.dataset, "ctx_size": row.ctx_size, "dispersion": row.dispersion,
                            "padding_type": row.padding_type, "label": row.label, "output": gen.text,
                            "answer": score.answer, "correct": score.correct, "coverage": score.coverage,
                            "early_answer": score.early, "prompt_tokens": len(prompt)})
    detail = {ctx: {ds: {disp: _group_metrics(g3, args.cot) for disp, g3 in _by(g2, lambda r: r.dispersion).items()}
                    for ds, g2 in _by(g1, lambda r: r.dataset).items()}
              for ctx, g1 in _by(scored, lambda r: r.ctx_size).items()}
    metrics = {**_group_metrics(scored, args.cot),
               "by_ctx_size": {k: _group_metrics(g, args.cot) for k, g in _by(scored, lambda r: r.ctx_size).items()},
               "by_dataset": {k: _group_metrics(g, args.cot) for k, g in _by(scored, lambda r: r.dataset).items()},
               "by_dispersion": {k: _group_metrics(g, args.cot)
                                 for k, g in _by(scored, lambda r: r.dispersion).items()},
               "by_ctx_size_dataset_dispersion": detail}
    metrics.pop("n")
    lengths = [len(p) for p in prompts]
    settings = {"cot": args.cot, "max_new_tokens": max_new, "chat_template": args.chat_template,
                "temperature": 0.0,
                "filters": {name: None if value is None else list(value) for name, value in (
                    ("datasets", args.datasets), ("ctx_sizes", args.ctx_sizes), ("dispersions", args.dispersions),
                    ("padding_types", args.padding_types))},
                "prompt_tokens": token_stats(lengths),
                "scored": "last of true/false in the normalised response ('not true' = false), as the authors"}
    return Evaluation(metrics, predictions, settings, len(rows))


def token_stats(lengths: Sequence[int]) -> dict:
    """min / mean / max of prompt lengths in tokens (how long the prompts really were)."""
    return {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)}


def write_plot(results: dict, out: Path) -> None:
    plot_flenqa([results], Path(out) / "flenqa_accuracy.png")


TASK = Task("flenqa", FlenqaArgs, load, evaluate, after_write=write_plot)
