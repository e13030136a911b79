"""Readers on the shared real data (counts, fields, exact prompt strings) and clear errors for malformed lines."""

import json

import pytest

from data_gen import tasks as data_tasks
from data_gen.tokenizer import BOS_ID, get_tokenizer, load_tokenizer
from eval import gsm8k, hellaswag, mdqa, mmlu, openqa, synthetic
from eval.__main__ import main
from eval.datafiles import DataError
from jaxtrain.generate import encode_pair


# --- MDQA -------------------------------------------------------------------------------------------
def test_mdqa_prompt_format_exact():
    docs = (mdqa.Document("Alpha", "First text."), mdqa.Document("", "Second text.", isgold=True))
    assert mdqa.prompt_text("who is it", docs) == (
        "Write a high-quality answer for the given question using only the provided search results "
        "(some of which might be irrelevant).\n\n"
        "Document [1](Title: Alpha) First text.\n"
        "Document [2](Title: ) Second text.\n\n"
        "Question: who is it\n"
        "Answer:")


def test_mdqa_shared_files(shared_data):
    files = mdqa.find_position_files(shared_data / "mdqa", 20)
    assert list(files) == [0, 4, 9, 14, 19]
    by_position = {k: mdqa.read_mdqa_file(p) for k, p in files.items()}
    for k, examples in by_position.items():
        assert len(examples) == 40
        assert all(len(ex.documents) == 20 and ex.gold_index == k for ex in examples)
        assert [ex.question for ex in examples] == [ex.question for ex in by_position[0]]
    first = by_position[0][0]
    assert first.question == "who got the first nobel prize in physics"
    assert first.answers == ("Wilhelm Conrad Röntgen",)
    gold = first.documents[0]
    assert gold.isgold and gold.title == "List of Nobel laureates in Physics"
    assert by_position[19][0].documents[19] == gold  # the gold passage moves, the distractors keep their order
    prompt = mdqa.prompt_text(first.question, first.documents)
    assert "\n\nDocument [1](Title: List of Nobel laureates in Physics) The first Nobel Prize in Physics was " in prompt
    assert prompt.count("\nDocument [") == 20 and "\nDocument [20](Title: " in prompt
    assert prompt.endswith("\n\nQuestion: who got the first nobel prize in physics\nAnswer:")
    oracle = mdqa.read_mdqa_file(mdqa.find_oracle_file(shared_data / "mdqa"))
    assert len(oracle) == 40 and all(len(ex.documents) == 1 and ex.gold_index == 0 for ex in oracle)


def test_mdqa_load_positions_and_limit(shared_data):
    args = mdqa.MdqaArgs(model="unused", out="unused", data_dir=shared_data / "mdqa", positions=(1, 20), limit=3)
    data = mdqa.load(args)
    assert list(data.examples) == ["1", "20", "oracle"] and data.num_examples == 9
    assert [s["path"].rsplit("/", 1)[-1] for s in data.sources] == [
        "nq-open-20_total_documents_gold_at_0.jsonl.gz", "nq-open-20_total_documents_gold_at_19.jsonl.gz",
        "nq-open-oracle.jsonl.gz"]
    with pytest.raises(DataError, match="--positions 2"):
        mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_dir=shared_data / "mdqa", positions=(2,)))


# --- MMLU -------------------------------------------------------------------------------------------
def _release_tree(root, shared_data):
    """A lost-in-the-middle checkout as the repository lays it out: qa_data/<N>_total_documents/ per document count
    (here 20, from the shared files, and one 10-document file), the oracle file in qa_data/ itself."""
    qa = root / "lost-in-the-middle" / "qa_data"
    (qa / "20_total_documents").mkdir(parents=True)
    (qa / "10_total_documents").mkdir()
    sources = {}
    for path in sorted((shared_data / "mdqa").iterdir()):
        folder = qa if "oracle" in path.name else qa / "20_total_documents"
        sources[path.name] = folder / path.name
        sources[path.name].write_bytes(path.read_bytes())
    ten = "nq-open-10_total_documents_gold_at_0.jsonl.gz"
    sources[ten] = qa / "10_total_documents" / ten
    sources[ten].write_bytes(b"not read by the layout")
    return qa.parent, sources


