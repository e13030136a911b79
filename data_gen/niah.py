"""Needle-in-a-haystack finetuning data: the paper's third long-context augmentation baseline (Kamradt's test
turned into training examples), over any text corpus.

Each example hides one needle sentence, "The special magic number of <city> is <7-digit number>.", at a chosen
depth (percent of the context's tokens) of a haystack of real text cut to a chosen token length, and asks for the
number; the answer repeats the needle. The haystack is whole sentences of randomly drawn documents, counted with
the tokenizer the model trains with, so the context (haystack and needle) never exceeds `context_tokens`.

Haystacks (`--haystack KIND:DIR`):
- `mdqa:DIR`: the passage texts of "Lost in the Middle" multi-document QA files (*.jsonl / *.jsonl.gz, rows with
  `ctxs`: `text`, `hasanswer`, `isgold`). Only the distractor passages are used (`hasanswer` and `isgold` false):
  the gold passages hold the eval answers, and the rows' questions and answers are never read into a prompt, so a
  model trained on this data has seen none of the eval's questions or answer passages.
- `txt:DIR`: every *.txt file under DIR (recursively, in sorted order), each file a document.

Everything random comes from `random.Random("needles/niah/seed=<seed>/<split>")`: a corpus, config and seed give
byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import random
import re
from collections.abc import Iterator

import tqdm

from data_gen.records import read_jsonl, write_generation, write_split
from data_gen.tokenizer import Tokenizer, get_tokenizer

INSTRUCTION = "Read the text below and answer the question after it."
NEEDLE = "The special magic number of {city} is {number}."
QUESTION = "Question: What is the special magic number of {city} mentioned in the text?"
CITIES = (
    "Amsterdam", "Athens", "Auckland", "Bangkok", "Barcelona", "Beijing", "Berlin", "Bogota", "Boston", "Brussels",
    "Budapest", "Buenos Aires", "Cairo", "Cape Town", "Chicago", "Copenhagen", "Dakar", "Dublin", "Edinburgh",
    "Havana", "Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "London", "Madrid", "Manila",
    "Marrakesh", "Melbourne", "Mexico City", "Montreal", "Mumbai", "Nairobi", "Oslo", "Paris", "Prague",
    "Reykjavik", "Rome", "Santiago", "Seoul", "Singapore", "Stockholm", "Sydney", "Tokyo", "Toronto", "Vienna",
    "Warsaw", "Zurich",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class NiahError(ValueError):
    """A haystack or config that cannot make the data; the message names the file or option."""


@dataclasses.dataclass(frozen=True)
class NiahConfig:
    """Needle-in-a-haystack settings. Every field is a flag of `python -m data_gen niah`."""

    haystack: str
    """where the haystack text comes from: 'mdqa:DIR' (the distractor passages of Lost-in-the-Middle files) or
    'txt:DIR' (every *.txt file under DIR)"""
    num_train: int = 350
    """number of training examples (train.jsonl)"""
    num_eval: int = 150
    """number of held-out examples (eval.jsonl)"""
    context_tokens: int = 4000
    """the context (haystack and needle) has at most this many tokens, counted with --tokenizer"""
    depths: str = "0..100"
    """needle depths in percent of the context, one drawn per example: a range 'LO..HI' (every integer in it) or a
    comma-separated list, e.g. '0,25,50,75,100'"""

    def validate(self) -> None:
        if self.num_train < 0 or self.num_eval < 0:
            raise NiahError("num_train and num_eval must be >= 0")
        if self.context_tokens < 64:
            raise NiahError(f"context_tokens must be at least 64, got {self.context_tokens}")
        parse_depths(self.depths)


def parse_depths(spec: str) -> list[int]:
    """'LO..HI' -> [LO, ..., HI]; 'a,b,c' -> [a, b, c]; every depth an integer percent in 0..100."""
    try:
        if ".." in spec:
            lo, hi = (int(x) for x in spec.split(".."))
            depths = list(range(lo, hi + 1))
        else:
            depths = [int(x) for x in spec.split(",")]
    except ValueError:
        raise NiahError(f"--depths must be 'LO..HI' or a comma-separated list of integers, got {spec!r}") from None
    if not depths or not all(0 <= d <= 100 for d in depths):
        raise NiahError(f"--depths must name percents between 0 and 100, got {spec!r}")
    return depths


# ---------------------------------------------------------------------------------------------- haystacks


@dataclasses.dataclass
class Haystack:
    """Documents as lists of sentences, and what generation.json records about where they came from."""

    documents: list[list[str]]
    info: dict


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` with whitespace collapsed: a sentence ends at '.', '!' or '?' followed by whitespace."""
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def _mdqa_passages(folder: pathlib.Path) -> tuple[list[str], int, list[str]]:
    """(distractor passage texts in file order without repeats, passages left out, files read)."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    kept: dict[str, None] = {}
    excluded: set[str] = set()
    for path in files:
        for lineno, row in read_jsonl(path, NiahError):
            ctxs = row.get("ctxs") if isinstance(row, dict) else None
            if not isinstance(ctxs, list):
                raise NiahError(f"{path}:{lineno}: an MDQA row needs a 'ctxs' list of passages")
            for j, ctx in enumerate(ctxs):
                text = ctx.get("text") if isinstance(ctx, dict) else None
                if not isinstance(text, str) or not isinstance(ctx.get("hasanswer"), bool):
                    raise NiahError(f"{path}:{lineno}: ctxs[{j}] needs a string 'text' and a boolean 'hasanswer' "
                                    "(without it a passage might hold an eval answer)")
                if ctx["hasanswer"] or ctx.get("isgold", False):
                    excluded.add(text)
                else:
                    kept[text] = None
    # A passage flagged anywhere is left out everywhere.
    return [t for t in kept if t not in excluded], len(excluded), [p.name for p in files]


def read_haystack(spec: str) -> Haystack:
    """The documents `spec` ('mdqa:DIR' or 'txt:DIR') names; NiahError for anything else or an empty corpus."""
    kind, _, where = spec.partition(":")
    folder = pathlib.Path(where)
    if kind not in ("mdqa", "txt") or not where:
        raise NiahError(f"--haystack must be 'mdqa:DIR' or 'txt:DIR', got {spec!r}")
    if not folder.is_dir():
        raise NiahError(f"--haystack {spec}: {folder} is not a folder")
    info: dict = {"kind": kind, "path": str(folder)}
    if kind == "mdqa":
        texts, excluded, files = _mdqa_passages(folder)
        info.update(files=files, excluded_passages=excluded)
    else:
        paths = sorted(folder.rglob("*.txt"))
        texts = []
        for path in paths:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise NiahError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__})") from None
        info.update(files=[p.relative_to(folder).as_posix() for p in paths])
    documents = [s for s in (split_sentences(t) for t in texts) if s]
    if not documents:
        raise NiahError(f"--haystack {spec}: no text found (mdqa: *.jsonl[.gz] files with distractor passages; "
                        "txt: *.txt files)")
    digest = hashlib.sha256()
    for doc in documents:
        digest.update("\n".join(doc).encode() + b"\0")
    info.update(documents=len(documents), sentences=sum(map(len, documents)), sha256=digest.hexdigest())
    return Haystack(documents, info)


# ---------------------------------------------------------------------------------------------- examples


class _Counter:
    """Token counts of haystack sentences, each counted once."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self._cache = tokenizer, {}

    def __call__(self, text: str) -> int:
        if text not in self._cache:
            self._cache[text] = len(self.tokenizer.encode(text))
        return self._cache[text]


