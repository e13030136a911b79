"""FLenQA: the authors' prompts (hand-copied from their notebook), their scoring on hand-computed responses,
the Mistral-Instruct encoding checked against mistral_common, malformed rows, and the task end to end on a
small hand-written file in the released format with a tiny random model."""

import json
import string

import pytest

from eval import flenqa
from eval.__main__ import main
from eval.datafiles import DataError
from eval.results import load_results

PIR = {"global_sample_id": 1, "sample_id": 7, "label": "True", "dataset": "PIR",
       "facts": ["John's living room is marble-floored.", "Ethan is in John's living room."],
       "assertion/question": "Is Ethan in a marble-floored room?",
       "mixin": "The sky was grey. John's living room is marble-floored. Ethan is in John's living room. Rain fell.",
       "padding_type": "books", "dispersion": "random", "ctx_size": 250}
MONOREL = {"global_sample_id": 2, "sample_id": 3, "label": "False", "dataset": "MonoRel",
           "facts": ["Julie is younger than Alex.", "Alex is younger than Zoe."],
           "assertion/question": "Is Zoe younger than Julie?",
           "mixin": "Julie is younger than Alex. Some padding here. Alex is younger than Zoe.",
           "padding_type": "same", "dispersion": "first", "ctx_size": 500}
RULETAKER = {"global_sample_id": 3, "sample_id": 11, "label": "True", "dataset": "Simplified RuleTaker",
             "rule": "If someone is kind and round then they are red.",
             "statement": ["Bob is kind.", "Bob is round."],
             "assertion/question": "Bob is red.",
             "mixin": "Bob is kind. A long padding sentence. Bob is round.",
             "padding_type": "books", "dispersion": "random", "ctx_size": 250}
ROWS = [PIR, MONOREL, RULETAKER, {**PIR, "global_sample_id": 4, "label": "False", "ctx_size": 500},
        {**MONOREL, "global_sample_id": 5, "label": "True", "ctx_size": 250, "dispersion": "random"},
        {**RULETAKER, "global_sample_id": 6, "label": "False", "ctx_size": 500, "dispersion": "middle"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "FLenQA.jsonl", ROWS)


def test_prompts_verbatim(data_file):
    pir, monorel, ruletaker = flenqa.read_flenqa_file(data_file)[:3]
    assert flenqa.prompt_text(pir, cot=False) == (
        f"{PIR['mixin']}\nTrue/False Question: Is Ethan in a marble-floored room?\nAnswer only True or False.\n")
    assert flenqa.prompt_text(pir, cot=True) == (
        "Show your steps then answer with ’true’ or ’false’.\n"
        f"{PIR['mixin']}\nTrue/False Question: Is Ethan in a marble-floored room?\n"
        "Let’s work this out in a step by step way to\nbe sure we have the right answer.\n")
    assert flenqa.prompt_text(monorel, cot=False) == (
        "Here are some facts. Answer the exact following question based on the text: Is Zoe younger than Julie? "
        "Answer the question as it appears exactly.\n"
        f"{MONOREL['mixin']}\nIs Zoe younger than Julie?\nAnswer only True or False.\n")
    assert flenqa.prompt_text(monorel, cot=True).endswith(
        "Is Zoe younger than Julie?\nLet’s work this out in a step by step way to be sure we have the right answer. "
        "Show your work and finally answer with ’true’ or ’false’. The final step should include the exact text of "
        "the question and the answer.\n")
    assert flenqa.prompt_text(ruletaker, cot=False) == (
        'Answer whether the statement Bob is red. can be derived from the rule and the facts. Answer with either '
        '"True" or "False".\nRule: If someone is kind and round then they are red.\n'
        f'Facts: {RULETAKER["mixin"]}\nAnswer with either "True or "False".\n')
    assert flenqa.prompt_text(ruletaker, cot=True) == (
        "Answer whether the statement Bob is red. can be derived from the rule and the facts.\n"
        'Show your steps then answer with either "True" or "False".\n'
        "Rule: If someone is kind and round then they are red.\n"
        f"Facts: {RULETAKER['mixin']}\n"
        'Answer with either "True or "False". Let\'s work this out in a step by step way to be sure we have the '
        "right answer.\n")
    listed = flenqa.FlenqaRow(**{**vars(ruletaker), "rule": ["r1", "r2"]})
    assert "Rule: ['r1', 'r2']\n" in flenqa.prompt_text(listed, cot=False)  # as the authors' f-string renders it


def test_chat_encoding_matches_mistral_common(data_file):
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from data_gen.chat import encode_prompt

    text = flenqa.prompt_text(flenqa.read_flenqa_file(data_file)[0], cot=True)
    expected = MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=text)])).tokens
    assert encode_prompt(text) == expected


