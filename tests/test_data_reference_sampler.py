"""`generate --sampler reference`, the authors' sampler, against statistics derived here from its description
(keys and values drawn independently: a digit count uniform over the range, then a uniform number of that many
digits; a distractor redrawn only when its key is the gold key or its value the gold value; every dictionary a
Python dict, so a key drawn twice for one dictionary leaves it one entry shorter), never from our code: the
expected number of repeated keys per prompt and the exact distribution of dictionary sizes, computed in closed
form. Prompts are parsed from their text alone. The formula's paper-simple value, 12.59 repeats a prompt, is what
the authors' published dict_builder.py gives (12.61 ± 0.02 over 20,000 of its draws, measured outside the suite).
"""

import collections
import json
import math
import re

import pytest

from data_gen import tasks
from data_gen.__main__ import main
from data_gen.shards import open_shards
from data_gen.tokenizer import get_tokenizer, mistral_tokenizer

LINE = re.compile(r"Dictionary \[(\d+)\] \{(.*)\}")
NO_BUDGET = 10**7  # so that no draw is redrawn for length: the statistics are those of the sampler itself


def _parse(prompt: str) -> tuple[list[list[tuple[int, int]]], int]:
    """(dictionaries as lists of (key, value), asked key) from the prompt text."""
    body = prompt.split("\n\n")[1]
    dicts = []
    for i, line in enumerate(body.split("\n"), start=1):
        m = LINE.fullmatch(line)
        assert m and int(m.group(1)) == i, line
        dicts.append([tuple(map(int, e.split(": "))) for e in m.group(2).split(", ")])
    return dicts, int(re.search(r"Report the value of key (\d+) and", prompt).group(1))


def _repeats(dicts) -> int:
    """Entries whose key already appeared earlier in the prompt."""
    keys = [k for d in dicts for k, _ in d]
    return len(keys) - len(set(keys))


# ------------------------------------------------------------------------------------- the spec, in closed form


def _blocks(digits: tuple[int, int]) -> list[tuple[int, float]]:
    """(how many numbers, probability of each) per digit count: 1 digit is 1..9, d digits 10^(d-1)..10^d - 1."""
    lo, hi = digits
    return [(10**d - 10 ** (d - 1), 1 / (hi - lo + 1) / (10**d - 10 ** (d - 1))) for d in range(lo, hi + 1)]


def _distractor_blocks(blocks, gold_block: int) -> list[tuple[int, float]]:
    """A distractor key is any key but the gold one, with the remaining probabilities renormalised."""
    p_gold = blocks[gold_block][1]
    return [(n - (b == gold_block), p / (1 - p_gold)) for b, (n, p) in enumerate(blocks)]


def _mean_distinct(draws: int, blocks) -> float:
    return sum(n * (1 - (1 - p) ** draws) for n, p in blocks)


def _distinct_pmf(draws: int, blocks) -> dict[int, float]:
    """Exact distribution of the number of distinct keys among `draws` draws (keys of a block are exchangeable, so
    the state is how many of each block were seen)."""
    states = {tuple(0 for _ in blocks): 1.0}
    for _ in range(draws):
        nxt = collections.defaultdict(float)
        for seen, prob in states.items():
            for b, (n, p) in enumerate(blocks):
                new = list(seen)
                new[b] += 1
                nxt[tuple(new)] += prob * (n - seen[b]) * p
                nxt[seen] += prob * seen[b] * p
        states = nxt
    pmf = collections.defaultdict(float)
    for seen, prob in states.items():
        pmf[sum(seen)] += prob
    return {k: p for k, p in pmf.items() if p > 0}


def _sum_pmf(count: int, lo: int, hi: int) -> dict[int, float]:
    """Distribution of the sum of `count` independent uniform integers in lo..hi."""
    pmf = {0: 1.0}
    for _ in range(count):
        nxt = collections.defaultdict(float)
        for total, prob in pmf.items():
            for s in range(lo, hi + 1):
                nxt[total + s] += prob / (hi - lo + 1)
        pmf = nxt
    return pmf


def expected_repeats(cfg: tasks.TaskConfig) -> float:
    """E[entries of the prompt - distinct keys of the prompt]. Entries: the gold one, plus the distinct keys of
    each dictionary's distractor draws; distinct keys: the gold key plus the distinct keys of all distractor draws
    (no distractor is the gold key)."""
    blocks = _blocks(cfg.key_digits)
    others = _sum_pmf(cfg.num_dicts - 1, *cfg.dict_size_range)
    sizes = range(cfg.dict_size_range[0], cfg.dict_size_range[1] + 1)
    total = 0.0
    for gold_block in range(len(blocks)):
        d = _distractor_blocks(blocks, gold_block)
        entries = 1 + _mean_distinct(cfg.gold_dict_size - 1, d) + (cfg.num_dicts - 1) * sum(
            _mean_distinct(s, d) for s in sizes) / len(sizes)
        distinct = 1 + sum(p * _mean_distinct(cfg.gold_dict_size - 1 + m, d) for m, p in others.items())
        total += (entries - distinct) / len(blocks)
    return total


