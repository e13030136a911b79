"""The synthetic tasks: prompts are re-parsed independently of the generator and checked against the paper's
format and constraints; token counts use the real tokenizer; reproducibility is checked across processes."""

import collections
import json
import os
import pathlib
import random
import re
import subprocess
import sys

import pytest

from data_gen import tasks
from data_gen.chat import encode_chat

ROOT = pathlib.Path(__file__).resolve().parents[1]
INTRO = "Do a task using the list of dictionaries below.\n\n"
SIMPLE_Q = ("Above is a list of dictionaries such that each key and value is an integer. "
            "Report the value of key {k} and the dictionary it is in.")
SIMPLE_T = (" Answer in the following template:\n"
            "The value of key {k} is <fill-in-value> and it is in Dictionary [<fill-in-dictionary-name>].")
LINE = re.compile(r"Dictionary \[(\d+)\] \{(.*)\}")


def _read(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    tasks.generate(tasks.PRESETS["paper-simple"].replace(template=True), 0, out, preset="paper-simple", progress=False)
    return out


def _parse_simple(prompt: str, template: bool):
    """-> (dicts as lists of (key_str, value_str), asked key) from the prompt text alone."""
    assert prompt.startswith(INTRO)
    body, question = prompt[len(INTRO):].split("\n\n")
    key = re.search(r"Report the value of key (\d+) and", question).group(1)
    assert question == SIMPLE_Q.format(k=key) + (SIMPLE_T.format(k=key) if template else "")
    dicts = []
    for i, line in enumerate(body.split("\n"), start=1):
        m = LINE.fullmatch(line)
        assert m and int(m.group(1)) == i, line
        entries = [e.split(": ") for e in m.group(2).split(", ")]
        assert all(len(e) == 2 for e in entries), line
        dicts.append(entries)
    return dicts, key


def test_paper_simple_dataset(paper):
    cfg = tasks.PRESETS["paper-simple"]
    train, evals = _read(paper / "train.jsonl"), _read(paper / "eval.jsonl")
    assert (len(train), len(evals)) == (350, 150)
    for rec in train + evals:
        meta, (user, assistant) = rec["meta"], rec["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        dicts, key = _parse_simple(user["content"], template=True)
        assert len(dicts) == 85
        numbers = [x for d in dicts for e in d for x in e]
        assert all(re.fullmatch(r"[1-9]\d{2,3}", x) for x in numbers)  # 3-4 digits, no leading zero
        keys = [k for d in dicts for k, _ in d]
        assert len(keys) == len(set(keys)), "keys must be unique across all dictionaries"
        holder = [i for i, d in enumerate(dicts, start=1) if key in dict(d)]
        assert holder == [meta["gold_dict"]] == [meta["gold_position"]]
        value = dict(dicts[holder[0] - 1])[key]
        assert numbers.count(value) == 1 and numbers.count(key) == 1, "gold key and value appear exactly once"
        assert len(dicts[holder[0] - 1]) == cfg.gold_dict_size
        assert all(len(d) in (3, 4) for i, d in enumerate(dicts, start=1) if i != holder[0])
        assert assistant["content"] == f"The value of key {key} is {value} and it is in Dictionary [{holder[0]}]."
        assert (str(meta["gold_key"]), str(meta["gold_value"])) == (key, value)
        n = encode_chat(rec["messages"]).input_ids.size
        assert n == meta["num_tokens"] < 4096
    mean = sum(r["meta"]["num_tokens"] for r in train) / len(train)
    assert 3700 < mean < 4000  # the paper: about 3.9K tokens per prompt
    assert len({r["meta"]["id"] for r in train + evals}) == 500


def test_no_template_variant():
    cfg = tasks.PRESETS["paper-simple"]
    for rec in tasks.generate_split(cfg, 1, "train", 5, progress=False):
        _parse_simple(rec["messages"][0]["content"], template=False)


def _chi2(observed, expected):
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


def test_gold_positions_in_paper_dataset(paper):
    positions = [r["meta"]["gold_position"] for r in _read(paper / "train.jsonl")]
    counts = collections.Counter(positions)
    assert min(positions) >= 1 and max(positions) <= 85
    assert 17 <= counts[1] <= 30  # floor(0.05 * 350) forced first, plus ~4 by chance
    early = sum(counts[p] for p in range(1, 18))  # expected 17 + 10 + 323 * 17 / 85 = 91.6
    assert 70 <= early <= 115
    late = [p for p in positions if p > 17]  # only the uniform part lands here: 4 bins of 17 positions
    observed = [sum(1 for p in late if 18 + 17 * b <= p < 35 + 17 * b) for b in range(4)]
    assert _chi2(observed, [len(late) / 4] * 4) < 16.27  # p = 0.001, 3 degrees of freedom


def test_gold_position_distribution_exact():
    """Many fixed-seed draws of 350 positions against the distribution derived by hand from the spec."""
    cfg = tasks.PRESETS["paper-simple"]
    counts = collections.Counter()
    trials = 200
    for seed in range(trials):
        counts.update(tasks.gold_positions(cfg, 350, random.Random(seed)))
    uniform = (350 - 17 - 10) / 350 / 85
    p = {k: uniform + (10 / 350 / 17 if k <= 17 else 0) + (17 / 350 if k == 1 else 0) for k in range(1, 86)}
    assert abs(sum(p.values()) - 1) < 1e-12
    expected = [p[k] * 350 * trials for k in range(1, 86)]
    assert _chi2([counts[k] for k in range(1, 86)], expected) < 135.8  # p = 0.001, 84 degrees of freedom
    assert counts[1] >= 17 * trials


def test_byte_identical_across_processes(paper, tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "data_gen", "generate", "--preset", "paper-simple", "--seed", "0",
                    "--template", "--out", str(tmp_path), "--no-progress"], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    for name in ("train.jsonl", "eval.jsonl", "generation.json"):
        assert (tmp_path / name).read_bytes() == (paper / name).read_bytes(), name


def test_seeds_and_splits_differ():
    cfg = tasks.PRESETS["demo-simple"]
    a = [r["messages"] for r in tasks.generate_split(cfg, 0, "train", 5, progress=False)]
    b = [r["messages"] for r in tasks.generate_split(cfg, 1, "train", 5, progress=False)]
    c = [r["messages"] for r in tasks.generate_split(cfg, 0, "eval", 5, progress=False)]
    assert a != b and a != c


def test_demo_preset(tmp_path):
    cfg = tasks.PRESETS["demo-simple"]
    info = tasks.generate(cfg, 0, tmp_path, progress=False)
    records = _read(tmp_path / "train.jsonl")
    assert len(records) == cfg.num_train and info["splits"]["eval"]["num_samples"] == cfg.num_eval
    for rec in records:
        dicts, key = _parse_simple(rec["messages"][0]["content"], template=False)
        assert len(dicts) == cfg.num_dicts
        assert all(re.fullmatch(r"[1-9]\d", x) for d in dicts for e in d for x in e)
        assert rec["meta"]["num_tokens"] < cfg.max_tokens


def test_multisubkey():
    cfg = tasks.PRESETS["paper-multisubkey"].replace(template=True)
    records = list(tasks.generate_split(cfg, 0, "train", 30, progress=False))
    entry = re.compile(r"\((\d+(?:, \d+)*)\): (\d+)")
    for rec in records:
        meta, prompt, answer = rec["meta"], rec["messages"][0]["content"], rec["messages"][1]["content"]
        asked = re.search(r"exactly the integers ([\d, ]+) \(in any order\)", prompt).group(1).split(", ")
        body = prompt[len(INTRO):].split("\n\n")[0]
        dicts = []
        for i, line in enumerate(body.split("\n"), start=1):
            m = LINE.fullmatch(line)
            assert m and int(m.group(1)) == i
            items = entry.findall(m.group(2))
            assert ", ".join(f"({k}): {v}" for k, v in items) == m.group(2)
            dicts.append([(tuple(k.split(", ")), v) for k, v in items])
        assert len(dicts) == 49
        gold = set(asked)
        matches = [(i, k, v) for i, d in enumerate(dicts, start=1) for k, v in d if set(k) == gold]
        assert len(matches) == 1, "exactly one key has exactly the asked subkeys"
        i, key, value = matches[0]
        assert list(key) != asked, "the question lists the subkeys in shuffled order"
        others = [k for d in dicts for k, _ in d if k != key]
        assert len({frozenset(k) for k in others}) == len(others), "keys are unique"
        assert not any(gold <= set(k) for k in others), "no other key contains all gold subkeys"
        sharing = [k for k in others if gold & set(k)]
        assert len(sharing) == meta["num_sharing_keys"] >= cfg.min_sharing_keys
        assert all(3 <= len(k) <= 4 and len(set(k)) == len(k) for d in dicts for k, _ in d)
        values = [v for d in dicts for _, v in d]
        subkeys = [s for d in dicts for k, _ in d for s in k]
        assert values.count(value) == 1 and value not in subkeys
        lead = f"The key that contains exactly the integers {', '.join(asked)} is"
        assert answer == f"{lead} ({', '.join(key)}), its value is {value} and it is in Dictionary [{i}]."
        assert prompt.endswith(f" Answer in the following template:\n{lead} <fill-in-key>, its value is "
                               "<fill-in-value> and it is in Dictionary [<fill-in-dictionary-name>].")
        assert (meta["gold_dict"], meta["gold_value"], [str(s) for s in meta["gold_key"]]) == (i, int(value), list(key))
        assert encode_chat(rec["messages"]).input_ids.size == meta["num_tokens"] < cfg.max_tokens
    shared_counts = [r["meta"]["num_sharing_keys"] for r in records]
    assert sum(shared_counts) / len(shared_counts) > 10  # share_prob 0.15 of ~146 distractor keys


def test_budget_refused_up_front():
    with pytest.raises(tasks.BudgetError, match="--num-dicts to about"):
        tasks.check_budget(tasks.PRESETS["paper-simple"].replace(num_dicts=120))
    with pytest.raises(tasks.BudgetError, match="smallest possible example"):
        tasks.check_budget(tasks.PRESETS["paper-simple"].replace(num_dicts=200))
    with pytest.raises(ValueError, match="dict_size_range"):
        tasks.check_budget(tasks.PRESETS["paper-simple"].replace(dict_size_range=(4, 3)))


def test_cli_refuses_bad_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "data_gen", "generate", "--preset", "paper-simple",
                             "--num-dicts", "150", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "error: config does not fit max_tokens=4096" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "train.jsonl").exists()


@pytest.mark.parametrize("template", [False, True])
def test_multi_question_chats(template):
    """Every answer (first and follow-ups) is what the prompt's dictionaries say, parsed from the text alone;
    no key is asked twice; as many questions as asked for (or as the dictionaries have keys)."""
    cfg = tasks.TaskConfig(num_dicts=3, gold_dict_size=2, dict_size_range=(2, 3), key_digits=(2, 2),
                           value_digits=(2, 2), template=template)
    answer = re.compile(r"The value of key (\d+) is (\d+) and it is in Dictionary \[(\d+)\]\.")
    records = list(tasks.multi_question_split(cfg, 7, "train", 40, questions=4))
    assert len(records) == 40
    for i, rec in enumerate(records):
        messages = rec["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        assert rec["meta"] == {"id": f"demo-multi-seed7-train-{i:05d}", "num_questions": 4}
        dicts, first_key = _parse_simple(messages[0]["content"], template)
        where = {k: (v, d) for d, entries in enumerate(dicts, start=1) for k, v in entries}
        asked = [first_key]
        assert answer.fullmatch(messages[1]["content"]).groups() == (first_key, where[first_key][0],
                                                                     str(where[first_key][1]))
        for question, reply in zip(messages[2::2], messages[3::2]):
            key = re.fullmatch(r"Report the value of key (\d+) and the dictionary it is in\..*", question["content"],
                               re.DOTALL).group(1)
            expected = f"Report the value of key {key} and the dictionary it is in."
            if template:
                expected += SIMPLE_T.format(k=key)
            assert question["content"] == expected
            assert answer.fullmatch(reply["content"]).groups() == (key, where[key][0], str(where[key][1]))
            asked.append(key)
        assert len(set(asked)) == len(asked)
    # Fewer keys than questions: every key once, then stop.
    few = list(tasks.multi_question_split(cfg.replace(num_dicts=1, gold_dict_size=3), 0, "eval", 5, questions=9))
    assert [r["meta"]["num_questions"] for r in few] == [3] * 5
    assert records == list(tasks.multi_question_split(cfg, 7, "train", 40, questions=4))
    assert records != list(tasks.multi_question_split(cfg, 8, "train", 40, questions=4))
    with pytest.raises(ValueError, match="simple task"):
        next(tasks.multi_question_split(cfg.replace(task="multisubkey"), 0, "train", 1, 2))
