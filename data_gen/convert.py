"""Readers of published long-context training sets, the paper's augmentation baselines, into our chat JSONL.

`python -m data_gen convert --format multidocqa|in2 --input F [F ...] --out DIR` writes DIR/train.jsonl (one
`{"messages": [...], "meta": {...}}` a line, the format `python -m data_gen shards` reads) and
DIR/generation.json. Input files are JSONL (.jsonl, or gzip-compressed .jsonl.gz); every row must be
convertible, and one that is not stops the conversion with a one-line error naming file:line.

Row formats (documented in docs/data_gen.md, "Baseline data"):

multidocqa (Yu 2024, "Training with 'Paraphrasing the Original Text' Improves Long-Context Performance": the
multi-document QA data on Hugging Face, yuyijiong/Multi-doc-QA-CommonCrawl and Long-Instruction-with-Paraphrasing):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, the release's chat form: as is;
- `{"context": str, "questions": [str, ...], "answers": [str, ...]}`, its context-questions-answers form (what the
  authors' training script reads): the first user turn is the context, a blank line, the first question; every
  further question is a turn of its own (the script joins context and question with a literal "/n", a typo not
  reproduced); `"question"` / `"answer"` strings for a single pair.

in2 (An et al. 2024, "Make Your LLM Fully Utilize the Context", FILM-7B; In2Training's released files):
- `{"prompt": str, "completion": str}`, the release's form (as In2Training/VaLProbing-32K): the prompt is written
  in FILM-7B's template, `[INST] Below is a context and an instruction. ... ### Context:\\n...\\n\\n### Instruction:\\n
  ... [/INST]`; the `[INST]` ... `[/INST]` wrapper (and a leading `<s>`) is removed and the text inside becomes the
  user message, so that the model's own chat template wraps it;
- `{"context": str, "question"|"instruction": str, "answer"|"output"|"response": str}`, the fields the paper
  describes (an assumption: the training set itself is not released): the user message is FILM-7B's template text
  around them;
- `{"messages": [...]}` as for multidocqa.
"""

from __future__ import annotations

import collections
import pathlib
import random
import re
from collections.abc import Callable, Iterator

import tqdm

from data_gen.records import file_sha256, read_jsonl, write_generation, write_split
from data_gen.tokenizer import ChatFormatError, Tokenizer, get_tokenizer

IN2_INSTRUCTION = ("Below is a context and an instruction. Based on the information provided in the context, write a "
                   "response for the instruction.")
_INST = re.compile(r"\A\s*(?:<s>)?\s*\[INST\](.*)\[/INST\]\s*\Z", re.DOTALL)


class ConvertError(ValueError):
    """An input that cannot be converted; the message names file:line."""


def _text(row: dict, names: tuple[str, ...], what: str) -> str | None:
    """The first of `names` that the row has, which must be a non-empty string; None when it has none."""
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise ConvertError(f"'{name}' ({what}) must be a non-empty string, got {value!r}"[:200])
            return value
    return None


