"""Answer normalisation and scoring, as the reference implementations define them.

- `normalize_answer` / `best_subspan_em`: the SQuAD normalisation and the substring match of "Lost in the
  Middle" (nelson-liu/lost-in-the-middle, `metrics.py`), used for MDQA.
- `harness_exact_match`: lm-evaluation-harness's `exact_match` (regexes removed first, then case, then
  punctuation; equality; any reference counts), used for TriviaQA, NQ-Open and GSM8K.
- GSM8K answer extraction: the harness's "strict-match" (`#### <number>`) and "flexible-extract" (last
  number in the text) filters.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD: lower case, drop ASCII punctuation, drop articles, collapse whitespace (in that order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def best_subspan_em(prediction: str, ground_truths: Iterable[str]) -> float:
    """1.0 if any normalised gold answer occurs inside the normalised prediction."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(gt) in pred for gt in ground_truths))


def first_line(text: str) -> str:
    """What MDQA scores: the stripped output's first line, stripped, as Lost in the Middle (its generation
    scripts strip the response, `evaluate_qa_responses.py` keeps what precedes the first newline), so that a
    model cannot win by copying the documents (the gold answer is always somewhere in them) and an answer
    that opens with a newline still counts."""
    return text.strip().split("\n")[0].strip()


def squad_exact_match(prediction: str, ground_truths: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer (alias EM)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gt) for gt in ground_truths))


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def harness_exact_match(prediction: str, references: Iterable[str], *, ignore_case: bool = False,
                        ignore_punctuation: bool = False, regexes_to_ignore: Sequence[str] = ()) -> float:
    """lm-evaluation-harness `exact_match` against several references (1.0 if any matches)."""

    def canon(s: str) -> str:
        for pattern in regexes_to_ignore:
            s = re.sub(pattern, "", s)
        if ignore_case:
            s = s.lower()
        if ignore_punctuation:
            s = s.translate(_PUNCT_TABLE)
        return s

    pred = canon(prediction)
    return float(any(pred == canon(ref) for ref in references))


# --- GSM8K (lm-evaluation-harness task `gsm8k`, version 3) ---------------------------------------------
GSM8K_INVALID = "[invalid]"
_GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def gsm8k_extract_strict(text: str) -> str:
    """The number after the first `#### ` (the format the few-shot answers teach), else "[invalid]"."""
    found = _GSM8K_STRICT.findall(text)
    return found[0].strip() if found else GSM8K_INVALID


def gsm8k_extract_flexible(text: str) -> str:
    """The last number-like span anywhere in the text, else "[invalid]"."""
    found = _GSM8K_FLEXIBLE.findall(text)
    if not found:
        return GSM8K_INVALID
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else GSM8K_INVALID


def gsm8k_exact_match(extracted: str, gold_answer: str) -> float:
    """Compare an extracted number with the full gold answer ("...#### 1,234"): commas, "$", everything up
    to "#### " and a trailing "." are removed from both, case is ignored, then strings must be equal."""
    return harness_exact_match(extracted, [gold_answer], ignore_case=True, regexes_to_ignore=GSM8K_IGNORE)


def gsm8k_gold_number(gold_answer: str) -> str:
    """The final number of a GSM8K reference answer, as the metric sees it (for predictions files)."""
    s = gold_answer
    for pattern in GSM8K_IGNORE:
        s = re.sub(pattern, "", s)
    return s


# --- aggregation -------------------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator): the spread of repeated runs (seeds);
    None where undefined (no values; a single value)."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample std / sqrt(n), as the harness reports); None where undefined
    (no values; a single value), so that results.json stays strict JSON."""
    mean, sd = mean_sd(values)
    return mean, None if sd is None else sd / math.sqrt(len(values))


def summarize(name: str, values: Sequence[float]) -> dict[str, float | None]:
    """`{name: mean, name_stderr: stderr}`: the form every task writes into results.json."""
    mean, stderr = mean_stderr(values)
    return {name: mean, f"{name}_stderr": stderr}