def test_mdqa_layout_makes_the_release_a_data_dir(shared_data, tmp_path, capsys):
    """`python -m eval mdqa-layout` copies the release's nested files into one folder that `eval mdqa --data-dir`
    reads (every position and the oracle), and reports what each document count has and lacks."""
    repo, sources = _release_tree(tmp_path, shared_data)
    out = tmp_path / "mdqa"
    report = main(["mdqa-layout", "--source", str(repo), "--out", str(out)])
    assert report.splitlines() == [
        ("10 documents: gold at 0 (0-based); missing from the release's set: "
         "nq-open-10_total_documents_gold_at_4.jsonl.gz, nq-open-10_total_documents_gold_at_9.jsonl.gz"),
        "20 documents: gold at 0, 4, 9, 14, 19 (0-based)",
        "oracle: yes; retrieval results (--retrieval-file): no",
        (f"copied 7 files into {out}; next: python -m eval mdqa --model HF_DIR_OR_RUN --data-dir {out} "
         "--out RESULTS_DIR")]
    assert report in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(sources)
    assert all((out / name).read_bytes() == path.read_bytes() and not (out / name).is_symlink()
               for name, path in sources.items())
    data = mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_dir=out, num_documents=20, limit=2))
    assert list(data.examples) == ["1", "5", "10", "15", "20", "oracle"]
    gold_at_9 = shared_data / "mdqa" / "nq-open-20_total_documents_gold_at_9.jsonl.gz"
    assert data.examples["10"] == mdqa.read_mdqa_file(gold_at_9)[:2]

    linked = tmp_path / "linked"
    main(["mdqa-layout", "--source", str(repo / "qa_data"), "--out", str(linked), "--symlink"])
    assert {p.name: p.resolve() for p in linked.iterdir()} == {n: p.resolve() for n, p in sources.items()}


def test_mdqa_layout_and_data_dir_errors_name_the_files(shared_data, tmp_path, capsys):
    """Where the files are missing, the errors list exactly the names expected and the command that places them."""
    repo, _ = _release_tree(tmp_path, shared_data)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["mdqa-layout", "--source", str(empty), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"error: --source {empty}: no Lost in the Middle position file in it or below" in err
    assert "nq-open-30_total_documents_gold_at_29.jsonl.gz" in err and "nq-open-oracle.jsonl.gz" in err
    copy = repo / "copy"
    copy.mkdir()
    (copy / "nq-open-oracle.jsonl.gz").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["mdqa-layout", "--source", str(repo), "--out", str(tmp_path / "out")])
    assert "nq-open-oracle.jsonl.gz twice" in capsys.readouterr().err
    for call in (lambda: mdqa.find_position_files(empty, 20),
                 lambda: mdqa.load(mdqa.MdqaArgs(model="m", out="o", data_dir=empty))):
        with pytest.raises(DataError) as info:
            call()
        assert ("nq-open-20_total_documents_gold_at_0.jsonl.gz, nq-open-20_total_documents_gold_at_4.jsonl.gz, "
                "nq-open-20_total_documents_gold_at_9.jsonl.gz, nq-open-20_total_documents_gold_at_14.jsonl.gz, "
                "nq-open-20_total_documents_gold_at_19.jsonl.gz") in str(info.value)
        assert "python -m eval mdqa-layout --source" in str(info.value)


