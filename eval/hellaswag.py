"""HellaSwag, 0-shot: pick the ending with the highest log-likelihood (acc), or per character (acc_norm).

lm-evaluation-harness `hellaswag`: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
choices = preprocess(ending) scored as " " + ending, where preprocess strips, turns " [title]" into ". ",
drops other [bracketed] WikiHow markers and collapses double spaces.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, find_file, get_int, get_str, get_str_list, iter_jsonl, open_text
from eval.results import file_source, prompt_sha256
from jaxtrain.generate import FewShotPrompt, encode_pair

_SENTENCE_END = re.compile(r"[.!?]\s+")


def preprocess(text: str) -> str:
    """The harness's cleanup of WikiHow artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def capitalize_last_fragment(ctx: str) -> str:
    """Rebuild `ctx_a + " " + ctx_b.capitalize()` from the joined `ctx` when the split is not stored (the
    plain-text and TFDS forms): ctx_b is the unfinished sentence after the last sentence end, so a tail
    that starts in lower case is capitalised. Exact whenever ctx_a ends a sentence and ctx_b is lower
    case (all 300 of the shared slice); see docs/eval.md for the cases where it can differ."""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return ctx
    cut = ends[-1].end()
    tail = ctx[cut:]
    return ctx[:cut] + tail.capitalize() if tail[:1].islower() else ctx


@dataclasses.dataclass(frozen=True)
class HellaswagExample:
    index: int
    query: str
    choices: tuple[str, ...]
    label: int


def _example(index: int, raw_query: str, endings: list[str], label: int, where: str) -> HellaswagExample:
    if len(endings) != 4:
        raise DataError(f"{where}: expected 4 endings, got {len(endings)}")
    if not 0 <= label < 4:
        raise DataError(f"{where}: label must be 0-3, got {label}")
    choices = tuple(preprocess(e) for e in endings)
    if not all(choices):
        raise DataError(f"{where}: ending {[bool(c) for c in choices].index(False)} is empty")
    return HellaswagExample(index, preprocess(raw_query), choices, label)


def read_hellaswag_txt(path: Path) -> list[HellaswagExample]:
    """Plain text, 6 lines an example: "<activity label>: <ctx>", the label (0-3), the four endings."""
    with open_text(path) as f:
        lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        start = len(lines) - len(lines) % 6 + 1
        raise DataError(f"{path}:{start}: incomplete example ({len(lines) % 6} of 6 lines: context, label, 4 endings)")
    examples = []
    for start in range(0, len(lines), 6):
        where = f"{path}:{start + 1}"
        ctx, label, *endings = lines[start: start + 6]
        if not ctx.strip():
            raise DataError(f"{where}: empty context line")
        if label.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{path}:{start + 2}: label must be 0-3, got {label!r}")
        examples.append(_example(len(examples), capitalize_last_fragment(ctx), endings, int(label), where))
    return examples


def read_hellaswag_jsonl(path: Path) -> list[HellaswagExample]:
    """The official release (hellaswag_val.jsonl): ctx_a, ctx_b, activity_label, endings, label."""
    examples = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        ctx = get_str(obj, "ctx_a", where) + " " + get_str(obj, "ctx_b", where, allow_empty=True).capitalize()
        query = get_str(obj, "activity_label", where) + ": " + ctx
        examples.append(_example(len(examples), query, get_str_list(obj, "endings", where),
                                 get_int(obj, "label", where), where))
    return examples


def read_hellaswag(path: Path) -> list[HellaswagExample]:
    path = Path(path)
    return read_hellaswag_jsonl(path) if ".jsonl" in path.suffixes else read_hellaswag_txt(path)


def _from_tfds(index: int, r: dict) -> HellaswagExample:
    query = r["activity_label"] + ": " + capitalize_last_fragment(r["context"])
    return _example(index, query, list(r["endings"]), int(r["label"]), f"tfds hellaswag record {index}")


@dataclasses.dataclass(kw_only=True)
class HellaswagArgs(CommonArgs):
    """HellaSwag validation accuracy (acc, acc_norm). --data-file: hellaswag_val.jsonl (official) or the
    6-lines-an-example text file."""

    chat_template: bool = False
    """The model's chat template as lm-evaluation-harness's `--apply_chat_template`: the context as the user
    turn, each ending scored after the generation prompt."""


def load(args: HellaswagArgs) -> LoadedData:
    check_source_args(args)
    if args.data_file is not None or args.data_dir is not None:
        path = args.data_file or find_file(args.data_dir, ["hellaswag_val.jsonl", "hellaswag_val.txt"], "HellaSwag")
        examples, sources = read_hellaswag(path), [file_source(path)]
    else:
        from eval import tfds_builders

        records, source = tfds_builders.load_records("hellaswag", "validation", data_dir=args.tfds_data_dir,
                                                     download=args.tfds_download)
        examples, sources = [_from_tfds(i, r) for i, r in enumerate(records)], [source]
    examples = limited(examples, args.limit)
    return LoadedData(examples, sources, len(examples))


def evaluate(args: HellaswagArgs, data: LoadedData, generator) -> Evaluation:
    chat, tokenizer = args.chat_template, generator.tokenizer
    prompts = [FewShotPrompt(ex.query) for ex in data.examples]
    contexts = [prompt.render(tokenizer, chat=chat) for prompt in prompts]
    requests = [encode_pair(tokenizer, context, prompt.continuation(c, chat=chat))
                for ex, prompt, context in zip(data.examples, prompts, contexts, strict=True) for c in ex.choices]
    lls = generator.loglikelihood(requests, progress=args.progress)
    acc, acc_norm, predictions = [], [], []
    pos = 0
    for ex, context in zip(data.examples, contexts, strict=True):
        scores = [ll for ll, _ in lls[pos: pos + len(ex.choices)]]
        pos += len(ex.choices)
        pred = max(range(len(scores)), key=lambda j: scores[j])
        pred_norm = max(range(len(scores)), key=lambda j: scores[j] / len(ex.choices[j]))
        acc.append(float(pred == ex.label))
        acc_norm.append(float(pred_norm == ex.label))
        predictions.append({"index": ex.index, "query": ex.query,
                            "prompt_sha256": prompt_sha256(context),
                            "choices": list(ex.choices), "label": ex.label,
                            "prediction": pred, "prediction_norm": pred_norm, "loglikelihoods": scores,
                            "acc": acc[-1], "acc_norm": acc_norm[-1]})
    settings = {"num_fewshot": 0, "chat_template": args.chat_template,
                "acc_norm": "log-likelihood divided by the ending's length in characters"}
    return Evaluation({**M.summarize("acc", acc), **M.summarize("acc_norm", acc_norm)}, predictions, settings,
                      len(data.examples))


TASK = Task("hellaswag", HellaswagArgs, load, evaluate)
