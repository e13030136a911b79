"""MDQA at any gold position and document count, closed book and oracle.

Independent references: the released gold_at_{4,9,14,19} files (rebuilding them from gold_at_0 must give
them back byte for byte), the oracle release file (its passage is the gold passage), and expected document
lists that the tests assemble themselves from the raw JSON of the shared data and of a small
retrieval-results file they write (prompts compared through their sha256 in predictions.jsonl)."""

import gzip
import hashlib
import json

import pytest

from eval import mdqa
from eval import metrics as M
from eval.__main__ import main
from eval.datafiles import DataError
from eval.results import load_results

POSITIONS = [0, 1, 4, 9, 14, 19]


def raw_rows(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def expected_prompt(question, docs):
    """The Lost-in-the-Middle qa.prompt, written out here independently of eval.mdqa."""
    lines = "\n".join(f"Document [{i}](Title: {d['title']}) {d['text']}" for i, d in enumerate(docs, start=1))
    return ("Write a high-quality answer for the given question using only the provided search results (some of "
            f"which might be irrelevant).\n\n{lines}\n\nQuestion: {question}\nAnswer:")


@pytest.fixture(scope="module")
def mdqa_dir(shared_data):
    return shared_data / "mdqa"


def test_rebuilding_reproduces_release_files(mdqa_dir):
    files = mdqa.find_position_files(mdqa_dir, 20)
    built = mdqa.build_examples(mdqa.read_mdqa_file(files[0]), 20, [4, 9, 14, 19])
    for k in (4, 9, 14, 19):
        release = raw_rows(files[k])
        assert [[(d.title, d.text, d.isgold) for d in ex.documents] for ex in built[k]] == [
            [(c["title"], c["text"], c["isgold"]) for c in row["ctxs"]] for row in release]


def test_oracle_file_is_the_gold_passage(mdqa_dir):
    gold = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_9.jsonl.gz")
    oracle = raw_rows(mdqa_dir / "nq-open-oracle.jsonl.gz")
    assert [(r["question"], r["ctxs"][9]["text"]) for r in gold] == [(r["question"], r["ctxs"][0]["text"]) for r in oracle]


@pytest.mark.parametrize("num_docs", [30, 120])
def test_random_distractor_variant(mdqa_dir, num_docs):
    args = dict(model="m", out="o", data_dir=mdqa_dir, num_documents=num_docs, gold_positions=("0,1,4,9,14,19",),
                limit=3, closed_book=True)
    data = mdqa.load(mdqa.MdqaArgs(**args))
    assert list(data.examples) == ["1", "2", "5", "10", "15", "20", "oracle", "closedbook"]
    assert data.num_examples == 8 * 3 and data.info["built"]["distractors"] == "random"
    rows = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz")
    other_passages = {}
    for i, row in enumerate(rows):
        for c in row["ctxs"]:
            other_passages.setdefault((c["title"], c["text"]), set()).add(i)
    extras = {}
    for k in POSITIONS:
        for ex, row in zip(data.examples[str(k + 1)], rows, strict=False):
            docs = [(d.title, d.text) for d in ex.documents]
            assert len(docs) == num_docs == len(set(docs)) and ex.gold_index == k
            assert ex.documents[k].isgold and docs[k] == (row["ctxs"][0]["title"], row["ctxs"][0]["text"])
            rest = docs[:k] + docs[k + 1:]
            assert rest[:19] == [(c["title"], c["text"]) for c in row["ctxs"][1:]]  # release distractors, in order
            for passage in rest[19:]:  # then passages of other questions that hold no answer
                assert ex.index not in other_passages[passage] or len(other_passages[passage]) > 1
                assert not M.best_subspan_em(passage[1], row["answers"])
            extras.setdefault(ex.index, rest[19:])
            assert extras[ex.index] == rest[19:]  # the same draw at every position
    assert [ex.documents for ex in data.examples["closedbook"]] == [()] * 3
    assert [ex.documents[0].text for ex in data.examples["oracle"]] == [r["ctxs"][0]["text"] for r in rows[:3]]
    again = mdqa.load(mdqa.MdqaArgs(**{**args, "limit": 2}))
    assert again.examples["5"] == data.examples["5"][:2]  # deterministic, independent of --limit
    other = mdqa.load(mdqa.MdqaArgs(**{**args, "distractor_seed": 1}))
    assert other.examples["5"] != data.examples["5"]


def make_retrieval_file(tmp_path, rows, extra):
    """A retrieval-results file in the Lost-in-the-Middle format: the release distractors, then `extra`
    short made-up passages per question, with answer-bearing passages (hasanswer=true) mixed in."""
    out = []
    for i, row in enumerate(rows):
        ctxs = [{"id": str(j), "title": c["title"], "text": c["text"], "score": "1.0", "hasanswer": False}
                for j, c in enumerate(row["ctxs"][1:])]
        ctxs.insert(3, {"id": "a", "title": "Answer page", "text": row["answers"][0], "hasanswer": True})
        ctxs += [{"id": f"x{j}", "title": f"Q{i}", "text": f"Filler {j}.",
                  "hasanswer": j % 10 == 5} for j in range(extra)]
        out.append({"question": row["question"], "answers": row["answers"], "ctxs": ctxs,
                    "nq_annotated_gold": row["nq_annotated_gold"]})
    path = tmp_path / "nq-open-contriever-msmarco-retrieved-documents.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in out)
    return path, out


def small_release_file(tmp_path, rows):
    """A 20-document position file whose passages are one short sentence each (cheap 120-document prompts)."""
    small = []
    for i, row in enumerate(rows):
        ctxs = [c if c["isgold"] else {**c, "title": f"T{j}", "text": f"Q{i} text {j}."}
                for j, c in enumerate(row["ctxs"])]
        small.append({**row, "ctxs": ctxs})
    path = tmp_path / "nq-open-20_total_documents_gold_at_0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in small))
    return path, small


def test_retrieval_file_distractors(tmp_path, mdqa_dir):
    rows = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz")[:4]
    retrieval, retrieved = make_retrieval_file(tmp_path, rows, extra=120)
    data_file = mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz"
    # 20 documents from the retrieval file = the release file at that position (same construction).
    data = mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_file=data_file, retrieval_file=retrieval,
                                   num_documents=20, gold_positions=("9",), limit=4))
    release = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_9.jsonl.gz")[:4]
    assert [[(d.title, d.text) for d in ex.documents] for ex in data.examples["10"]] == [
        [(c["title"], c["text"]) for c in r["ctxs"]] for r in release]
    data = mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_file=data_file, retrieval_file=retrieval,
                                   num_documents=120, gold_positions=("119",), limit=4))
    assert data.info["built"]["distractors"] == "retrieval"
    for ex, r in zip(data.examples["120"], retrieved, strict=True):
        expected = [(c["title"], c["text"]) for c in r["ctxs"] if not c["hasanswer"]][:119]
        assert [(d.title, d.text) for d in ex.documents[:119]] == expected and ex.gold_index == 119
    with pytest.raises(DataError, match="only 127 passages without an answer"):
        mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_file=data_file, retrieval_file=retrieval,
                                num_documents=129, limit=1))