def _render(units: list[tuple[str, str]]) -> str:
    """Sentences and the separator after each (' ' inside a document, a blank line between documents)."""
    return "".join(s + sep for s, sep in units).rstrip()


def _fill(rng: random.Random, haystack: Haystack, budget: int, count: _Counter) -> list[tuple[str, str]]:
    """Whole sentences of documents drawn at random (each at most once), in order, until the next one would pass
    `budget` tokens."""
    units, used, total = [], set(), 0
    while len(used) < len(haystack.documents):
        d = rng.randrange(len(haystack.documents))
        if d in used:
            continue
        used.add(d)
        for sentence in haystack.documents[d]:
            n = count(sentence)
            if total + n > budget:
                return units
            units.append((sentence, " "))
            total += n
        units[-1] = (units[-1][0], "\n\n")
    return units


def _with_needle(units: list[tuple[str, str]], at: int, needle: str) -> list[tuple[str, str]]:
    """The needle as a sentence of its own before units[at] (at the end when at == len(units))."""
    if at == len(units):
        return [*units[:-1], (units[-1][0], " "), (needle, "")] if units else [(needle, "")]
    return [*units[:at], (needle, " "), *units[at:]]


def generate_niah_split(cfg: NiahConfig, haystack: Haystack, seed: int, split: str, n: int, *,
                        tokenizer: Tokenizer | None = None, progress: bool = True) -> Iterator[dict]:
    """Yield n chat records {"messages": [...], "meta": {...}} for one split, deterministically.

    meta: id, task ("niah"), split, index, seed, depth (the requested percent), needle_depth (the fraction of the
    haystack's tokens before the needle, as counted), context_tokens, city, number, haystack (kind), num_tokens
    (the whole chat with `tokenizer`, default Mistral's).
    """
    tokenizer = get_tokenizer(tokenizer)
    count = _Counter(tokenizer)
    depths = parse_depths(cfg.depths)
    rng = random.Random(f"needles/niah/seed={seed}/{split}")
    for i in tqdm.trange(n, desc=f"generating {split}", unit="example", disable=not progress):
        city, depth = rng.choice(CITIES), rng.choice(depths)
        number = rng.randint(10**6, 10**7 - 1)
        needle = NEEDLE.format(city=city, number=number)
        units = _fill(rng, haystack, cfg.context_tokens - count(needle), count)
        if not units:
            raise NiahError(f"--context-tokens {cfg.context_tokens} is too small for the needle and one sentence")
        while str(number) in _render(units):  # the answer must appear once, in the needle
            number = rng.randint(10**6, 10**7 - 1)
            needle = NEEDLE.format(city=city, number=number)
        while True:  # sentence counts add up only approximately: drop sentences until the context fits
            ends = [0]
            for sentence, _ in units:
                ends.append(ends[-1] + count(sentence))
            at = min(range(len(ends)), key=lambda k: abs(ends[k] - depth / 100 * ends[-1]))
            context = _render(_with_needle(units, at, needle))
            context_tokens = len(tokenizer.encode(context))
            if context_tokens <= cfg.context_tokens or len(units) == 1:
                break
            units = units[:-1]
        before = len(tokenizer.encode(_render(units[:at]))) if at else 0
        user = f"{INSTRUCTION}\n\n{context}\n\n{QUESTION.format(city=city)}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": needle}]
        meta = {"id": f"niah-seed{seed}-{split}-{i:05d}", "task": "niah", "split": split, "index": i, "seed": seed,
                "depth": depth, "needle_depth": round(before / max(1, len(tokenizer.encode(_render(units)))), 4),
                "context_tokens": context_tokens, "city": city, "number": number, "haystack": haystack.info["kind"],
                "num_tokens": int(tokenizer.encode_chat(messages).input_ids.size)}
        yield {"messages": messages, "meta": meta}


def generate_niah(cfg: NiahConfig, seed: int, out_dir: str | pathlib.Path, *, tokenizer: Tokenizer | None = None,
                  progress: bool = True) -> dict:
    """Write out_dir/train.jsonl, eval.jsonl and generation.json (config, seed, haystack, tokenizer, token
    statistics); returns the latter. The files feed `python -m data_gen shards` as they are."""
    cfg.validate()
    tokenizer = get_tokenizer(tokenizer)
    haystack = read_haystack(cfg.haystack)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {split: write_split(out, split, generate_niah_split(cfg, haystack, seed, split, n, tokenizer=tokenizer,
                                                                progress=progress))
             for split, n in (("train", cfg.num_train), ("eval", cfg.num_eval))}
    return write_generation(out, {"generator": "data_gen niah", "seed": seed, "config": dataclasses.asdict(cfg),
                                  "haystack": haystack.info, "tokenizer": tokenizer.identity().to_json(),
                                  "splits": files})
