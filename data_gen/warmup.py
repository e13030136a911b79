"""Warm-up data for a model trained from scratch: the CPU demo's stand-in for a base model's pretraining.

Dictionary recall: one to a few dictionaries in the paper's syntax, then lines that state entries of them
again; the loss is on the values of those lines. The separator between a key and its value widens from
stage to stage (`SEPARATORS`): "4" + "79" -> "4:79" -> "4: 79", the last being the paper's format.

Why stages: a two-layer model learns recall in a couple of hundred steps when the value directly follows
its key (a previous-token head feeding an induction head), but stays at chance for thousands of steps when
two tokens (":", "▁") separate them, as in the paper's dictionaries: it must find heads that look two and
three tokens back, and nothing rewards a head for it until the lookup already works. Each stage moves those
heads by one token, and the step from the last stage to the paper's chats is then short (docs/demo.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from data_gen.shards import TokenizedExample
from data_gen.tokenizer import Tokenizer, get_tokenizer

SEPARATORS = ("", ":", ": ")
"""key-value separators of the warm-up stages, the paper's last"""


def _digits(rng: np.random.Generator, digits: int, size: int, *, distinct: bool) -> np.ndarray:
    low, high = 10 ** (digits - 1), 10**digits
    return rng.choice(np.arange(low, high), size, replace=False) if distinct else rng.integers(low, high, size)


def _encode_with_spans(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """`tokenizer.encode_text(text)` and a mask True on the tokens of the character `spans`.

    A span's tokens lie between the ids of the text up to its start and up to its end, which must both be
    token prefixes of the whole text's ids (true when the span's edges are token edges, as for digits after
    ": " and before a line break; checked, so a tokenizer that merges them is refused, never mis-masked)."""
    ids = tokenizer.encode_text(text)
    mask = np.zeros(len(ids), bool)
    for start, end in spans:
        edges = []
        for cut in (start, end):
            head = tokenizer.encode_text(text[:cut])
            if ids[:len(head)] != head:
                raise ValueError(f"tokenizer {tokenizer.name!r} merges {text[cut - 1:cut + 1]!r} across a "
                                 "value's edge in the warm-up text, so the value's tokens cannot be masked")
            edges.append(len(head))
        mask[edges[0]:edges[1]] = True
    return np.asarray(ids, np.int32), mask


def dictionary_recall(seed: int, n: int, separator: str, *, max_dicts: int = 3, dict_sizes: tuple[int, int] = (2, 3),
                      key_digits: int = 1, value_digits: int = 2, questions: int = 8,
                      tokenizer: Tokenizer | None = None) -> Iterator[TokenizedExample]:
    """`n` warm-up sequences: 1..`max_dicts` dictionaries, a blank line, then up to `questions` lines
    "key<separator>value" about distinct keys of them, as plain text (`tokenizer.encode_text`: `<s>` first with
    the default Mistral tokenizer), loss on each line's value tokens."""
    if separator not in SEPARATORS:
        raise ValueError(f"separator {separator!r} is not one of the warm-up stages {SEPARATORS}")
    most = max_dicts * dict_sizes[1]
    if most > 9 * 10 ** (key_digits - 1):
        raise ValueError(f"{max_dicts} dictionaries of up to {dict_sizes[1]} entries need {most} distinct "
                         f"{key_digits}-digit keys; there are only {9 * 10 ** (key_digits - 1)}")
    tokenizer = get_tokenizer(tokenizer)
    rng = np.random.default_rng([seed, 0x5EC0, SEPARATORS.index(separator)])
    for i in range(n):
        sizes = rng.integers(dict_sizes[0], dict_sizes[1] + 1, rng.integers(1, max_dicts + 1))
        keys = _digits(rng, key_digits, int(sizes.sum()), distinct=True)
        values = _digits(rng, value_digits, int(sizes.sum()), distinct=False)
        entries = [f"{k}{separator}{v}" for k, v in zip(keys, values)]
        bounds = np.cumsum(sizes)[:-1]
        lines = [f"Dictionary [{d}] {{" + ", ".join(part) + "}"
                 for d, part in enumerate(np.split(np.asarray(entries), bounds), 1)]
        asked = [entries[j] for j in rng.permutation(len(entries))[:questions]]
        text = "\n".join(lines) + "\n\n" + "\n".join(asked)
        spans, end = [], len(text) - len("\n".join(asked)) - 1
        for line in asked:  # each asked line ends with its value
            end += 1 + len(line)
            spans.append((end - value_digits, end))
        ids, mask = _encode_with_spans(tokenizer, text, spans)
        yield TokenizedExample(f"recall{SEPARATORS.index(separator)}-seed{seed}-{i:05d}", ids, mask)
