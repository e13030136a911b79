"""MDQA at any gold position and document count, closed book and oracle.

Independent references: the released gold_at_{4,9,14,19} files (rebuilding them from gold_at_0 must give
them back byte for byte), the oracle release file (its passage is the gold passage), and expected document
lists that the tests assemble themselves from the raw JSON of the shared data and of a small
retrieval-results file they write (prompts compared through their sha256 in predictions.jsonl)."""

import functools
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
    if num_docs > 30:  # fewer documents: the first of the same draw (as retrieval keeps the top N-1)
        fewer = mdqa.load(mdqa.MdqaArgs(**{**args, "num_documents": 30}))
        for ex, few in zip(data.examples["1"], fewer.examples["1"], strict=True):
            assert few.documents == ex.documents[:30]


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
    """One CLI run decoding one token per prompt (the tests check the prompts, not the answers)."""
    results = main(["mdqa", "--model", str(model), "--out", str(out), "--no-progress", "--max-new-tokens", "1",
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


# --- end to end: 30 and 120 documents, positions 0,1,4,9,14,19, oracle and closed book ------------------------
SETTINGS = [*(str(k + 1) for k in POSITIONS), "oracle", "closedbook"]
LIMIT = 2


@functools.lru_cache(maxsize=1)
def _mistral_tokenizer():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1()


def chat_tokens(text):
    """Tokens of `text` as one Mistral-Instruct user turn, counted by mistral_common (not by our encoder)."""
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest(messages=[UserMessage(content=text)])
    return len(_mistral_tokenizer().encode_chat_completion(request).tokens)


@pytest.fixture(scope="module")
def windowed_model(tmp_path_factory):
    """The `tiny` model with a 128-token sliding window, for 20K-token prompts on a CPU: each query attends to
    128 keys instead of 4096 (prefill ~10x cheaper), and the CPU's chunked attention runs in blocks of 1024
    queries (its block loop is unrolled, so 128-query blocks of a 32K bucket take ~100 s to compile). The
    block size does not change what is computed, and both tests only check which prompts the model got."""
    import jax

    from jaxtrain import attention
    from jaxtrain.config import ModelConfig
    from jaxtrain.hf_io import save_pretrained
    from jaxtrain.model import init_params

    path = tmp_path_factory.mktemp("windowed-model")
    config = ModelConfig.preset("tiny").replace(sliding_window=128)
    save_pretrained(path, config, init_params(config, jax.random.key(0)), dtype="float32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "CHUNK", 1024, raising=False)
        yield path


def check_end_to_end(results, preds, expected, num_docs, distractors):
    """Counts, settings and metrics of a run at POSITIONS + oracle + closed book, and every prompt: its
    sha256 and its token count (mistral_common) against the prompt written out from `expected`:
    {question index: (question, gold passage, distractors in order, oracle passages)} from the raw data."""
    assert [(p["setting"], p["gold_position"], p["num_documents"], p["index"]) for p in preds] == [
        *((str(k + 1), k + 1, num_docs, i) for k in POSITIONS for i in range(LIMIT)),
        *(("oracle", None, 1, i) for i in range(LIMIT)), *(("closedbook", None, 0, i) for i in range(LIMIT))]
    lengths = {}
    for p in preds:
        question, gold, rest, oracle = expected[p["index"]]
        assert p["question"] == question
        if p["setting"] == "closedbook":
            text = f"Question: {question}\nAnswer:"
        elif p["setting"] == "oracle":
            text = expected_prompt(question, oracle)
        else:
            assert len(rest) == num_docs - 1
            text = expected_prompt(question, [*rest[:p["gold_position"] - 1], gold, *rest[p["gold_position"] - 1:]])
        assert p["prompt_sha256"] == sha(text), (p["setting"], p["index"])
        assert p["prompt_tokens"] == chat_tokens(text)
        lengths.setdefault(p["setting"], []).append(p["prompt_tokens"])
    m, s = results["metrics"], results["settings"]
    assert results["num_examples"] == len(SETTINGS) * LIMIT
    assert list(m["by_gold_position"]) == SETTINGS[:6]
    for setting in SETTINGS:
        got = m["by_gold_position"][setting] if setting.isdigit() else m[setting]
        scores = [p["best_subspan_em"] for p in preds if p["setting"] == setting]
        assert got["n"] == LIMIT and got["best_subspan_em"] == sum(scores) / LIMIT
        assert got["prompt_tokens"] == {"min": min(lengths[setting]), "max": max(lengths[setting]),
                                        "mean": round(sum(lengths[setting]) / LIMIT, 1)}
    position_lengths = [n for k in SETTINGS[:6] for n in lengths[k]]
    assert s["prompt_tokens"] == {"min": min(position_lengths), "max": max(position_lengths),
                                  "mean": round(sum(position_lengths) / len(position_lengths), 1)}
    assert (s["num_documents"], s["gold_positions"], s["oracle"], s["closed_book"]) == (
        num_docs, [1, 2, 5, 10, 15, 20], True, True)
    assert s["built"]["distractors"] == distractors and s["built"]["from_documents"] == 20
    for p in preds:
        assert p["answer"] == M.first_line(p["output"])
        assert p["best_subspan_em"] == M.best_subspan_em(p["answer"], p["answers"])
    return lengths


def run_end_to_end(model, data_dir, out, num_docs, *flags):
    return run(model, out, "--data-dir", str(data_dir), "--num-docs", str(num_docs), "--gold-positions",
               "0,1,4,9,14,19", "--closed-book", "--limit", str(LIMIT), *flags,
               batch_size=1)


@pytest.mark.parametrize("num_docs", [30, 120])
def test_end_to_end_shared_data(windowed_model, mdqa_dir, tmp_path, num_docs):
    """The random-distractor variant on the shared data: the 19 release distractors in order, then passages
    of the other questions that hold no answer; the gold passage at each position; oracle and closed book."""
    results, preds = run_end_to_end(windowed_model, mdqa_dir, tmp_path, num_docs)
    rows = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz")
    oracle = raw_rows(mdqa_dir / "nq-open-oracle.jsonl.gz")
    # The drawn passages, as the loader the command uses draws them; what they may be is checked here.
    loaded = mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_dir=mdqa_dir, num_documents=num_docs,
                                     gold_positions=("0",), limit=LIMIT))
    passages = {(c["title"], c["text"]): i for i, row in enumerate(rows) for c in row["ctxs"]}
    expected = {}
    for i, row in enumerate(rows[:LIMIT]):
        docs = [{"title": c["title"], "text": c["text"]} for c in row["ctxs"]]
        drawn = [{"title": d.title, "text": d.text} for d in loaded.examples["1"][i].documents[20:]]
        assert len(drawn) == num_docs - 20 and len({(d["title"], d["text"]) for d in drawn}) == num_docs - 20
        for d in drawn:
            assert d not in docs and (d["title"], d["text"]) in passages
            assert not M.best_subspan_em(d["text"], row["answers"])
        assert oracle[i]["question"] == row["question"] and oracle[i]["ctxs"][0]["text"] == docs[0]["text"]
        expected[i] = (row["question"], docs[0], docs[1:] + drawn,
                       [{"title": c["title"], "text": c["text"]} for c in oracle[i]["ctxs"]])
    lengths = check_end_to_end(results, preds, expected, num_docs, "random")
    assert results["settings"]["built"]["distractor_seed"] == 0
    assert {s["path"].rsplit("/", 1)[-1] for s in results["data"]} == {
        "nq-open-20_total_documents_gold_at_0.jsonl.gz", "nq-open-oracle.jsonl.gz"}
    # The shared data's prompts: ~5K tokens with 30 documents, ~20K with 120 (docs/eval.md).
    low, high = (4000, 6000) if num_docs == 30 else (18000, 22000)
    assert all(low < n < high for k in SETTINGS[:6] for n in lengths[k])
    assert (tmp_path / "mdqa_positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_retrieval_file(path, rows, extra):
    """A retrieval-results file in the Lost-in-the-Middle format for `rows`, in reverse order and with a
    question the data does not have: the release distractors, an answer-bearing passage at rank 4, then
    `extra` made-up passages of which every tenth holds an answer (hasanswer=true)."""
    retrieved = []
    for i, row in enumerate(rows):
        ctxs = [{"id": str(j), "title": c["title"], "text": c["text"], "score": "1.0", "hasanswer": False}
                for j, c in enumerate(row["ctxs"]) if not c["isgold"]]
        ctxs.insert(3, {"id": "a", "title": "Answer page", "text": row["answers"][0], "hasanswer": True})
        ctxs += [{"id": f"x{j}", "title": f"R{i}", "text": f"Retrieved {j} for {i}.", "hasanswer": j % 10 == 5}
                 for j in range(extra)]
        retrieved.append({"question": row["question"], "answers": row["answers"], "ctxs": ctxs})
    other = {"question": "a question not in the data", "answers": ["x"],
             "ctxs": [{"title": "t", "text": "x", "hasanswer": True}]}
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in [other, *reversed(retrieved)])
    return retrieved


@pytest.mark.parametrize("num_docs", [30, 120])
def test_end_to_end_retrieval_file(windowed_model, small_dir, tmp_path, num_docs):
    """Distractors from a retrieval-results file: the top N-1 passages with hasanswer=false, in rank order,
    matched to the data by question text; oracle and closed book from the data folder."""
    position_file = small_dir / "nq-open-20_total_documents_gold_at_0.jsonl"
    rows = [json.loads(line) for line in position_file.read_text().splitlines()]
    oracle = [json.loads(line) for line in (small_dir / "nq-open-oracle.jsonl").read_text().splitlines()]
    retrieval = tmp_path / "nq-open-contriever-msmarco-retrieved-documents.jsonl.gz"
    retrieved = write_retrieval_file(retrieval, rows, extra=120)
    results, preds = run_end_to_end(windowed_model, small_dir, tmp_path / "out", num_docs, "--retrieval-file",
                                    str(retrieval))
    expected = {}
    for i, (row, r) in enumerate(zip(rows[:LIMIT], retrieved, strict=False)):
        gold = next(c for c in row["ctxs"] if c["isgold"])
        rest = [{"title": c["title"], "text": c["text"]} for c in r["ctxs"] if not c["hasanswer"]][:num_docs - 1]
        expected[i] = (row["question"], {"title": gold["title"], "text": gold["text"]}, rest,
                       [{"title": c["title"], "text": c["text"]} for c in oracle[i]["ctxs"]])
    # Hand-counted: 19 release distractors, then "Retrieved j" for the j < 120 with j % 10 != 5.
    hand = [f"Retrieved {j} for 1." for j in range(120) if j % 10 != 5][:num_docs - 20]
    assert [d["text"] for d in expected[1][2][19:]] == hand
    check_end_to_end(results, preds, expected, num_docs, "retrieval")
    assert {s["path"].rsplit("/", 1)[-1] for s in results["data"]} == {
        "nq-open-20_total_documents_gold_at_0.jsonl", "nq-open-oracle.jsonl", retrieval.name}


def test_end_to_end_last_position_from_data_file(windowed_model, mdqa_dir, tmp_path):
    """--data-file (one position file, no oracle) with a retrieval file: the middle and last of 120 positions."""
    rows = raw_rows(mdqa_dir / "nq-open-20_total_documents_gold_at_0.jsonl.gz")[:2]
    data_file, small = small_release_file(tmp_path, rows)
    retrieval, retrieved = make_retrieval_file(tmp_path, small, extra=120)
    results, preds = run(windowed_model, tmp_path / "out", "--data-file", str(data_file), "--retrieval-file",
                         str(retrieval), "--num-docs", "120", "--gold-positions", "0", "59", "119", "--limit", "1",
                         "--no-oracle", batch_size=1)
    assert results["num_examples"] == 3 and results["settings"]["num_documents"] == 120
    assert {s["path"].rsplit("/", 1)[-1] for s in results["data"]} == {data_file.name, retrieval.name}
    for p in preds:
        r = next(r for r in retrieved if r["question"] == p["question"])
        docs = [{"title": c["title"], "text": c["text"]} for c in r["ctxs"] if not c["hasanswer"]][:119]
        gold = next(c for c in small[[x["question"] for x in small].index(p["question"])]["ctxs"] if c["isgold"])
        docs.insert(p["gold_position"] - 1, {"title": gold["title"], "text": gold["text"]})
        assert p["num_documents"] == 120 and p["prompt_sha256"] == sha(expected_prompt(p["question"], docs))
    assert [p["gold_position"] for p in preds] == [1, 60, 120]
