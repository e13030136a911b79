"""`python -m data_gen convert`: MultiDocQA and IN2 training files into chat JSONL. Hand-made files in every
accepted row form, the expected chats written out here by hand; malformed rows stop with one line naming
file:line; sampling and the length filter; the output through `python -m data_gen shards` unchanged."""

import gzip
import json
import re

import numpy as np
import pytest

from data_gen.__main__ import main
from data_gen.shards import open_shards
from data_gen.tokenizer import mistral_tokenizer

FILM = ("Below is a context and an instruction. Based on the information provided in the context, write a response "
        "for the instruction.")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


MULTIDOCQA_ROWS = [
    {"messages": [{"role": "system", "content": "Answer from the documents."},
                  {"role": "user", "content": "Doc 1: The river is 12 km long.\nHow long is the river?"},
                  {"role": "assistant", "content": "Doc 1 says the river is 12 km long. So: 12 km."}]},
    {"context": "Doc 1: Ann was born in 1901.\nDoc 2: Bob was born in 1910.",
     "questions": ["When was Ann born?", "And Bob?"], "answers": ["In 1901.", "In 1910."], "id": 7},
    {"context": "Doc 1: Cats sleep a lot.", "question": "What do cats do a lot?", "answer": "They sleep."},
]
MULTIDOCQA_CHATS = [
    [{"role": "system", "content": "Answer from the documents."},
     _user("Doc 1: The river is 12 km long.\nHow long is the river?"),
     _bot("Doc 1 says the river is 12 km long. So: 12 km.")],
    [_user("Doc 1: Ann was born in 1901.\nDoc 2: Bob was born in 1910.\n\nWhen was Ann born?"), _bot("In 1901."),
     _user("And Bob?"), _bot("In 1910.")],
    [_user("Doc 1: Cats sleep a lot.\n\nWhat do cats do a lot?"), _bot("They sleep.")],
]
IN2_ROWS = [
    {"prompt": "[INST] Below is a context and an instruction. Based on the information provided in the context, "
               "write a response for the instruction.\n\n### Context:\nThe sky was green on Tuesday.\n\n"
               "### Instruction:\nWhat colour was the sky on Tuesday? [/INST]",
     "completion": "Green.", "position_id": 3, "set_id": 0},
    {"prompt": "<s>[INST] Plain question? [/INST]", "completion": "Plain answer."},
    {"prompt": "No wrapper here.", "completion": "Kept as is."},
    {"context": "Segment one. Segment two.", "question": "Which segment comes first?", "answer": "Segment one."},
    {"context": "A B C", "instruction": "List the letters.", "output": "A, B, C"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]
IN2_CHATS = [
    [_user(f"{FILM}\n\n### Context:\nThe sky was green on Tuesday.\n\n### Instruction:\nWhat colour was the sky on "
           "Tuesday?"), _bot("Green.")],
    [_user("Plain question?"), _bot("Plain answer.")],
    [_user("No wrapper here."), _bot("Kept as is.")],
    [_user(f"{FILM}\n\n### Context:\nSegment one. Segment two.\n\n### Instruction:\nWhich segment comes first?"),
     _bot("Segment one.")],
    [_user(f"{FILM}\n\n### Context:\nA B C\n\n### Instruction:\nList the letters."), _bot("A, B, C")],
    [_user("hi"), _bot("hello")],
]


@pytest.mark.parametrize(("fmt", "rows", "chats"), [("multidocqa", MULTIDOCQA_ROWS, MULTIDOCQA_CHATS),
                                                    ("in2", IN2_ROWS, IN2_CHATS)])
def test_rows_become_the_chats_written_by_hand(tmp_path, fmt, rows, chats):
    src = _write(tmp_path / f"{fmt}_part1.jsonl", rows[:2])
    with gzip.open(tmp_path / f"{fmt}_part2.jsonl.gz", "wt") as f:  # blank lines are skipped
        f.write("\n".join(json.dumps(r) for r in rows[2:]) + "\n\n")
    main(["convert", "--format", fmt, "--input", str(src), str(tmp_path / f"{fmt}_part2.jsonl.gz"),
          "--out", str(tmp_path / "out"), "--no-progress"])
    records = _read(tmp_path / "out" / "train.jsonl")
    assert [r["messages"] for r in records] == chats
    lines = [1, 2] + [k + 1 for k in range(len(rows) - 2)]
    files = [f"{fmt}_part1"] * 2 + [f"{fmt}_part2"] * (len(rows) - 2)
    assert [r["meta"]["id"] for r in records] == [f"{fmt}-{f}-{n:06d}" for f, n in zip(files, lines, strict=True)]
    tok = mistral_tokenizer()
    assert [r["meta"]["num_tokens"] for r in records] == [tok.encode_chat(c).input_ids.size for c in chats]
    info = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert (info["generator"], info["format"], info["rows"], info["splits"]["train"]["num_samples"]) == \
        ("data_gen convert", fmt, len(rows), len(rows))

    # the same files through shards: every example there, the loss on the answers only
    main(["shards", "--input", str(tmp_path / "out" / "train.jsonl"), "--out", str(tmp_path / "s"), "--no-progress"])
    shards = open_shards(tmp_path / "s")
    got = {rec["id"]: rec for b in shards.buckets for rec in (b.source[i] for i in range(len(b.source)))}
    assert sorted(got) == sorted(r["meta"]["id"] for r in records)
    for r in records:
        rec = got[r["meta"]["id"]]
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], rec["loss_mask"].astype(int), [0]])))
        runs = [rec["input_ids"][start:end] for start, end in zip(edges[::2], edges[1::2], strict=True)]
        assert [tok.decode(ids) for ids in runs] == answers  # each answer (and its </s>), nothing else
    assert shards.manifest["metadata"]["inputs"][0]["generation"]["format"] == fmt


