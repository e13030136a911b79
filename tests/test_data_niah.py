"""`python -m data_gen niah`: needle-in-a-haystack baseline data. On a hand-made corpus of numbered sentences the
prompts are taken apart from their text alone: the haystack is whole corpus sentences, the needle one sentence of
its own at the asked depth, the context within the token budget. On the shared MDQA files: no eval question,
and no gold or answer-bearing passage, ever reaches a prompt (read here straight from the files). The output
goes through `python -m data_gen shards` unchanged."""

import collections
import gzip
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_gen.__main__ import main
from data_gen.niah import NiahConfig, generate_niah
from data_gen.shards import open_shards
from data_gen.tokenizer import get_tokenizer, mistral_tokenizer

NEEDLE = re.compile(r"The special magic number of ([A-Z][a-zA-Z ]+) is (\d{7})\.")
INTRO = "Read the text below and answer the question after it.\n\n"


def _read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, set[str]]:
    """Six files of 30 distinct sentences each ("Sentence 7 of file c ..."), one folder deeper for two of them."""
    root = tmp_path_factory.mktemp("corpus")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    sentences = set()
    for f, name in enumerate("abcdef"):
        lines = [f"Sentence {k} of file {name} talks about {' '.join(words[(k + f) % 10:][:3 + k % 5])}."
                 for k in range(30)]
        sentences.update(lines)
        path = root / ("sub" if f >= 4 else "") / f"{name}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(" ".join(lines[:15]) + "\n" + " ".join(lines[15:]) + "\n")
    (root / "notes.md").write_text("Never part of the haystack.")
    return root, sentences


def _parts(record) -> tuple[list[str], int, str, str]:
    """(context sentences in order, index of the needle among them, city, number) from the prompt text."""
    user, answer = (m["content"] for m in record["messages"])
    assert user.startswith(INTRO)
    context, question = user[len(INTRO):].rsplit("\n\n", 1)
    city, number = NEEDLE.fullmatch(answer).groups()
    assert question == f"Question: What is the special magic number of {city} mentioned in the text?"
    pieces = [s for s in re.split(r"(?<=\.)\s+", context) if s]
    needles = [i for i, s in enumerate(pieces) if s == answer]
    assert len(needles) == 1 and user.count(number) == 1
    return pieces, needles[0], city, number


def test_needles_in_a_text_corpus(tmp_path, corpus):
    root, sentences = corpus
    cfg = NiahConfig(haystack=f"txt:{root}", num_train=40, num_eval=10, context_tokens=300, depths="0,50,100")
    info = generate_niah(cfg, 3, tmp_path, progress=False)
    assert info["haystack"]["files"] == ["a.txt", "b.txt", "c.txt", "d.txt", "sub/e.txt", "sub/f.txt"]
    tok = mistral_tokenizer()
    longest = max(len(tok.encode(s)) for s in sentences)
    records = _read(tmp_path / "train.jsonl") + _read(tmp_path / "eval.jsonl")
    assert len(records) == 50 and len({r["meta"]["id"] for r in records}) == 50
    seen_depths = collections.Counter()
    for rec in records:
        meta = rec["meta"]
        pieces, at, city, number = _parts(rec)
        haystack = pieces[:at] + pieces[at + 1:]
        assert set(haystack) <= sentences, "the haystack is whole sentences of the corpus"
        assert (meta["city"], meta["number"]) == (city, int(number))
        context = rec["messages"][0]["content"][len(INTRO):].rsplit("\n\n", 1)[0]
        n = len(tok.encode(context))
        assert meta["context_tokens"] == n <= 300 and n > 300 - 2 * longest  # full up to a sentence or two
        # the needle sits at the sentence boundary nearest the asked depth
        before = sum(len(tok.encode(s)) for s in haystack[:at])
        total = sum(len(tok.encode(s)) for s in haystack)
        assert abs(before - meta["depth"] / 100 * total) <= longest / 2 + 1
        seen_depths[meta["depth"]] += 1
        if meta["depth"] == 0:
            assert at == 0
        if meta["depth"] == 100:
            assert at == len(pieces) - 1
        assert meta["num_tokens"] == tok.encode_chat(rec["messages"]).input_ids.size
    assert set(seen_depths) == {0, 50, 100}
    # a document's sentences stay in order: consecutive haystack sentences of one file are consecutive in it
    for rec in records:
        pieces, at, _, _ = _parts(rec)
        numbered = [re.match(r"Sentence (\d+) of file (\w)", s).groups() for s in pieces[:at] + pieces[at + 1:]]
        for (k1, f1), (k2, f2) in itertools.pairwise(numbered):
            assert f1 != f2 or int(k2) == int(k1) + 1