def test_bad_arguments_and_rows(tmp_path, mdqa_dir):
    d = dict(model="m", out="o", data_dir=mdqa_dir)
    with pytest.raises(DataError, match="--gold-positions: position 30 does not exist with --num-docs 30"):
        mdqa.requested_positions(mdqa.MdqaArgs(**d, num_documents=30, gold_positions=("0,30",)))
    with pytest.raises(DataError, match="'x' is not an integer"):
        mdqa.requested_positions(mdqa.MdqaArgs(**d, gold_positions=("0,x",)))
    with pytest.raises(DataError, match="either --positions"):
        mdqa.load(mdqa.MdqaArgs(**d, positions=(1,), gold_positions=("0",)))
    rows = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz")[:2]
    retrieval, retrieved = make_retrieval_file(tmp_path, rows, extra=2)
    bad = [retrieved[0], {**retrieved[1], "ctxs": [{"title": "t", "text": "x", "hasanswer": "no"}]}]
    with gzip.open(retrieval, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in bad)
    with pytest.raises(DataError, match=r"retrieved-documents.jsonl.gz:2: ctxs\[0\]: field 'hasanswer'"):
        mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_file=mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz",
                                retrieval_file=retrieval, num_documents=30, limit=2))


def run(model, out, *flags, batch_size):
    """One CLI run; all short prompts in one batch (one compilation), 4K-token ones one at a time."""
    results = main(["mdqa", "--model", str(model), "--out", str(out), "--no-progress", "--max-new-tokens", "2",
                    "--batch-size", str(batch_size), *flags])
    assert load_results(out) == results
    return results, [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, mdqa_dir):
    """A data folder like the release (a position file and the oracle file) with one-sentence passages."""
    path = tmp_path_factory.mktemp("small-mdqa")
    _, small = small_release_file(path, raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz")[:6])
    oracle = [{**r, "ctxs": [c for c in r["ctxs"] if c["isgold"]]} for r in small]
    (path / "nq-open-oracle.jsonl").write_text("".join(json.dumps(r) + "\n" for r in oracle))
    return path


@pytest.mark.parametrize("which", ["small", pytest.param("shared", marks=pytest.mark.slow)])
def test_end_to_end_30_documents_closed_book_and_oracle(tiny_model, mdqa_dir, small_dir, tmp_path, which):
    data_dir = small_dir if which == "small" else mdqa_dir
    results, preds = run(tiny_model, tmp_path, "--data-dir", str(data_dir), "--num-docs", "30",
                         "--gold-positions", "0,1,4,9,14,19", "--closed-book", "--limit", "1",
                         batch_size=8 if which == "small" else 1)
    assert [(p["setting"], p["gold_position"], p["num_documents"]) for p in preds] == [
        *((str(k + 1), k + 1, 30) for k in POSITIONS), ("oracle", None, 1), ("closedbook", None, 0)]
    data = mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_dir=data_dir, num_documents=30,
                                   gold_positions=("0,1,4,9,14,19",), limit=1))
    position_file = next(data_dir.glob("nq-open-20_total_documents_gold_at_0.jsonl*"))
    row = (raw_rows(position_file) if position_file.suffix == ".gz" else
           [json.loads(line) for line in position_file.read_text().splitlines()])[0]
    for p in preds[:6]:
        ex = data.examples[p["setting"]][0]
        docs = [{"title": d.title, "text": d.text} for d in ex.documents]
        assert docs[p["gold_position"] - 1] == {"title": row["ctxs"][0]["title"], "text": row["ctxs"][0]["text"]}
        distractors = docs[:p["gold_position"] - 1] + docs[p["gold_position"]:]
        assert distractors[:19] == [{"title": c["title"], "text": c["text"]} for c in row["ctxs"][1:]]
        assert p["prompt_sha256"] == sha(expected_prompt(row["question"], docs))
    gold = row["ctxs"][0]
    assert preds[6]["prompt_sha256"] == sha(expected_prompt(row["question"], [gold]))
    assert preds[7]["prompt_sha256"] == sha(f"Question: {row['question']}\nAnswer:")
    m, s = results["metrics"], results["settings"]
    assert list(m["by_gold_position"]) == ["1", "2", "5", "10", "15", "20"]
    assert m["closedbook"]["n"] == m["oracle"]["n"] == 1
    assert m["best_subspan_em"] == sum(p["best_subspan_em"] for p in preds[:6]) / 6
    assert s["num_documents"] == 30 and s["closed_book"] and s["built"]["distractors"] == "random"
    lengths = [p["prompt_tokens"] for p in preds[:6]]
    assert s["prompt_tokens"] == {"min": min(lengths), "mean": round(sum(lengths) / 6, 1), "max": max(lengths)}
    assert min(lengths) > (3500 if which == "shared" else 250) and m["closedbook"]["prompt_tokens"]["max"] < 40