def expected_sizes(cfg: tasks.TaskConfig) -> tuple[dict[int, float], dict[int, float]]:
    """Exact size distributions of (a non-gold dictionary, the gold dictionary)."""
    blocks = _blocks(cfg.key_digits)
    sizes = range(cfg.dict_size_range[0], cfg.dict_size_range[1] + 1)
    other, gold = collections.defaultdict(float), collections.defaultdict(float)
    for gold_block in range(len(blocks)):
        d = _distractor_blocks(blocks, gold_block)
        for s in sizes:
            for k, p in _distinct_pmf(s, d).items():
                other[k] += p / len(blocks) / len(sizes)
        for k, p in _distinct_pmf(cfg.gold_dict_size - 1, d).items():
            gold[k + 1] += p / len(blocks)
    return dict(other), dict(gold)


def test_closed_forms_by_hand():
    """The helpers on cases small enough to check by hand."""
    assert _blocks((1, 1)) == [(9, pytest.approx(1 / 9))]
    pmf = _distinct_pmf(2, [(4, 0.25)])  # two draws among four equally likely keys: the same key with p = 1/4
    assert pmf == pytest.approx({1: 0.25, 2: 0.75})
    assert _mean_distinct(2, [(4, 0.25)]) == pytest.approx(1.75)
    assert _sum_pmf(2, 3, 4) == pytest.approx({6: 0.25, 7: 0.5, 8: 0.25})
    # paper-simple: 3-4 digit keys, 85 dictionaries of 3-4 entries (gold: 3)
    assert expected_repeats(tasks.PRESETS["paper-simple"]) == pytest.approx(12.588, abs=0.001)


# ------------------------------------------------------------------------------------------------ the tests


def _records(cfg, n, seed=0, split="train", tokenizer=None):
    return list(tasks.generate_split(cfg, seed, split, n, progress=False, tokenizer=tokenizer))


def _assert_mean(values, expected):
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert abs(mean - expected) < 4 * sd / math.sqrt(len(values)) + 1e-9, (mean, expected, sd)
    return mean


def test_paper_setting_repeats_keys_as_the_authors_sampler():
    cfg = tasks.PRESETS["paper-simple"].replace(max_tokens=NO_BUDGET)
    reference = [_parse(r["messages"][0]["content"])[0] for r in _records(cfg.replace(sampler="reference"), 300)]
    _assert_mean([_repeats(d) for d in reference], expected_repeats(cfg))  # 12.59
    ours = [_parse(r["messages"][0]["content"])[0] for r in _records(cfg, 60)]
    assert all(_repeats(d) == 0 for d in ours) and all(len(d) in (3, 4) for p in ours for d in p[1:])


def test_dictionary_sizes_follow_the_exact_distribution():
    """A small key space (1-2 digit keys: 99 of them) makes collisions common: the sizes of 40 x 200 dictionaries
    against their exact distribution (chi-square, p = 0.001), the repeats against their expectation."""
    cfg = tasks.TaskConfig(num_dicts=40, gold_dict_size=3, dict_size_range=(3, 4), key_digits=(1, 2),
                           value_digits=(3, 4), max_tokens=NO_BUDGET, sampler="reference")
    records = _records(cfg, 200, seed=3)
    prompts = [_parse(r["messages"][0]["content"]) for r in records]
    other, gold = collections.Counter(), collections.Counter()
    for (dicts, key), rec in zip(prompts, records, strict=True):
        holder = [i for i, d in enumerate(dicts, start=1) if key in dict(d)]
        assert holder == [rec["meta"]["gold_dict"]]
        gold[len(dicts[holder[0] - 1])] += 1
        other.update(len(d) for i, d in enumerate(dicts, start=1) if i != holder[0])
        assert all(1 <= k <= 99 for d in dicts for k, _ in d)  # one digit is 1..9 as in the authors' code, never 0
    p_other, p_gold = expected_sizes(cfg)
    assert p_other[2] > 0.03 and sum(p_other.values()) == pytest.approx(1)
    n = sum(other.values())
    bins = [(1, 2), (3,), (4,)]  # sizes 1 and 2 together (size 1 is rare)
    observed = [sum(other[k] for k in b) for b in bins]
    expected = [n * sum(p_other.get(k, 0) for k in b) for b in bins]
    assert sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True)) < 13.82  # 2 dof
    assert other[2] > 0 and gold[2] > 0 and set(gold) <= {2, 3}
    assert abs(gold[2] - 200 * p_gold[2]) < 4 * math.sqrt(200 * p_gold[2]) + 1
    _assert_mean([_repeats(d) for d, _ in prompts], expected_repeats(cfg))