def test_same_seed_same_bytes(tmp_path, corpus):
    root, _ = corpus
    args = ["niah", "--haystack", f"txt:{root}", "--num-train", "6", "--num-eval", "2", "--context-tokens", "200",
            "--no-progress"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        main([*args, "--seed", seed, "--out", str(tmp_path / name)])
    for file in ("train.jsonl", "eval.jsonl", "generation.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def _mdqa_rows(folder: Path):
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            yield from (json.loads(line) for line in f)


def test_mdqa_haystack_never_shows_eval_questions_or_answer_passages(tmp_path, shared_data):
    folder = shared_data / "mdqa"
    rows = list(_mdqa_rows(folder))
    questions = {r["question"] for r in rows}
    flagged = {c["text"] for r in rows for c in r["ctxs"] if c["hasanswer"] or c.get("isgold")}
    clean = {c["text"] for r in rows for c in r["ctxs"]} - flagged
    # sentences only a gold / answer-bearing passage has (long enough to be specific)
    clean_text = " ".join(" ".join(t.split()) for t in clean)
    secret = {s for t in flagged for s in re.split(r"(?<=[.!?])\s+", " ".join(t.split()))
              if len(s.split()) >= 8 and s not in clean_text}
    assert len(questions) == 40 and len(flagged) == 40 and len(secret) > 100
    info = generate_niah(NiahConfig(haystack=f"mdqa:{folder}", num_train=30, num_eval=10, context_tokens=1500), 0,
                         tmp_path, progress=False)
    assert info["haystack"]["excluded_passages"] == len(flagged)
    assert info["haystack"]["documents"] == len(clean)
    prompts = [r["messages"][0]["content"] for r in _read(tmp_path / "train.jsonl") + _read(tmp_path / "eval.jsonl")]
    for prompt in prompts:
        assert not any(q in prompt for q in questions)
        assert not any(s in prompt for s in secret)
        context = prompt[len(INTRO):].rsplit("\n\n", 1)[0]
        for block in context.split("\n\n"):  # each block is a run of one passage's sentences
            block = " ".join(NEEDLE.sub("", block).split())
            assert any(block in " ".join(t.split()) for t in clean), block[:80]


def test_shards_from_niah_data(tmp_path, corpus):
    root, _ = corpus
    main(["niah", "--haystack", f"txt:{root}", "--num-train", "5", "--num-eval", "0", "--context-tokens", "200",
          "--out", str(tmp_path / "d"), "--no-progress"])
    main(["shards", "--input", str(tmp_path / "d" / "train.jsonl"), "--out", str(tmp_path / "s"), "--no-progress"])
    shards = open_shards(tmp_path / "s")
    records = {r["meta"]["id"]: r for r in _read(tmp_path / "d" / "train.jsonl")}
    got = {}
    for bucket in shards.buckets:
        for i in range(len(bucket.source)):
            rec = bucket.source[i]
            got[rec["id"]] = rec
    assert sorted(got) == sorted(records) == [f"niah-seed0-train-{i:05d}" for i in range(5)]
    tok = mistral_tokenizer()
    for id_, rec in got.items():
        answer = records[id_]["messages"][1]["content"]
        assert tok.decode(rec["input_ids"][rec["loss_mask"]]) == answer  # the loss is on the answer (and </s>)
        assert np.flatnonzero(rec["loss_mask"])[-1] == len(rec["input_ids"]) - 1
    assert shards.manifest["metadata"]["inputs"][0]["generation"]["generator"] == "data_gen niah"


def test_context_counted_with_another_tokenizer(tmp_path, corpus):
    from test_data_hf_tokenizer import SMOLLM2, make_folder
    from transformers import AutoTokenizer

    root, _ = corpus
    folder = make_folder(tmp_path / "smol", SMOLLM2)
    ref = AutoTokenizer.from_pretrained(folder)
    generate_niah(NiahConfig(haystack=f"txt:{root}", num_train=6, num_eval=0, context_tokens=250), 0, tmp_path / "d",
                  tokenizer=get_tokenizer(folder), progress=False)
    for rec in _read(tmp_path / "d" / "train.jsonl"):
        context = rec["messages"][0]["content"][len(INTRO):].rsplit("\n\n", 1)[0]
        assert rec["meta"]["context_tokens"] == len(ref(context, add_special_tokens=False).input_ids) <= 250
        assert rec["meta"]["num_tokens"] == len(ref.apply_chat_template(rec["messages"], return_dict=False))


def test_bad_options_are_one_line_errors(tmp_path, corpus):
    root, _ = corpus
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_mdqa = tmp_path / "bad"
    bad_mdqa.mkdir()
    (bad_mdqa / "x.jsonl").write_text(json.dumps({"question": "q", "ctxs": [{"title": "t", "text": "Some text."}]})
                                      + "\n")
    cases = [
        (["--haystack", f"web:{root}"], "--haystack must be 'mdqa:DIR' or 'txt:DIR'"),
        (["--haystack", f"txt:{tmp_path / 'missing'}"], "is not a folder"),
        (["--haystack", f"txt:{empty}"], "no text found"),
        (["--haystack", f"mdqa:{bad_mdqa}"], re.escape(f"{bad_mdqa / 'x.jsonl'}:1: ctxs[0] needs a string 'text' and "
                                                       "a boolean 'hasanswer'")),
        (["--haystack", f"txt:{root}", "--depths", "10..200"], "--depths must name percents between 0 and 100"),
        (["--haystack", f"txt:{root}", "--depths", "a,b"], "--depths must be 'LO..HI' or a comma-separated list"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            main(["niah", *args, "--out", str(tmp_path / "o"), "--no-progress"])
    main(["niah", "--haystack", f"txt:{root}", "--num-train", "1", "--num-eval", "0", "--context-tokens", "100",
          "--out", str(tmp_path / "o"), "--no-progress"])
    with pytest.raises(SystemExit, match="train.jsonl exists; pass --overwrite"):
        main(["niah", "--haystack", f"txt:{root}", "--out", str(tmp_path / "o"), "--no-progress"])