def _messages(row: dict) -> list[dict] | None:
    if "messages" not in row:
        return None
    messages = row["messages"]
    if not isinstance(messages, list):
        raise ConvertError(f"'messages' must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]


def _qa_turns(first_prefix: str, questions: list[str], answers: list[str]) -> list[dict]:
    turns = []
    for k, (q, a) in enumerate(zip(questions, answers, strict=True)):
        turns += [{"role": "user", "content": first_prefix + q if k == 0 else q}, {"role": "assistant", "content": a}]
    return turns


def multidocqa_messages(row: dict) -> list[dict]:
    """The chat of one multidocqa row (see the module docstring)."""
    if (messages := _messages(row)) is not None:
        return messages
    context = _text(row, ("context",), "the documents")
    if context is not None and ("questions" in row or "answers" in row):
        questions, answers = row.get("questions"), row.get("answers")
        if not (isinstance(questions, list) and isinstance(answers, list) and questions
                and len(questions) == len(answers) and all(isinstance(x, str) for x in questions + answers)):
            raise ConvertError("'questions' and 'answers' must be lists of strings of the same, non-zero length")
        return _qa_turns(context + "\n\n", questions, answers)
    question, answer = _text(row, ("question",), "the question"), _text(row, ("answer",), "the answer")
    if context is None or question is None or answer is None:
        raise ConvertError(f"a multidocqa row needs 'messages', or 'context' with 'questions'/'answers' lists (or "
                           f"'question'/'answer' strings); it has {sorted(row)}")
    return _qa_turns(context + "\n\n", [question], [answer])


def in2_messages(row: dict) -> list[dict]:
    """The chat of one in2 row (see the module docstring)."""
    if (messages := _messages(row)) is not None:
        return messages
    prompt, completion = _text(row, ("prompt",), "the prompt"), _text(row, ("completion",), "the answer")
    if prompt is not None and completion is not None:
        inner = _INST.match(prompt)
        return _qa_turns("", [inner.group(1).strip() if inner else prompt.strip()], [completion])
    context = _text(row, ("context",), "the context")
    question = _text(row, ("question", "instruction"), "the question")
    answer = _text(row, ("answer", "output", "response"), "the answer")
    if context is None or question is None or answer is None:
        raise ConvertError(f"an in2 row needs 'prompt' and 'completion', or 'context', 'question' (or 'instruction') "
                           f"and 'answer' (or 'output', 'response'), or 'messages'; it has {sorted(row)}")
    return _qa_turns(f"{IN2_INSTRUCTION}\n\n### Context:\n{context}\n\n### Instruction:\n", [question], [answer])


FORMATS: dict[str, Callable[[dict], list[dict]]] = {"multidocqa": multidocqa_messages, "in2": in2_messages}


def _records(fmt: str, paths: list[pathlib.Path], tokenizer: Tokenizer, counts: collections.Counter,
             max_tokens: int | None, progress: bool) -> Iterator[dict]:
    """Every row of every file as a record, in order; rows over `max_tokens` counted and left out."""
    to_messages = FORMATS[fmt]
    for path in paths:
        for lineno, row in tqdm.tqdm(read_jsonl(path, ConvertError), desc=f"reading {path.name}", unit="row",
                                     disable=not progress):
            where = f"{path}:{lineno}"
            counts["rows"] += 1
            try:
                if not isinstance(row, dict):
                    raise ConvertError(f"expected a JSON object, got {type(row).__name__}")
                messages = to_messages(row)
                num_tokens = int(tokenizer.encode_chat(messages).input_ids.size)
            except (ConvertError, ChatFormatError) as e:
                raise ConvertError(f"{where}: {e}") from None
            if max_tokens is not None and num_tokens > max_tokens:
                counts["too_long"] += 1
                continue
            meta = {"id": f"{fmt}-{path.name.split('.')[0]}-{lineno:06d}", "task": fmt, "source": where,
                    "num_tokens": num_tokens}
            yield {"messages": messages, "meta": meta}


def _sample(records: Iterator[dict], n: int, rng: random.Random) -> list[dict]:
    """A uniform sample of n records in one pass (reservoir), returned in input order."""
    kept: list[tuple[int, dict]] = []
    for i, record in enumerate(records):
        if len(kept) < n:
            kept.append((i, record))
        elif (j := rng.randrange(i + 1)) < n:
            kept[j] = (i, record)
    return [record for _, record in sorted(kept, key=lambda x: x[0])]


def convert(fmt: str, inputs: list[str | pathlib.Path], out_dir: str | pathlib.Path, *,
            tokenizer: Tokenizer | None = None, num_samples: int | None = None, max_tokens: int | None = None,
            seed: int = 0, progress: bool = True) -> dict:
    """Convert `inputs` (files of format `fmt`) into out_dir/train.jsonl and generation.json; returns the latter.

    Every row is checked (one-line ConvertError naming file:line) and its chat counted with `tokenizer` (default
    Mistral's; meta `num_tokens`). With `max_tokens`, longer examples are left out (counted in generation.json);
    with `num_samples`, a uniform random sample of that many of the rest is kept (`seed`), in input order.
    """
    if fmt not in FORMATS:
        raise ConvertError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    paths = [pathlib.Path(p) for p in inputs]
    if not paths:
        raise ConvertError("--input needs at least one file")
    stems = collections.Counter(p.name.split(".")[0] for p in paths)
    if clash := [s for s, c in stems.items() if c > 1]:
        raise ConvertError(f"two inputs are named {clash[0]!r}: example ids are made from file names, rename one")
    for p in paths:
        if p.name.endswith(".zst"):
            raise ConvertError(f"{p}: zstd files are not read here; decompress first (zstd -d {p})")
        if not p.is_file():
            raise ConvertError(f"{p}: no such file")
    if num_samples is not None and num_samples < 1 or max_tokens is not None and max_tokens < 1:
        raise ConvertError("--num-samples and --max-tokens must be positive")
    tokenizer = get_tokenizer(tokenizer)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: collections.Counter = collections.Counter()
    records = _records(fmt, paths, tokenizer, counts, max_tokens, progress)
    if num_samples is not None:
        records = iter(_sample(records, num_samples, random.Random(f"needles/convert/{fmt}/seed={seed}")))
    split = write_split(out, "train", records)
    inputs_info = [{"path": str(p), "sha256": file_sha256(p)} for p in paths]
    return write_generation(out, {
        "generator": "data_gen convert", "format": fmt, "seed": seed, "num_samples": num_samples,
        "max_tokens": max_tokens, "inputs": inputs_info, "rows": counts["rows"], "too_long": counts["too_long"],
        "tokenizer": tokenizer.identity().to_json(), "splits": {"train": split}})