def test_end_to_end_120_documents_from_retrieval_file(tiny_model, mdqa_dir, tmp_path):
    rows = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz")[:2]
    data_file, small = small_release_file(tmp_path, rows)
    retrieval, retrieved = make_retrieval_file(tmp_path, small, extra=120)
    results, preds = run(tiny_model, tmp_path / "out", "--data-file", str(data_file), "--retrieval-file",
                         str(retrieval), "--num-docs", "120", "--gold-positions", "0", "59", "119", "--limit", "1",
                         "--no-oracle", batch_size=3)
    assert results["num_examples"] == 3 and results["settings"]["num_documents"] == 120
    assert {s["path"].rsplit("/", 1)[-1] for s in results["data"]} == {data_file.name, retrieval.name}
    for p in preds:
        r = next(r for r in retrieved if r["question"] == p["question"])
        docs = [{"title": c["title"], "text": c["text"]} for c in r["ctxs"] if not c["hasanswer"]][:119]
        gold = next(c for c in small[[x["question"] for x in small].index(p["question"])]["ctxs"] if c["isgold"])
        docs.insert(p["gold_position"] - 1, {"title": gold["title"], "text": gold["text"]})
        assert p["num_documents"] == 120 and p["prompt_sha256"] == sha(expected_prompt(p["question"], docs))
    assert [p["gold_position"] for p in preds] == [1, 60, 120]
