"""Synthetic key-value retrieval eval: the held-out `data_gen` samples, scored from their metadata.

Each sample's user message is the prompt (Mistral-Instruct format) and its `meta` holds the gold value and
gold dictionary number (`gold_value`, `gold_dict`, 1-based). The model's answer is parsed for the value
and the dictionary; exact match of the value, of the dictionary and of both is reported overall and by
gold dictionary position (in `--position-bins` equal ranges of 1..num_dicts), and the value's accuracy is
plotted against that position (synthetic_positions.png, as MDQA's plot).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from pathlib import Path

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, find_file, get_int, get_str, iter_jsonl
from eval.plots import plot_synthetic
from eval.results import file_source
from jaxtrain.generate import encode_generation_prompt

_DICT = re.compile(r"Dictionary\s*\[?\s*(\d+)", re.IGNORECASE)
_VALUE = (re.compile(r"\bvalue is\s*\[?(-?\d+)", re.IGNORECASE),  # multisubkey: "..., its value is V and ..."
          re.compile(r"\bvalue of (?:the )?key\b[^\n]*?\bis\s*\[?(-?\d+)", re.IGNORECASE))  # simple: "... key K is V"
_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
    index: int
    id: str
    prompt: str
    reference: str
    gold_key: int | tuple[int, ...]
    gold_value: int
    gold_dict: int
    num_dicts: int


def parse_answer(text: str, gold_key: int | tuple[int, ...]) -> tuple[int | None, int | None]:
    """(value, dictionary number) stated in an answer, None where absent.

    The dictionary is the first "Dictionary [n]" (brackets optional). The value is the number after
    "value is" / "value of key ... is" (the answer templates of both tasks); failing that, the first integer
    that is neither the key (or one of its subkeys) nor the dictionary number, so that a bare "5521"
    counts too.
    """
    dict_match = _DICT.search(text)
    dictionary = int(dict_match.group(1)) if dict_match else None
    for pattern in _VALUE:
        m = pattern.search(text)
        if m:
            return int(m.group(1)), dictionary
    key_parts = set(gold_key) if isinstance(gold_key, tuple) else {gold_key}
    spans_to_skip = {dict_match.span(1)} if dict_match else set()
    for m in _INTEGER.finditer(text):
        if m.span() not in spans_to_skip and int(m.group()) not in key_parts:
            return int(m.group()), dictionary
    return None, dictionary


def _gold_key(meta: dict, where: str) -> int | tuple[int, ...]:
    key = meta.get("gold_key")
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, list) and key and all(isinstance(k, int) and not isinstance(k, bool) for k in key):
        return tuple(key)
    raise DataError(f"{where}: meta field 'gold_key' must be an integer or a list of integers, got {key!r}")


def read_synthetic(path: Path) -> list[SyntheticExample]:
    """data_gen eval JSONL: {"messages": [user, assistant], "meta": {"gold_key", "gold_value", "gold_dict",
    "num_dicts", "id", ...}}. The reference answer must parse to the metadata, which proves the answer
    parser understands this data."""
    examples = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        messages = obj.get("messages")
        if not isinstance(messages, list) or len(messages) != 2 or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: field 'messages' must be [user message, assistant message]")
        for i, role in enumerate(("user", "assistant")):
            if messages[i].get("role") != role:
                raise DataError(f"{where}: messages[{i}].role must be {role!r}, got {messages[i].get('role')!r}")
        prompt = get_str(messages[0], "content", f"{where}: messages[0]")
        reference = get_str(messages[1], "content", f"{where}: messages[1]")
        meta = obj.get("meta")
        if not isinstance(meta, dict):
            raise DataError(f"{where}: missing object field 'meta' (the sample's gold key/value/dictionary)")
        mw = f"{where}: meta"
        num_dicts = get_int(meta, "num_dicts", mw, lo=1)
        ex = SyntheticExample(len(examples), str(meta.get("id", len(examples))), prompt, reference,
                              _gold_key(meta, mw), get_int(meta, "gold_value", mw),
                              get_int(meta, "gold_dict", mw, lo=1, hi=num_dicts), num_dicts)
        parsed = parse_answer(reference, ex.gold_key)
        if parsed != (ex.gold_value, ex.gold_dict):
            raise DataError(f"{where}: the reference answer {reference!r:.120} parses to value/dictionary {parsed}, "
                            f"but meta says {(ex.gold_value, ex.gold_dict)}")
        examples.append(ex)
    return examples


def position_bin(position: int, num_dicts: int, bins: int) -> str:
    """The range label ("1-17", ...) of a 1-based dictionary position among `bins` equal ranges."""
    width = math.ceil(num_dicts / bins)
    lo = (position - 1) // width * width + 1
    return f"{lo}-{min(lo + width - 1, num_dicts)}"


@dataclasses.dataclass(kw_only=True)
class SyntheticArgs(CommonArgs):
    """Synthetic retrieval accuracy on data_gen's eval.jsonl (--data-file, or --data-dir holding eval.jsonl)."""

    max_new_tokens: int | None = None
    """Default: the longest reference answer's token count + 16."""
    position_bins: int = 5
    """Report accuracy in this many equal ranges of gold dictionary positions."""
    chat_template: bool = True
    """Prompt in the model's chat format (its chat template), as it was finetuned."""