def test_malformed_rows_name_file_and_line(tmp_path):
    good = {"context": "c", "question": "q", "answer": "a"}
    cases = [
        ("multidocqa", [good, "{not json"], r":2: not valid JSON"),
        ("multidocqa", [good, good, ["a", "list"]], r":3: expected a JSON object, got list"),
        ("multidocqa", [{"context": "c", "query": "q"}], r":1: a multidocqa row needs 'messages', or 'context' with"),
        ("multidocqa", [{"context": "c", "questions": ["q1", "q2"], "answers": ["a1"]}],
         r":1: 'questions' and 'answers' must be lists of strings of the same, non-zero length"),
        ("multidocqa", [{"context": "", "question": "q", "answer": "a"}], r":1: 'context' \(the documents\) must be"),
        ("multidocqa", [{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}],
         r":1: messages\[1\]\.role must be 'system', 'user' or 'assistant'"),
        ("in2", [{"prompt": "[INST] q [/INST]"}], r":1: an in2 row needs 'prompt' and 'completion'"),
        ("in2", [{"prompt": "[INST] q [/INST]", "completion": "  "}], r":1: 'completion' \(the answer\) must be"),
        ("in2", [{"messages": [{"role": "user", "content": "q"}]}], r":1: the last message must be a 'assistant'"),
    ]
    for k, (fmt, rows, message) in enumerate(cases):
        src = _write(tmp_path / f"bad{k}.jsonl", rows)
        with pytest.raises(SystemExit, match=f"^error: {re.escape(str(src))}{message}"):
            main(["convert", "--format", fmt, "--input", str(src), "--out", str(tmp_path / f"o{k}"), "--no-progress"])
    (tmp_path / "bad.jsonl").write_bytes(b'{"context": "c", "question": "q", "answer": "\xff"}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: not UTF-8 text"):
        main(["convert", "--format", "in2", "--input", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "u"),
              "--no-progress"])


def test_inputs_refused_before_reading(tmp_path):
    (tmp_path / "a").mkdir()
    a = _write(tmp_path / "a" / "data.jsonl", MULTIDOCQA_ROWS)
    b = _write(tmp_path / "data.jsonl", MULTIDOCQA_ROWS)
    for inputs, message in (([a, b], "two inputs are named 'data'"),
                            ([tmp_path / "x.jsonl.zst"], "zstd files are not read here"),
                            ([tmp_path / "none.jsonl"], "no such file")):
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            main(["convert", "--format", "multidocqa", "--input", *map(str, inputs), "--out", str(tmp_path / "o"),
                  "--no-progress"])
    with pytest.raises(SystemExit):  # tyro: an unknown format is a usage error
        main(["convert", "--format", "longalpaca", "--input", str(b), "--out", str(tmp_path / "o")])
    main(["convert", "--format", "multidocqa", "--input", str(b), "--out", str(tmp_path / "o"), "--no-progress"])
    with pytest.raises(SystemExit, match="train.jsonl exists; pass --overwrite"):
        main(["convert", "--format", "multidocqa", "--input", str(b), "--out", str(tmp_path / "o"), "--no-progress"])


def test_sample_and_length_filter(tmp_path):
    rows = [{"context": "word " * (5 if k % 3 else 200), "question": f"Question {k}?", "answer": f"Answer {k}."}
            for k in range(60)]
    src = _write(tmp_path / "rows.jsonl", rows)
    tok = mistral_tokenizer()
    limit = 100
    fits = [k for k, r in enumerate(rows)
            if tok.encode_chat([_user(f"{r['context']}\n\n{r['question']}"), _bot(r["answer"])]).input_ids.size <= limit]
    assert len(fits) == 40

    def run(out, *extra):
        main(["convert", "--format", "multidocqa", "--input", str(src), "--out", str(tmp_path / out), "--max-tokens",
              str(limit), "--no-progress", *extra])
        return [int(r["meta"]["source"].rsplit(":", 1)[1]) - 1 for r in _read(tmp_path / out / "train.jsonl")]

    assert run("all") == fits
    info = json.loads((tmp_path / "all" / "generation.json").read_text())
    assert (info["rows"], info["too_long"], info["max_tokens"]) == (60, 20, limit)
    first, again, other = run("s1", "--num-samples", "12"), run("s2", "--num-samples", "12"), run(
        "s3", "--num-samples", "12", "--seed", "1")
    assert first == again != other
    assert len(first) == 12 and first == sorted(first) and set(first) <= set(fits)
    assert run("big", "--num-samples", "100") == fits