@pytest.mark.parametrize("response, category", [
    ("True", "true"),
    ("False.", "false"),
    ("Not true.", "false"),                                   # "not true" counts as false
    ("It is NOT TRUE that Ethan is there", "false"),
    ("True or false? The answer is false.", "false"),          # both words: the last one counts
    ("False... no wait, it is true", "true"),
    ("That claim is untrue.", "true"),                         # substring: "untrue" contains "true"
    ("I cannot answer this question.", "other/refused"),       # refusal
    ("", "other/refused"),
    # chain of thought that restates the question after answering: the restated words count last
    ("Is Zoe younger than Julie? Julie is younger than Alex. Alex is younger than Zoe. So the answer is false.",
     "false"),
    ("The answer is false. Question: is it true that Zoe is younger than Julie?", "true"),
])
def test_response_category(response, category):
    assert flenqa.response_category(response) == category


def test_normalize_keeps_punctuation_like_the_authors():
    assert flenqa.normalize("  The answer:\n  is A  True. ") == "answer: is true."
    # The authors' punctuation step only removes the whole punctuation run as one substring.
    assert flenqa.normalize("x" + string.punctuation + "y") == "xy"


def test_score_cases():
    facts = ["Julie is younger than Alex.", "Alex is younger than Zoe."]
    s = flenqa.score_response("Not true.", "False", facts, cot=False)
    assert (s.answer, s.correct, s.coverage, s.early) == ("false", True, 0, False)
    s = flenqa.score_response("I can't tell.", "True", facts, cot=False)
    assert (s.answer, s.correct) == ("other/refused", False)
    s = flenqa.score_response("I can't tell.", "False", facts, cot=False)
    assert (s.answer, s.correct) == ("other/refused", False)
    # CoT: first fact quoted with its period (matches), second with a comma (does not: punctuation is kept).
    s = flenqa.score_response("Julie is younger than Alex. Alex is younger than Zoe, so Zoe is the oldest. "
                              "Is Zoe younger than Julie? False.", "False", facts, cot=True)
    assert (s.answer, s.correct, s.coverage, s.early) == ("false", True, 1, False)
    s = flenqa.score_response("True. Because Julie is younger than Alex. and alex is younger than zoe.", "False",
                              facts, cot=True)
    assert (s.answer, s.correct, s.coverage, s.early) == ("true", False, 2, True)
    # "Answer: false": normalised "answer: false"; its first 10 characters "answer: fa" do not hold "false".
    s = flenqa.score_response("Answer: false", "False", facts, cot=True)
    assert (s.answer, s.early) == ("false", False)
    s = flenqa.score_response("not true, because...", "False", facts, cot=True)
    assert (s.answer, s.early) == ("false", False)  # the text says "not true", not "false", early on


@pytest.mark.parametrize("row, message", [
    ({**PIR, "label": "Maybe"}, r"x.jsonl:2: field 'label' must be \"True\" or \"False\""),
    ({**PIR, "dataset": "RuleTaker"}, r"x.jsonl:2: field 'dataset' must be one of"),
    ({k: v for k, v in PIR.items() if k != "mixin"}, r"x.jsonl:2: missing field 'mixin'"),
    ({**PIR, "ctx_size": "250"}, r"x.jsonl:2: field 'ctx_size' must be an integer"),
    ({**PIR, "facts": []}, r"x.jsonl:2: field 'facts' must be a string or a non-empty list"),
    ({k: v for k, v in RULETAKER.items() if k != "rule"}, r"x.jsonl:2: missing field 'rule'"),
    ({k: v for k, v in RULETAKER.items() if k != "statement"}, r"x.jsonl:2: field 'statement'"),
])
def test_malformed_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "x.jsonl", [PIR, row])
    with pytest.raises(DataError, match=message):
        flenqa.read_flenqa_file(path)


