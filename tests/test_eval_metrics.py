"""Metrics and answer parsing against hand-computed cases (references: SQuAD / Lost in the Middle scripts and
lm-evaluation-harness's gsm8k, triviaqa and nq_open definitions, worked through by hand)."""

import math

import pytest

from eval import metrics as M
from eval.openqa import NQ_OPEN
from eval.synthetic import parse_answer, position_bin


@pytest.mark.parametrize("text, expected", [
    ("The  Quick, Brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("Röntgen's  rays.", "röntgens rays"),
    ("theater THE", "theater"),
    ("  ", ""),
])
def test_normalize_answer(text, expected):
    assert M.normalize_answer(text) == expected


def test_best_subspan_em():
    assert M.best_subspan_em("The answer is Wilhelm Röntgen.", ["Wilhelm Conrad Röntgen", "Röntgen"]) == 1.0
    assert M.best_subspan_em("Wilhelm Röntgen", ["Wilhelm Conrad Röntgen"]) == 0.0
    assert M.best_subspan_em("It was in DECEMBER, 1972", ["14 December 1972 UTC", "December 1972"]) == 1.0
    assert M.best_subspan_em("Bob", ["Bobby Scott"]) == 0.0


def test_first_line_is_what_mdqa_scores():
    assert M.first_line(" Paris\nDocument [1] says Berlin") == "Paris"
    assert M.first_line("\nParis") == "Paris"   # stripped first, as Lost in the Middle
    assert M.first_line(" \n\n Paris \nBerlin") == "Paris"


def test_squad_exact_match():
    assert M.squad_exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0
    assert M.squad_exact_match("Eiffel", ["Eiffel tower", "tower of Eiffel"]) == 0.0


def test_harness_exact_match_triviaqa_settings():
    kw = dict(ignore_case=True, ignore_punctuation=True)
    assert M.harness_exact_match("onion", ["Onion skins", "Onion"], **kw) == 1.0
    assert M.harness_exact_match("Onions", ["Onion"], **kw) == 0.0
    assert M.harness_exact_match("U.S.A", ["USA"], **kw) == 1.0
    assert M.harness_exact_match("The Beatles", ["Beatles"], **kw) == 0.0  # no article removal for TriviaQA


def test_harness_exact_match_nq_open_ignores_articles():
    kw = dict(ignore_case=True, ignore_punctuation=True, regexes_to_ignore=NQ_OPEN.em_regexes)
    assert M.harness_exact_match("The Beatles", ["Beatles"], **kw) == 1.0
    assert M.harness_exact_match("a dog", ["the dog"], **kw) == 1.0
    assert M.harness_exact_match("Theodore", ["odore"], **kw) == 0.0  # "The" inside a word stays


@pytest.mark.parametrize("text, strict, flexible", [
    ("She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18", "18"),
    ("#### -1,234.5 dollars", "-1,234.5", "-1,234.5"),
    ("The answer is 18", "[invalid]", "18"),
    ("She makes $18 a day. Total 20 or 36.", "[invalid]", "36."),
    ("answer: 7", "[invalid]", "7"),
    ("no numbers here", "[invalid]", "[invalid]"),
    ("#### 5\nQuestion 12", "5", "12"),
])
def test_gsm8k_extraction(text, strict, flexible):
    assert M.gsm8k_extract_strict(text) == strict
    assert M.gsm8k_extract_flexible(text) == flexible


@pytest.mark.parametrize("extracted, gold, score", [
    ("18", "Janet sells 9 eggs.\n#### 18", 1.0),
    ("$1,234", "work\n#### 1,234", 1.0),
    ("36.", "#### 36", 1.0),
    ("1234.00", "#### 1234", 0.0),
    ("-5", "#### 5", 0.0),
    ("[invalid]", "#### 18", 0.0),
])
def test_gsm8k_exact_match(extracted, gold, score):
    assert M.gsm8k_exact_match(extracted, gold) == score


def test_gsm8k_gold_number():
    assert M.gsm8k_gold_number("a\nb = <<2*3=6>>6\n#### 1,000") == "1000"


def test_mean_stderr():
    mean, stderr = M.mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and math.isclose(stderr, 0.25)  # sample var 0.25, / n=4, sqrt
    assert M.mean_stderr([]) == (None, None)
    assert M.mean_stderr([1.0]) == (1.0, None)
    assert M.summarize("acc", [0.0, 1.0]) == {"acc": 0.5, "acc_stderr": 0.5}


@pytest.mark.parametrize("text, key, expected", [
    ("The value of key 2831 is 5521 and it is in Dictionary [12].", 2831, (5521, 12)),
    ("The key that contains exactly the integers 986, 141, 163 is (141, 986, 163), its value is 2528 and it is in "
     "Dictionary [7].", (141, 986, 163), (2528, 7)),
    ("5521", 2831, (5521, None)),
    ("Key 2831 maps to 5521 in dictionary 4", 2831, (5521, 4)),
    ("Dictionary [3]", 2831, (None, 3)),
    ("I don't know.", 2831, (None, None)),
])
def test_synthetic_answer_parsing(text, key, expected):
    assert parse_answer(text, key) == expected


def test_position_bins():
    assert [position_bin(p, 85, 5) for p in (1, 17, 18, 85)] == ["1-17", "1-17", "18-34", "69-85"]
    assert position_bin(5, 5, 5) == "5-5"