def test_mmlu_prompt_for_hand_written_rows():
    shot = mmlu.MmluQuestion("high_school_physics", 0, "What is 1+1?", ("1", "2", "3", "4"), 1)
    q = mmlu.MmluQuestion("high_school_physics", 0, " Which is heavier?\n", ("a kg of lead", "a kg of feathers",
                                                                            "neither", "both"), 2)
    assert mmlu.build_context(q, [shot, shot]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is heavier?\nA. a kg of lead\nB. a kg of feathers\nC. neither\nD. both\nAnswer:")


def test_mmlu_shared_files(shared_data):
    data = mmlu.load(mmlu.MmluArgs(model="m", out="o", data_dir=shared_data / "mmlu"))
    assert sorted(data.examples.test) == ["abstract_algebra", "college_physics", "high_school_computer_science",
                                          "high_school_us_history", "medical_genetics", "professional_psychology"]
    assert len(data.examples.test["abstract_algebra"]) == 100
    q = data.examples.test["abstract_algebra"][0]
    assert q.question.startswith("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18))")
    assert q.choices == ("0", "4", "2", "6") and q.answer == 1
    assert all(len(v) == 5 for v in data.examples.dev.values())
    assert data.num_examples == sum(len(v) for v in data.examples.test.values())


def test_mmlu_accepts_original_release_format(tmp_path):
    (tmp_path / "x_test.csv").write_text('"Q, with comma?",a,b,c,d,C\nQ2,a,b,c,d,A\n')
    qs = mmlu.read_mmlu_csv(tmp_path / "x_test.csv", "x")
    assert [(q.question, q.answer, q.row) for q in qs] == [("Q, with comma?", 2, 0), ("Q2", 0, 1)]


# --- HellaSwag --------------------------------------------------------------------------------------
def test_hellaswag_preprocess():
    assert hellaswag.preprocess(" How to clean [title] Wash the car. [step] Use soap.  Rinse. ") == \
        "How to clean. Wash the car. Use soap. Rinse."
    assert hellaswag.capitalize_last_fragment("Roof shingle removal: A man is sitting on a roof. he") == \
        "Roof shingle removal: A man is sitting on a roof. He"
    assert hellaswag.capitalize_last_fragment("Label: A man. The Man waves") == "Label: A man. The Man waves"
    assert hellaswag.capitalize_last_fragment("Label: a man waves") == "Label: a man waves"


def test_hellaswag_shared_file(shared_data):
    examples = hellaswag.read_hellaswag(shared_data / "hellaswag" / "hellaswag_val.txt")
    assert len(examples) == 300
    assert examples[0].query == "Roof shingle removal: A man is sitting on a roof. He"
    assert examples[0].label == 3 and examples[0].choices[3] == "starts pulling up roofing on a roof."
    assert examples[2].query.endswith("standing in the water, with other individuals visible in the background. "
                                      "The child and a different man")


def test_hellaswag_official_jsonl(tmp_path):
    row = {"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "activity_label": "Roof shingle removal",
           "endings": ["is [title] using wrap.", "b", "c", "d"], "label": 3}
    (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(row) + "\n")
    (ex,) = hellaswag.read_hellaswag(tmp_path / "hellaswag_val.jsonl")
    assert ex.query == "Roof shingle removal: A man is sitting on a roof. He"
    assert ex.choices == ("is. using wrap.", "b", "c", "d") and ex.label == 3


# --- GSM8K, TriviaQA, NQ-Open ------------------------------------------------------------------------
def test_gsm8k_shared_files_and_prompt(shared_data):
    data = gsm8k.load(gsm8k.Gsm8kArgs(model="m", out="o", data_dir=shared_data / "gsm8k", num_fewshot=2,
                                      fewshot_sampler="first"))
    assert data.num_examples == 200 and all(len(shots) == 2 for shots in data.examples.shots)
    q = data.examples.test[0]
    shots = data.examples.shots[0]
    assert [s.index for s in shots] == [0, 1]
    prompt = gsm8k.build_prompt(q.question, shots)
    assert prompt == (f"Question: {shots[0].question}\nAnswer: {shots[0].answer}\n\n"
                      f"Question: {shots[1].question}\nAnswer: {shots[1].answer}\n\n"
                      f"Question: {q.question}\nAnswer:")
    assert q.question.startswith("Janet’s ducks lay 16 eggs per day.") and q.answer.endswith("#### 18")


def test_gsm8k_seeded_fewshot_does_not_depend_on_limit(shared_data):
    """The default sampler draws per question from one seeded generator in question order, so a --limit run
    gives each question the rows of the full run (the prompts themselves are checked against
    lm-evaluation-harness in test_eval_lmeval.py)."""
    full = gsm8k.load(gsm8k.Gsm8kArgs(model="m", out="o", data_dir=shared_data / "gsm8k"))
    few = gsm8k.load(gsm8k.Gsm8kArgs(model="m", out="o", data_dir=shared_data / "gsm8k", limit=3))
    rows = [[s.index for s in shots] for shots in full.examples.shots]
    assert [[s.index for s in shots] for shots in few.examples.shots] == rows[:3]
    assert all(len(set(r)) == 5 for r in rows) and len({tuple(r) for r in rows}) == 200
    other = gsm8k.load(gsm8k.Gsm8kArgs(model="m", out="o", data_dir=shared_data / "gsm8k", limit=3, fewshot_seed=0))
    assert [[s.index for s in shots] for shots in other.examples.shots] != rows[:3]


def test_openqa_shared_files(shared_data):
    trivia = openqa.read_triviaqa(shared_data / "triviaqa" / "triviaqa_sm_sub.jsonl")
    assert len(trivia) == 300
    assert trivia[0].question == "Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?"
    assert "Onion" in trivia[0].answers and "Allium cepa" in trivia[0].answers
    assert openqa.TRIVIAQA.prompt(trivia[0].question) == (
        "Question: Brunswick, Lancastrian and Pearl Pickler are types of which vegetable??\nAnswer:")
    nq = openqa.read_nq_open(shared_data / "nq_open" / "nq_open_dev.jsonl")
    assert len(nq) == 300 and nq[0].answers == ("14 December 1972 UTC", "December 1972")
    assert openqa.NQ_OPEN.prompt(nq[0].question) == (
        "Answer these questions:\n\nQ: when was the last time anyone was on the moon?\nA:")


# --- synthetic (data_gen's eval.jsonl) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    cfg = data_tasks.PRESETS["demo-simple"].replace(num_train=0, num_eval=12, template=True)
    data_tasks.generate(cfg, 0, out, progress=False)
    return out


def test_synthetic_reader_on_data_gen_output(synthetic_dir):
    examples = synthetic.read_synthetic(synthetic_dir / "eval.jsonl")
    assert len(examples) == 12
    lines = [json.loads(x) for x in (synthetic_dir / "eval.jsonl").read_text().splitlines()]
    for ex, line in zip(examples, lines, strict=True):
        assert ex.prompt == line["messages"][0]["content"] and ex.num_dicts == 5
        assert (ex.gold_value, ex.gold_dict) == (line["meta"]["gold_value"], line["meta"]["gold_dict"])
        assert f"Dictionary [{ex.gold_dict}] {{" in ex.prompt and f"{ex.gold_key}: {ex.gold_value}" in ex.prompt


def test_synthetic_reader_on_multisubkey(tmp_path):
    cfg = data_tasks.PRESETS["paper-multisubkey"].replace(num_train=0, num_eval=3, num_dicts=4, max_tokens=512)
    data_tasks.generate(cfg, 0, tmp_path, progress=False)
    examples = synthetic.read_synthetic(tmp_path / "eval.jsonl")
    assert len(examples) == 3 and all(isinstance(ex.gold_key, tuple) for ex in examples)


# --- tokenization of plain-text scoring requests ------------------------------------------------------
def test_encode_pair_splits_like_the_harness():
    sp, tokenizer = load_tokenizer(), get_tokenizer("mistral")
    context, cont = encode_pair(tokenizer, "Question: x\nAnswer:", " B")
    assert context == [BOS_ID, *sp.encode("Question: x\nAnswer:")]
    assert cont == [sp.piece_to_id("▁B")]
    # the trailing space moves to the answer
    assert encode_pair(tokenizer, "Answer: ", "B") == encode_pair(tokenizer, "Answer:", " B")


# --- malformed data ----------------------------------------------------------------------------------
def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


MDQA_OK = json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x", "isgold": True}]})


@pytest.mark.parametrize("reader, name, lines, message", [
    (openqa.read_nq_open, "nq.jsonl", ['{"question": "q", "answer": ["a"]}', '{"question": "q", "answer": ["a"]',
                                       "{}"], r"nq.jsonl:2: invalid JSON"),
    (openqa.read_nq_open, "nq.jsonl", ['{"question": "q", "answer": ["a"]}', '{"question": "q"}'],
     r"nq.jsonl:2: missing field 'answer'"),
    (openqa.read_nq_open, "nq.jsonl", ['{"question": "q", "answer": "a"}'], r"nq.jsonl:1: field 'answer' must be"),
    (openqa.read_triviaqa, "tq.jsonl", ['{"context": "What?", "aliases": ["a"]}'], r"tq.jsonl:1: field 'context'"),
    (gsm8k.read_gsm8k, "g.jsonl", ['{"question": "q", "answer": "4"}'], r"g.jsonl:1: .*'#### <number>'"),
    (mdqa.read_mdqa_file, "m.jsonl", [MDQA_OK, MDQA_OK.replace("true", "false")], r"m.jsonl:2: expected exactly one"),
    (mdqa.read_mdqa_file, "nq-open-1_total_documents_gold_at_0.jsonl", [MDQA_OK, MDQA_OK.replace('"x"', "3")],
     r"gold_at_0.jsonl:2: ctxs\[0\]: field 'text' must be a string"),
    (mdqa.read_mdqa_file, "nq-open-2_total_documents_gold_at_0.jsonl", [MDQA_OK],
     r"gold_at_0.jsonl:1: 1 documents, but the file name says 2"),
    (hellaswag.read_hellaswag, "h.txt", ["ctx", "3", "a", "b", "c", "d", "ctx2", "x", "a", "b", "c", "d"],
     r"h.txt:8: label must be 0-3"),
    (hellaswag.read_hellaswag, "h.txt", ["ctx", "3", "a", "b", "c", "d", "ctx2", "1"], r"h.txt:7: incomplete example"),
])
def test_malformed_lines_name_file_and_line(tmp_path, reader, name, lines, message):
    path = _write(tmp_path, name, lines)
    with pytest.raises(DataError, match=message):
        reader(path)


def test_malformed_mmlu_and_synthetic(tmp_path, synthetic_dir):
    path = _write(tmp_path, "x_test.csv", ["question,choice0,choice1,choice2,choice3,answer", "q,a,b,c,d,1",
                                           '"multi', 'line",a,b,c,d,E'])
    with pytest.raises(DataError, match=r"x_test.csv:3: field 'answer' must be 0-3 or A-D, got 'E'"):
        mmlu.read_mmlu_csv(path, "x")
    lines = (synthetic_dir / "eval.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["meta"]["gold_value"] += 1
    path = _write(tmp_path, "eval.jsonl", [lines[0], json.dumps(bad)])
    with pytest.raises(DataError, match=r"eval.jsonl:2: the reference answer .* but meta says"):
        synthetic.read_synthetic(path)


def test_cli_reports_bad_data_without_traceback(tmp_path, capsys):
    path = _write(tmp_path, "nq.jsonl", ['{"question": "q", "answer": ["a"]}', "not json"])
    with pytest.raises(SystemExit) as exit_info:
        main(["nq_open", "--model", str(tmp_path / "no-model"), "--data-file", str(path), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {path}:2: invalid JSON" in err and "Traceback" not in err