def test_bad_json_line_and_filters(tmp_path, data_file):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(PIR) + "\n{not json\n")
    with pytest.raises(DataError, match=r"x.jsonl:2: invalid JSON"):
        flenqa.read_flenqa_file(path)
    with pytest.raises(DataError, match="--ctx-sizes 3000: not in the data"):
        flenqa.load(flenqa.FlenqaArgs(model="m", out="o", data_file=data_file, ctx_sizes=(250, 3000)))
    data = flenqa.load(flenqa.FlenqaArgs(model="m", out="o", data_file=data_file))  # random, as the paper's plots
    assert [r.line for r in data.examples] == [1, 3, 4, 5]
    data = flenqa.load(flenqa.FlenqaArgs(model="m", out="o", data_file=data_file, dispersions=("all",)))
    assert [r.line for r in data.examples] == [1, 2, 3, 4, 5, 6]


def test_zip_as_released_and_where_to_put_it(tmp_path, capsys):
    """The release's FLenQA.zip is read as it is, from --data-file or from a --data-dir holding it; without data
    the error says where the file comes from and how to pass it."""
    import zipfile

    data_dir = tmp_path / "flenqa"
    data_dir.mkdir()
    with zipfile.ZipFile(data_dir / "FLenQA.zip", "w") as z:
        z.writestr("FLenQA.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    assert len(flenqa.read_flenqa_file(data_dir / "FLenQA.zip")) == 6
    data = flenqa.load(flenqa.FlenqaArgs(model="m", out="o", data_dir=data_dir, dispersions=("all",)))
    assert data.num_examples == 6 and data.sources[0]["path"] == str((data_dir / "FLenQA.zip").resolve())
    for flags, message in [([], "get FLenQA.zip from https://github.com/alonj/Same-Task-More-Tokens and pass "
                                "--data-file PATH/FLenQA.zip"),
                           (["--data-dir", str(tmp_path)], f"{tmp_path}: no FLenQA (download it from "
                                                          "https://github.com/alonj/Same-Task-More-Tokens) file found "
                                                          "(looked for FLenQA.zip, FLenQA.jsonl")]:
        with pytest.raises(SystemExit):
            main(["flenqa", "--model", str(tmp_path), "--out", str(tmp_path / "out"), *flags])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("cot", [False, True])
def test_end_to_end(tiny_model, data_file, tmp_path, cot):
    out = tmp_path / "out"
    results = main(["flenqa", "--model", str(tiny_model), "--data-file", str(data_file), "--out", str(out),
                    "--batch-size", "2", "--no-progress", "--max-new-tokens", "6", "--dispersions", "all",
                    *(["--cot"] if cot else [])])
    assert load_results(out) == results and results["num_examples"] == 6 and results["settings"]["cot"] is cot
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["line"] for p in preds] == [1, 2, 3, 4, 5, 6]
    assert {(p["dataset"], p["label"]) for p in preds} == {(d, lab) for d in flenqa.DATASETS for lab in ("True", "False")}
    facts = {r["global_sample_id"]: r.get("facts") or r.get("statement") for r in ROWS}
    for p in preds:
        s = flenqa.score_response(p["output"], p["label"], facts[p["global_sample_id"]], cot=cot)
        assert (p["answer"], p["correct"], p["coverage"], p["early_answer"]) == (s.answer, s.correct, s.coverage, s.early)
    m = results["metrics"]
    assert m["accuracy"] == sum(p["correct"] for p in preds) / 6
    assert m["refusal_rate"] == sum(p["answer"] == "other/refused" for p in preds) / 6
    by_ctx = m["by_ctx_size"]
    assert list(by_ctx) == ["250", "500"] and by_ctx["250"]["n"] == 3
    assert by_ctx["500"]["accuracy"] == sum(p["correct"] for p in preds if p["ctx_size"] == 500) / 3
    assert m["by_ctx_size_dataset_dispersion"]["500"]["Simplified RuleTaker"]["middle"]["n"] == 1
    assert ("early_answer_rate" in m) is cot and ("coverage_rate" in by_ctx["250"]) is cot
    assert results["settings"]["prompt_tokens"]["max"] == max(p["prompt_tokens"] for p in preds)
    assert (out / "flenqa_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = main(["compare", str(out), str(out / "results.json"), "--labels", "base", "ft", "--out", str(tmp_path)])
    row = next(line for line in table.splitlines() if "500 tokens" in line)
    assert row.split()[0] == ("flenqa/cot" if cot else "flenqa") and row.split()[-1] == "+0.0"
    assert (tmp_path / "flenqa_compare.png").is_file()