def test_reference_prompts_in_the_paper_format_and_budget():
    """paper-simple with the template: the gold key once, its value nowhere else as a value, the answer right,
    the prompt (as the model is given it) under 4096 - 100 tokens, the gold positions those of ours."""
    cfg = tasks.PRESETS["paper-simple"].replace(template=True, sampler="reference")
    records = _records(cfg, 40, seed=1)
    tok = mistral_tokenizer()
    for rec in records:
        meta, (user, assistant) = rec["meta"], rec["messages"]
        dicts, key = _parse(user["content"])
        assert len(dicts) == 85
        entries = [(i, k, v) for i, d in enumerate(dicts, start=1) for k, v in d]
        gold = [(i, v) for i, k, v in entries if k == key]
        assert len(gold) == 1
        i, value = gold[0]
        assert [v for _, _, v in entries].count(value) == 1
        assert all(re.fullmatch(r"[1-9]\d{2,3}", str(x)) for _, k, v in entries for x in (k, v))
        assert assistant["content"] == f"The value of key {key} is {value} and it is in Dictionary [{i}]."
        assert (meta["gold_key"], meta["gold_value"], meta["gold_dict"]) == (key, value, i)
        assert meta["id"].startswith("simple-reference-template-seed1-train-") and meta["sampler"] == "reference"
        assert meta["prompt_tokens"] == len(tok.encode_prompt(user["content"])) < 3996
        assert meta["num_tokens"] == tok.encode_chat(rec["messages"]).input_ids.size
    assert sum(_repeats(_parse(r["messages"][0]["content"])[0]) for r in records) > 0
    ours = _records(cfg.replace(sampler="ours"), 40, seed=1)
    assert [r["meta"]["gold_dict"] for r in ours] == [r["meta"]["gold_dict"] for r in records]


def test_command_records_the_sampler(tmp_path):
    main(["generate", "--preset", "demo-simple", "--sampler", "reference", "--num-train", "5", "--num-eval", "2",
          "--max-tokens", "400", "--out", str(tmp_path), "--no-progress"])
    info = json.loads((tmp_path / "generation.json").read_text())
    assert info["config"]["sampler"] == "reference"
    assert info["budget_check"]["counts"] == "prompt" and info["budget_check"]["limit"] == 400 - 100
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["meta"]["prompt_tokens"] < 300 for line in lines)
    main(["shards", "--input", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "s"), "--no-progress"])
    shards = open_shards(tmp_path / "s")
    ids = sorted(b.source[i]["id"] for b in shards.buckets for i in range(len(b.source)))
    assert ids == [f"simple-reference-seed0-train-{i:05d}" for i in range(5)]
    assert shards.manifest["metadata"]["inputs"][0]["generation"]["config"]["sampler"] == "reference"
    with pytest.raises(ValueError, match="sampler 'ours'"):  # a follow-up about a repeated key would be ambiguous
        next(tasks.multi_question_split(tasks.PRESETS["demo-simple"].replace(sampler="reference"), 0, "train", 1, 2))
    with pytest.raises(SystemExit, match="^error: sampler 'reference' exists for the simple task only"):
        main(["generate", "--preset", "paper-multisubkey", "--sampler", "reference", "--out", str(tmp_path / "m"),
              "--no-progress"])
    with pytest.raises(SystemExit, match="^error: config does not fit the prompt budget max_tokens - 100 = 3900"):
        main(["generate", "--preset", "paper-simple", "--sampler", "reference", "--max-tokens", "4000",
              "--num-dicts", "150", "--out", str(tmp_path / "b"), "--no-progress"])


def test_prompt_budget_with_another_tokenizer(tmp_path):
    """The budget counts the prompt in the tokenizer's own chat format (checked with transformers)."""
    from test_data_hf_tokenizer import SMOLLM2, make_folder
    from transformers import AutoTokenizer

    folder = make_folder(tmp_path / "smol", SMOLLM2)
    ref = AutoTokenizer.from_pretrained(folder)
    cfg = tasks.PRESETS["demo-simple"].replace(max_tokens=400, sampler="reference")
    for rec in _records(cfg, 12, tokenizer=get_tokenizer(folder)):
        prompt = ref.apply_chat_template(rec["messages"][:1], add_generation_prompt=True, return_dict=False)
        assert rec["meta"]["prompt_tokens"] == len(prompt) < 300
        assert rec["meta"]["num_tokens"] == len(ref.apply_chat_template(rec["messages"], return_dict=False))