def load(args: SyntheticArgs) -> LoadedData:
    check_source_args(args)
    if args.data_file is None and args.data_dir is None:
        raise DataError("synthetic: give --data-file (data_gen's eval.jsonl) or --data-dir (a data_gen output dir)")
    path = args.data_file or find_file(args.data_dir, ["eval.jsonl"], "data_gen eval")
    examples = limited(read_synthetic(path), args.limit)
    return LoadedData(examples, [file_source(path)], len(examples))


def evaluate(args: SyntheticArgs, data: LoadedData, generator) -> Evaluation:
    examples: list[SyntheticExample] = data.examples
    tokenizer = generator.tokenizer
    max_new = args.max_new_tokens or max(len(tokenizer.encode(ex.reference)) for ex in examples) + 16
    prompts = [encode_generation_prompt(tokenizer, ex.prompt, chat=args.chat_template) for ex in examples]
    generations = generator.generate(prompts, max_new_tokens=max_new, progress=args.progress)
    scores: dict[str, list[float]] = defaultdict(list)
    by_bin: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    predictions = []
    for ex, gen in zip(examples, generations, strict=True):
        value, dictionary = parse_answer(gen.text, ex.gold_key)
        row = {"value_em": float(value == ex.gold_value), "dict_em": float(dictionary == ex.gold_dict)}
        row["both_em"] = row["value_em"] * row["dict_em"]
        label = position_bin(ex.gold_dict, ex.num_dicts, args.position_bins)
        for name, score in row.items():
            scores[name].append(score)
            by_bin[label][name].append(score)
        predictions.append({"index": ex.index, "id": ex.id, "gold_value": ex.gold_value, "gold_dict": ex.gold_dict,
                            "output": gen.text, "parsed_value": value, "parsed_dict": dictionary, **row})
    metrics: dict = {}
    for name, values in scores.items():
        metrics.update(M.summarize(name, values))
    metrics["by_gold_position"] = {
        label: {**{k: v for name, values in by_bin[label].items() for k, v in M.summarize(name, values).items()},
                "n": len(by_bin[label]["value_em"])}
        for label in sorted(by_bin, key=lambda s: int(s.split("-")[0]))}
    settings = {"chat_template": args.chat_template, "max_new_tokens": max_new, "position_bins": args.position_bins,
                "parsing": "value after 'value is' / 'value of key ... is', else first non-key integer; "
                           "dictionary from the first 'Dictionary [n]'"}
    return Evaluation(metrics, predictions, settings, len(examples))


def write_plot(results: dict, out: Path) -> None:
    plot_synthetic([results], Path(out) / "synthetic_positions.png")


TASK = Task("synthetic", SyntheticArgs, load, evaluate, after_write=write_plot)
