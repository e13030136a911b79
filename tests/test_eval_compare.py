"""`python -m eval compare` and the MDQA plot on hand-written results files (values worked out by hand)."""

import json
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.datafiles import DataError
from eval.results import SCHEMA_VERSION, load_results


def _results(task, label, metrics, n=40, **extra):
    return {"schema_version": SCHEMA_VERSION, "task": task, "label": label, "model": {"path": f"/m/{label}"},
            "data": [], "settings": {"num_documents": 20}, "num_examples": n, "metrics": metrics,
            "timing": {}, **extra}


def _mdqa(label, accs, oracle):
    by_pos = {str(p): {"best_subspan_em": a, "best_subspan_em_stderr": 0.05, "n": 40}
              for p, a in zip((1, 10, 20), accs)}
    return _results("mdqa", label, {"best_subspan_em": sum(accs) / 3, "best_subspan_em_stderr": 0.03,
                                    "by_gold_position": by_pos,
                                    "oracle": {"best_subspan_em": oracle, "best_subspan_em_stderr": None, "n": 40}})


@pytest.fixture
def files(tmp_path):
    runs = {"base": _mdqa("base", [0.6, 0.3, 0.45], 0.8), "ft": _mdqa("ft", [0.65, 0.5, 0.55], 0.85),
            "hs": _results("hellaswag", "ft", {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.625}, n=8)}
    paths = {}
    for name, r in runs.items():
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name / "results.json"
        paths[name].write_text(json.dumps(r))
    return paths


def test_compare_table_and_plot(files, tmp_path, capsys):
    table = main(["compare", str(files["base"]), str(files["ft"]), "--out", str(tmp_path / "cmp")])
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "(%)", "base", "ft", "ft", "-", "base"]
    gold10 = next(line for line in lines if "gold at 10" in line)
    assert gold10.split()[4:] == ["30.0", "±", "5.0", "50.0", "±", "5.0", "+20.0"]
    oracle = next(line for line in lines if " oracle " in f" {line} ")
    assert oracle.split()[2:] == ["80.0", "85.0", "+5.0"]
    mean = next(line for line in lines if "best_subspan_em" in line)
    assert mean.split()[-1] == "+11.7"  # (0.5667 - 0.45) * 100
    assert lines[-1].split() == ["examples", "40", "40"]
    png = tmp_path / "cmp" / "mdqa_compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table in capsys.readouterr().out


def test_compare_gives_no_overall_difference_over_different_gold_positions(files, tmp_path):
    # ft scored at document 10 only: its overall 50% is not comparable with base's mean over 1, 10 and 20 (45%)
    only10 = _mdqa("ft", [0.65, 0.5, 0.55], 0.85)
    only10["metrics"]["by_gold_position"] = {"10": only10["metrics"]["by_gold_position"]["10"]}
    only10["metrics"]["best_subspan_em"] = 0.5
    (tmp_path / "only10").mkdir()
    (tmp_path / "only10" / "results.json").write_text(json.dumps(only10))
    table = main(["compare", str(files["base"]), str(tmp_path / "only10"), "--out", str(tmp_path / "cmp")])
    lines = table.splitlines()
    overall = next(line for line in lines if "best_subspan_em" in line and "±" in line)
    assert overall.split()[2:] == ["45.0", "±", "3.0", "50.0", "±", "3.0", "-"]
    gold10 = next(line for line in lines if "gold at 10" in line)
    assert gold10.split()[-1] == "+20.0"
    gold1 = next(line for line in lines if "gold at 1 " in f"{line} ")
    assert gold1.split()[-2:] == ["-", "-"]
    assert "no difference where the runs scored different ones" in table
    # the same positions again: the difference is back
    table = main(["compare", str(files["base"]), str(files["ft"]), "--out", str(tmp_path / "cmp")])
    assert "different ones" not in table


def test_compare_gives_no_overall_flenqa_difference_over_different_context_sizes(tmp_path):
    # base at 250 and 3000 tokens (accuracy 75% and 45%: 60% pooled), ft at 250 only (80%): the pooled rows
    # compare different context sizes, the 250-token row compares like with like
    base = _flenqa_run("base", False, (0.6, 0.05), 0.04, 0.55, {250: (0.75, 0.1), 3000: (0.45, 0.11)})
    ft = _flenqa_run("ft", False, (0.8, 0.09), 0.01, 0.5, {250: (0.8, 0.09)})
    paths = []
    for task, label, metrics, settings, n in (base, ft):
        (tmp_path / label).mkdir()
        (tmp_path / label / "results.json").write_text(
            json.dumps(_results(task, label, metrics, n=n, settings=settings)))
        paths.append(str(tmp_path / label))
    lines = main(["compare", *paths, "--out", str(tmp_path / "cmp")]).splitlines()
    row = {line.split()[1]: line.split()[2:] for line in lines[2:] if line.startswith("flenqa")
           and not line.split()[1].isdigit()}
    assert row["accuracy"] == ["60.0", "±", "5.0", "80.0", "±", "9.0", "-"]
    assert row["refusal_rate"] == ["4.0", "1.0", "-"]
    assert row["true_rate"] == ["55.0", "50.0", "-"]
    by_ctx = {line.split()[1]: line.split()[-1] for line in lines if line.startswith("flenqa")
              and line.split()[1].isdigit()}
    assert by_ctx == {"250": "+5.0", "3000": "-"}
    assert lines[-1].startswith("an overall MDQA / FLenQA metric pools")


def test_compare_mixed_tasks(files, tmp_path):
    table = main(["compare", str(files["base"]), str(files["hs"]), "--labels", "a", "b", "--out", str(tmp_path)])
    acc = next(line for line in table.splitlines() if line.startswith("hellaswag") and " acc " in f"{line} ")
    assert acc.split()[2:] == ["-", "50.0", "±", "10.0", "-"]
    acc_norm = next(line for line in table.splitlines() if "acc_norm" in line)
    assert acc_norm.split()[2:] == ["-", "62.5", "-"]


def test_compare_rejects_bad_files(files, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"task": "mdqa"}')
    with pytest.raises(SystemExit):
        main(["compare", str(files["base"]), str(tmp_path / "bad.json")])
    assert "not a results.json" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such file"):
        load_results(tmp_path / "missing.json")


@pytest.mark.parametrize("task, metrics, message", [
    ("mdqa", {"best_subspan_em": 0.5}, "mdqa results without metrics.by_gold_position"),
    ("mdqa", {"by_gold_position": {"middle": {"best_subspan_em": 0.5}}}, "by_gold_position: 'middle' is not a number"),
    ("mdqa", {"by_gold_position": {"1": {"n": 3}}}, "metrics.by_gold_position.1 has no number 'best_subspan_em'"),
    ("mdqa", {"by_gold_position": {}, "oracle": {"best_subspan_em": "0.8"}}, "metrics.oracle has no number"),
    ("flenqa", {"accuracy": 0.5, "by_ctx_size": {"250": {"accuracy": True}}},
     "by_ctx_size.250 has no number 'accuracy'"),
    ("flenqa", {"accuracy": 0.5}, "flenqa results without metrics.by_ctx_size"),
    ("mmlu", [0.5], "'metrics' must be an object"),
])
def test_compare_names_the_bad_metric(tmp_path, capsys, task, metrics, message):
    (tmp_path / "results.json").write_text(json.dumps(_results(task, "x", metrics)))
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path), "--out", str(tmp_path)])
    assert f"error: {tmp_path}: " in (err := capsys.readouterr().err) and message in err



def test_compare_names_a_file_without_an_example_count(tmp_path, capsys):
    run = _results("hellaswag", "x", {"acc": 0.5}, n=None)
    (tmp_path / "results.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit):
        main(["compare", str(tmp_path), "--out", str(tmp_path)])
    assert f"error: {tmp_path / 'results.json'}: num_examples must be a whole number, got None" in capsys.readouterr().err


# --- one table of everything: MDQA at 20 and 120 documents, FLenQA, synthetic, the five benchmarks ----------
def _mean(name, value, stderr, **extra):
    return {name: value, f"{name}_stderr": stderr, **extra}


def _mdqa_run(label, num_docs, positions, oracle, closedbook, n=40):
    """MDQA results as `eval.mdqa.evaluate` writes them: {1-based position: (accuracy, stderr)}."""
    tokens = {"min": 100 * num_docs, "mean": 110.0 * num_docs, "max": 120 * num_docs}
    by_pos = {str(p): _mean("best_subspan_em", a, s, n=n, prompt_tokens=tokens) for p, (a, s) in positions.items()}
    mean = sum(a for a, _ in positions.values()) / len(positions)
    metrics = {**_mean("best_subspan_em", mean, 0.03), "by_gold_position": by_pos,
               "oracle": _mean("best_subspan_em", *oracle, n=n, prompt_tokens={"min": 150, "mean": 180.0, "max": 210}),
               "closedbook": _mean("best_subspan_em", *closedbook, n=n,
                                   prompt_tokens={"min": 15, "mean": 18.0, "max": 21})}
    settings = {"num_documents": num_docs, "gold_positions": [int(p) for p in positions],
                "built": None if num_docs == 20 else {"from_documents": 20, "from_gold_position": 1,
                                                      "distractors": "random", "distractor_seed": 0},
                "oracle": True, "closed_book": True, "prompt_tokens": tokens, "max_new_tokens": 100}
    return "mdqa", label, metrics, settings, n * (len(positions) + 2)


def _flenqa_run(label, cot, overall, refusal, true_rate, by_ctx, cot_rates=None, n=20):
    """FLenQA results as `eval.flenqa.evaluate` writes them: by_ctx_size {ctx: (accuracy, stderr)}."""
    def group(acc, stderr, count):
        return {**_mean("accuracy", acc, stderr), "refusal_rate": refusal, "true_rate": true_rate,
                **(cot_rates or {}), "n": count}

    metrics = {**_mean("accuracy", *overall), "refusal_rate": refusal, "true_rate": true_rate, **(cot_rates or {}),
               "by_ctx_size": {str(c): group(a, s, n) for c, (a, s) in by_ctx.items()},
               "by_dataset": {"PIR": group(overall[0], 0.05, n * len(by_ctx))},
               "by_dispersion": {"random": group(overall[0], 0.05, n * len(by_ctx))},
               "by_ctx_size_dataset_dispersion": {str(c): {"PIR": {"random": group(a, s, n)}}
                                                  for c, (a, s) in by_ctx.items()}}
    return "flenqa", label, metrics, {"cot": cot, "max_new_tokens": 400 if cot else 100}, n * len(by_ctx)


def _all_runs():
    """(task, label, metrics, settings, num_examples) of a base and a finetuned model. The finetuned model
    was also run at two more 120-document positions (60, 120) and with chain of thought."""
    runs = [
        _mdqa_run("base", 20, {1: (0.675, 0.075), 5: (0.55, 0.08), 10: (0.5, 0.08), 15: (0.525, 0.08),
                               20: (0.6, 0.078)}, (0.8, 0.064), (0.35, 0.076)),
        _mdqa_run("ft", 20, {1: (0.7, 0.073), 5: (0.65, 0.076), 10: (0.625, 0.078), 15: (0.65, 0.076),
                             20: (0.675, 0.075)}, (0.825, 0.061), (0.325, 0.075)),
        _mdqa_run("base", 120, {1: (0.45, 0.08), 2: (0.4, 0.078), 5: (0.35, 0.076), 10: (0.3, 0.073), 15: (0.3, 0.073),
                                20: (0.325, 0.075)}, (0.8, 0.064), (0.35, 0.076)),
        _mdqa_run("ft", 120, {1: (0.5, 0.08), 2: (0.475, 0.08), 5: (0.45, 0.08), 10: (0.425, 0.079), 15: (0.4, 0.078),
                              20: (0.4, 0.078), 60: (0.375, 0.078), 120: (0.45, 0.08)}, (0.825, 0.061), (0.325, 0.075)),
        _flenqa_run("base", False, (0.63, 0.049), 0.04, 0.55,
                    {250: (0.75, 0.099), 500: (0.7, 0.105), 1000: (0.65, 0.109), 2000: (0.55, 0.114),
                     3000: (0.5, 0.115)}),
        _flenqa_run("ft", False, (0.73, 0.045), 0.01, 0.5,
                    {250: (0.8, 0.092), 500: (0.75, 0.099), 1000: (0.75, 0.099), 2000: (0.7, 0.105),
                     3000: (0.65, 0.109)}),
        _flenqa_run("ft", True, (0.76, 0.043), 0.02, 0.48,
                    {250: (0.85, 0.082), 500: (0.8, 0.092), 1000: (0.75, 0.099), 2000: (0.7, 0.105),
                     3000: (0.7, 0.105)},
                    cot_rates={"coverage": 1.6, "coverage_rate": 0.8, "early_answer_rate": 0.15}),
        ("synthetic", "base", {**_mean("value_em", 0.1, 0.021), **_mean("dict_em", 0.35, 0.034),
                               **_mean("both_em", 0.05, 0.015),
                               "by_gold_position": {"1-2": {**_mean("value_em", 0.1, 0.03), "n": 100}}},
         {"position_bins": 5}, 200),
        ("synthetic", "ft", {**_mean("value_em", 0.9, 0.021), **_mean("dict_em", 0.95, 0.015),
                             **_mean("both_em", 0.875, 0.023),
                             "by_gold_position": {"1-2": {**_mean("value_em", 0.9, 0.03), "n": 100}}},
         {"position_bins": 5}, 200),
        ("mmlu", "base", {**_mean("acc", 0.6, 0.004), "acc_macro": 0.61,
                          "by_subject": {"anatomy": _mean("acc", 0.55, 0.043, n=135)}}, {"num_fewshot": 5}, 14042),
        ("mmlu", "ft", {**_mean("acc", 0.595, 0.004), "acc_macro": 0.605,
                        "by_subject": {"anatomy": _mean("acc", 0.55, 0.043, n=135)}}, {"num_fewshot": 5}, 14042),
        ("hellaswag", "base", {**_mean("acc", 0.6, 0.005), **_mean("acc_norm", 0.8, 0.004)}, {"num_fewshot": 0}, 10042),
        ("hellaswag", "ft", {**_mean("acc", 0.605, 0.005), **_mean("acc_norm", 0.795, 0.004)}, {"num_fewshot": 0},
         10042),
        ("gsm8k", "base", {**_mean("exact_match_strict", 0.36, 0.013), **_mean("exact_match_flexible", 0.38, 0.013)},
         {"num_fewshot": 5}, 1319),
        ("gsm8k", "ft", {**_mean("exact_match_strict", 0.35, 0.013), **_mean("exact_match_flexible", 0.37, 0.013)},
         {"num_fewshot": 5}, 1319),
        ("triviaqa", "base", {**_mean("exact_match", 0.62, 0.028), **_mean("exact_match_squad", 0.63, 0.028)},
         {"num_fewshot": 0}, 300),
        ("triviaqa", "ft", {**_mean("exact_match", 0.615, 0.028), **_mean("exact_match_squad", 0.625, 0.028)},
         {"num_fewshot": 0}, 300),
        ("nq_open", "base", {**_mean("exact_match", 0.28, 0.026), **_mean("exact_match_squad", 0.3, 0.026)},
         {"num_fewshot": 0}, 300),
        ("nq_open", "ft", {**_mean("exact_match", 0.275, 0.026), **_mean("exact_match_squad", 0.29, 0.026)},
         {"num_fewshot": 0}, 300),
    ]
    return runs


# Worked out by hand from _all_runs: percent (± stderr), ft - base, "-" where a model has no value.
EXPECTED_TABLE = [
    ("mdqa/20", "best_subspan_em", "57.0 ± 3.0", "66.0 ± 3.0", "+9.0"),        # mean of the positions
    ("mdqa/20", "gold at 1", "67.5 ± 7.5", "70.0 ± 7.3", "+2.5"),
    ("mdqa/20", "gold at 5", "55.0 ± 8.0", "65.0 ± 7.6", "+10.0"),
    ("mdqa/20", "gold at 10", "50.0 ± 8.0", "62.5 ± 7.8", "+12.5"),
    ("mdqa/20", "gold at 15", "52.5 ± 8.0", "65.0 ± 7.6", "+12.5"),
    ("mdqa/20", "gold at 20", "60.0 ± 7.8", "67.5 ± 7.5", "+7.5"),
    ("mdqa/20", "oracle", "80.0 ± 6.4", "82.5 ± 6.1", "+2.5"),
    ("mdqa/20", "closed-book", "35.0 ± 7.6", "32.5 ± 7.5", "-2.5"),
    # 2.125/6 and 3.475/8: means over different gold positions (ft adds 60 and 120), so no difference
    ("mdqa/120", "best_subspan_em", "35.4 ± 3.0", "43.4 ± 3.0", "-"),
    ("mdqa/120", "gold at 1", "45.0 ± 8.0", "50.0 ± 8.0", "+5.0"),
    ("mdqa/120", "gold at 2", "40.0 ± 7.8", "47.5 ± 8.0", "+7.5"),
    ("mdqa/120", "gold at 5", "35.0 ± 7.6", "45.0 ± 8.0", "+10.0"),
    ("mdqa/120", "gold at 10", "30.0 ± 7.3", "42.5 ± 7.9", "+12.5"),
    ("mdqa/120", "gold at 15", "30.0 ± 7.3", "40.0 ± 7.8", "+10.0"),
    ("mdqa/120", "gold at 20", "32.5 ± 7.5", "40.0 ± 7.8", "+7.5"),
    ("mdqa/120", "gold at 60", "-", "37.5 ± 7.8", "-"),
    ("mdqa/120", "gold at 120", "-", "45.0 ± 8.0", "-"),
    ("mdqa/120", "oracle", "80.0 ± 6.4", "82.5 ± 6.1", "+2.5"),
    ("mdqa/120", "closed-book", "35.0 ± 7.6", "32.5 ± 7.5", "-2.5"),
    ("flenqa", "accuracy", "63.0 ± 4.9", "73.0 ± 4.5", "+10.0"),
    ("flenqa", "refusal_rate", "4.0", "1.0", "-3.0"),
    ("flenqa", "true_rate", "55.0", "50.0", "-5.0"),
    ("flenqa", "250 tokens", "75.0 ± 9.9", "80.0 ± 9.2", "+5.0"),
    ("flenqa", "500 tokens", "70.0 ± 10.5", "75.0 ± 9.9", "+5.0"),
    ("flenqa", "1000 tokens", "65.0 ± 10.9", "75.0 ± 9.9", "+10.0"),
    ("flenqa", "2000 tokens", "55.0 ± 11.4", "70.0 ± 10.5", "+15.0"),
    ("flenqa", "3000 tokens", "50.0 ± 11.5", "65.0 ± 10.9", "+15.0"),
    ("flenqa/cot", "accuracy", "-", "76.0 ± 4.3", "-"),
    ("flenqa/cot", "refusal_rate", "-", "2.0", "-"),
    ("flenqa/cot", "true_rate", "-", "48.0", "-"),
    ("flenqa/cot", "coverage_rate", "-", "80.0", "-"),                          # coverage (1.6 facts) is no percentage
    ("flenqa/cot", "early_answer_rate", "-", "15.0", "-"),
    ("flenqa/cot", "250 tokens", "-", "85.0 ± 8.2", "-"),
    ("flenqa/cot", "500 tokens", "-", "80.0 ± 9.2", "-"),
    ("flenqa/cot", "1000 tokens", "-", "75.0 ± 9.9", "-"),
    ("flenqa/cot", "2000 tokens", "-", "70.0 ± 10.5", "-"),
    ("flenqa/cot", "3000 tokens", "-", "70.0 ± 10.5", "-"),
    ("synthetic", "value_em", "10.0 ± 2.1", "90.0 ± 2.1", "+80.0"),
    ("synthetic", "dict_em", "35.0 ± 3.4", "95.0 ± 1.5", "+60.0"),
    ("synthetic", "both_em", "5.0 ± 1.5", "87.5 ± 2.3", "+82.5"),
    ("mmlu", "acc", "60.0 ± 0.4", "59.5 ± 0.4", "-0.5"),
    ("mmlu", "acc_macro", "61.0", "60.5", "-0.5"),
    ("hellaswag", "acc", "60.0 ± 0.5", "60.5 ± 0.5", "+0.5"),
    ("hellaswag", "acc_norm", "80.0 ± 0.4", "79.5 ± 0.4", "-0.5"),
    ("gsm8k", "exact_match_strict", "36.0 ± 1.3", "35.0 ± 1.3", "-1.0"),
    ("gsm8k", "exact_match_flexible", "38.0 ± 1.3", "37.0 ± 1.3", "-1.0"),
    ("triviaqa", "exact_match", "62.0 ± 2.8", "61.5 ± 2.8", "-0.5"),
    ("triviaqa", "exact_match_squad", "63.0 ± 2.8", "62.5 ± 2.8", "-0.5"),
    ("nq_open", "exact_match", "28.0 ± 2.6", "27.5 ± 2.6", "-0.5"),
    ("nq_open", "exact_match_squad", "30.0 ± 2.6", "29.0 ± 2.6", "-1.0"),
]
# Scored examples per model: MDQA 40 x 7 + 40 x 8 (base), 40 x 7 + 40 x 10 (ft); FLenQA 100 (+ 100 CoT);
# synthetic 200; MMLU 14042; HellaSwag 10042; GSM8K 1319; TriviaQA 300; NQ-Open 300.
EXPECTED_EXAMPLES = ("26903", "27083")


def _split_row(line, widths):
    """The cells of a table line, cut at the column widths of its '---' line."""
    cells, start = [], 0
    for w in widths:
        cells.append(line[start:start + w].strip())
        start += w + 2
    return cells


def test_one_table_of_every_task(tmp_path, monkeypatch, capsys):
    from eval import plots
    from eval.results import write_results

    paths = []
    for i, (task, label, metrics, settings, n) in enumerate(_all_runs()):
        out = tmp_path / "results" / f"{i:02d}-{label}-{task}"
        write_results(out, _results(task, label, metrics, n=n, settings={"limit": None, **settings},
                                    environment={"jax": "0", "backend": "cpu", "devices": 1},
                                    predictions="predictions.jsonl"))
        paths.append(out / "results.json")
    # Any order on the command line (here: benchmarks first, MDQA last); the base model's file comes first.
    order = [*range(9, len(paths)), *range(9)]
    plotted = []

    def spy(runs, path, **kwargs):
        plotted.append((path.name, [(r["label"], r["settings"]["num_documents"]) for r in runs]))
        return real(runs, path, **kwargs)

    real = plots.plot_mdqa
    monkeypatch.setattr(plots, "plot_mdqa", spy)
    table = main(["compare", *(str(paths[i]) for i in order), "--out", str(tmp_path / "cmp")])
    lines = table.splitlines()
    widths = [len(dashes) for dashes in lines[1].split("  ")]
    assert _split_row(lines[0], widths) == ["task", "metric (%)", "base", "ft", "ft - base"]
    assert [tuple(_split_row(line, widths)) for line in lines[2:-2]] == EXPECTED_TABLE
    assert _split_row(lines[-2], widths) == ["", "examples", *EXPECTED_EXAMPLES, ""]
    assert lines[-1].startswith("an overall MDQA / FLenQA metric pools the gold positions / context sizes a run")

    assert sorted(plotted) == [("mdqa_compare_120docs.png", [("base", 120), ("ft", 120)]),
                               ("mdqa_compare_20docs.png", [("base", 20), ("ft", 20)])]
    written = sorted(p.name for p in (tmp_path / "cmp").iterdir())
    assert written == ["flenqa_compare.png", "mdqa_compare_120docs.png", "mdqa_compare_20docs.png",
                       "synthetic_compare.png"]
    pngs = [(tmp_path / "cmp" / name).read_bytes() for name in written]
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in pngs) and len(set(pngs)) == 4
    out = capsys.readouterr().out
    assert table in out and all(f"wrote {tmp_path / 'cmp' / name}" in out for name in written)


# --- seeds, --limit, where the plots go, what the plots draw ---------------------------------------------------
def _write(folder, results):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder / "results.json"


def _seeded_mdqa(label, gold1, gold20, oracle, limit=None):
    run = _mdqa(label, [gold1, 0.5, gold20], oracle)
    run["metrics"]["by_gold_position"] = {k: v for k, v in run["metrics"]["by_gold_position"].items() if k != "10"}
    run["settings"]["limit"] = limit
    return run


@pytest.fixture
def seeded(tmp_path):
    """MDQA of a base model and of two finetuned settings over seeds (3 of `template`, 2 of `plain`), each run in
    its own folder as the recipes lay them out (results/<run>/mdqa/results.json)."""
    runs = {"base": _seeded_mdqa("base", 0.50, 0.40, 0.80, limit=2),
            "template-seed0": _seeded_mdqa("template", 0.60, 0.50, 0.85),
            "template-seed1": _seeded_mdqa("template", 0.70, 0.55, 0.95),
            "template-seed2": _seeded_mdqa("template", 0.65, 0.60, 0.90),
            "plain-seed0": _seeded_mdqa("plain", 0.58, 0.42, 0.80),
            "plain-seed1": _seeded_mdqa("plain", 0.52, 0.42, 0.90)}
    return [_write(tmp_path / "results" / name / "mdqa", run) for name, run in runs.items()]


def _capture_axes(monkeypatch):
    """The axes of every plot, read back just before it is saved."""
    from eval import plots

    captured = {}
    real = plots._save

    def spy(fig, ax, path, *args, **kwargs):
        captured[Path(path).name] = ax
        return real(fig, ax, path, *args, **kwargs)

    monkeypatch.setattr(plots, "_save", spy)
    return captured


def _flat(pairs):
    return [v for pair in pairs for v in pair]


def _curves(ax):
    """{legend label: ([(x, y)], [(y - error, y + error)] or None without error bars)} of the lines on `ax`."""
    out = {}
    for container in ax.containers:
        line, _, bars = container.lines
        points = [(float(x), float(y)) for x, y in zip(*line.get_data(), strict=True)]
        spans = [(float(seg[0][1]), float(seg[1][1])) for seg in bars[0].get_segments()] if bars else None
        out[container.get_label()] = (points, spans)
    return out


def test_compare_groups_seeds_by_label(seeded, tmp_path, monkeypatch, capsys):
    """Runs sharing a label are one column: mean ± sample standard deviation (worked out by hand), the
    difference of means against the first label, the repeat count and the --limit of the base in the header;
    the plot draws the same means with error bars of one standard deviation. Without --out the plot goes to
    results/compare/ beside the run folders, never into the current directory."""
    monkeypatch.chdir(tmp_path)
    axes = _capture_axes(monkeypatch)
    table = main(["compare", *map(str, seeded)])
    lines = table.splitlines()
    widths = [len(dashes) for dashes in lines[1].split("  ")]
    assert _split_row(lines[0], widths) == ["task", "metric (%)", "base (limit 2)", "template (n=3)", "plain (n=2)",
                                            "template - base", "plain - base"]
    rows = {tuple(_split_row(line, widths)[:2]): _split_row(line, widths)[2:] for line in lines[2:-3]}
    # template at gold 1: 60, 70, 65 -> mean 65, sd sqrt((25 + 25 + 0) / 2) = 5; plain: 58, 52 -> 55, sd 4.24
    assert rows[("mdqa/20", "gold at 1")] == ["50.0 ± 5.0", "65.0 ± 5.0", "55.0 ± 4.2", "+15.0", "+5.0"]
    # gold 20: 50, 55, 60 -> 55 ± 5; 42, 42 -> 42 ± 0
    assert rows[("mdqa/20", "gold at 20")] == ["40.0 ± 5.0", "55.0 ± 5.0", "42.0 ± 0.0", "+15.0", "+2.0"]
    # oracle: 85, 95, 90 -> 90 ± 5; 80, 90 -> 85 ± 7.07 (the base's single run has no stderr)
    assert rows[("mdqa/20", "oracle")] == ["80.0", "90.0 ± 5.0", "85.0 ± 7.1", "+10.0", "+5.0"]
    assert _split_row(lines[-3], widths) == ["", "examples", "40", "120", "80", "", ""]
    assert lines[-2].startswith("± is the standard error over a run's examples, or for n runs of one label")
    assert lines[-1].startswith("limit N: that run scored only its first N examples")

    plot = tmp_path / "results" / "compare" / "mdqa_compare.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert f"wrote {plot}" in capsys.readouterr().out
    curves = _curves(axes["mdqa_compare.png"])
    assert curves["base (limit 2)"] == ([(1, 50.0), (20, 40.0)], None)
    points, spans = curves["template (mean of 3)"]
    assert _flat(points) == pytest.approx([1, 65.0, 20, 55.0]) and _flat(spans) == pytest.approx([60, 70, 50, 60])
    points, spans = curves["plain (mean of 2)"]
    sd = 18 ** 0.5  # 58 and 52: sqrt((3^2 + 3^2) / (2 - 1))
    assert _flat(points) == pytest.approx([1, 55.0, 20, 42.0])
    assert _flat(spans) == pytest.approx([55 - sd, 55 + sd, 42, 42])
    assert axes["mdqa_compare.png"].get_ylim() == (0.0, 100.0)


def test_flenqa_plot_axis_is_0_to_100_percent_whatever_the_scores(tmp_path, monkeypatch):
    """All-zero accuracies used to give matplotlib's default -0.04..0.04 axis."""
    axes = _capture_axes(monkeypatch)
    by_ctx = {str(c): {"accuracy": 0.0, "refusal_rate": 1.0, "n": 4} for c in (250, 500)}
    path = _write(tmp_path / "flenqa", _results("flenqa", "tiny", {"accuracy": 0.0, "by_ctx_size": by_ctx},
                                                settings={"cot": False, "limit": None}))
    main(["compare", str(path), "--out", str(tmp_path / "cmp")])
    ax = axes["flenqa_compare.png"]
    assert ax.get_ylim() == (0.0, 100.0) and ax.get_ylabel() == "Accuracy (%)"
    assert list(ax.get_xticks()) == [250, 500]


def test_synthetic_plot_by_gold_dictionary_position(tmp_path, monkeypatch):
    """Value accuracy against the gold dictionary's position bins, drawn at the bins' middles, labelled by range."""
    axes = _capture_axes(monkeypatch)
    paths = []
    for label, scores in (("base", (0.2, 0.1, 0.0)), ("ft", (1.0, 0.9, 0.8))):
        bins = {b: {"value_em": v, "dict_em": 0.5, "both_em": 0.5, "n": 10}
                for b, v in zip(("1-4", "5-8", "9-10"), scores, strict=True)}
        paths.append(_write(tmp_path / label, _results("synthetic", label, {"value_em": sum(scores) / 3,
                                                                            "by_gold_position": bins},
                                                       settings={"limit": None})))
    main(["compare", *map(str, paths), "--out", str(tmp_path / "cmp")])
    ax = axes["synthetic_compare.png"]
    assert list(ax.get_xticks()) == [2.5, 6.5, 9.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1-4", "5-8", "9-10"]
    assert _curves(ax) == {"base": ([(2.5, 20.0), (6.5, 10.0), (9.5, 0.0)], None),
                           "ft": ([(2.5, 100.0), (6.5, 90.0), (9.5, 80.0)], None)}
    (tmp_path / "bad").mkdir()
    bad = _results("synthetic", "x", {"value_em": 0.5, "by_gold_position": {"middle": {"value_em": 0.5}}})
    with pytest.raises(SystemExit):
        main(["compare", str(_write(tmp_path / "bad" / "x", bad)), "--out", str(tmp_path)])


def test_eval_summary_prints_oracle_closed_book_and_limit():
    """`python -m eval mdqa` prints the oracle and closed-book scores beside the positions (they were computed
    but not shown) and says when --limit cut the data."""
    from eval.__main__ import summary

    run = _mdqa("ft", [0.65, 0.5, 0.55], 0.85)
    run["metrics"]["closedbook"] = {"best_subspan_em": 0.25, "best_subspan_em_stderr": 0.07, "n": 40}
    run.update(num_examples=200, timing={"eval_s": 12.34}, settings={"limit": 40, "num_documents": 20})
    assert summary(run).splitlines() == [
        "mdqa (ft): 200 examples (--limit 40), 12.3 s",
        "  best_subspan_em: 0.5667 ± 0.0300",
        "  gold at 1: best_subspan_em 0.6500 (n=40)",
        "  gold at 10: best_subspan_em 0.5000 (n=40)",
        "  gold at 20: best_subspan_em 0.5500 (n=40)",
        "  oracle (the gold document alone): best_subspan_em 0.8500 (n=40)",
        "  closed book (no documents): best_subspan_em 0.2500 (n=40)"]


def test_compare_marks_a_cell_fewer_seeds_scored(tmp_path):
    """Two seeds of `ft`, only the first scored at document 1 (65% ± 5): that cell is one run's value ± its
    standard error, not a mean of the header's n=2, and says so; document 20, scored by both (55%, 45%), is
    their mean ± standard deviation (sqrt(50 + 50) = 7.07)."""
    seed0 = _seeded_mdqa("ft", 0.65, 0.55, 0.8)
    seed1 = _seeded_mdqa("ft", 0.0, 0.45, 0.9)
    del seed1["metrics"]["by_gold_position"]["1"]
    base = _seeded_mdqa("base", 0.5, 0.4, 0.8)
    paths = [_write(tmp_path / name, run) for name, run in (("b", base), ("s0", seed0), ("s1", seed1))]
    lines = main(["compare", *map(str, paths), "--out", str(tmp_path / "cmp")]).splitlines()
    widths = [len(dashes) for dashes in lines[1].split("  ")]
    rows = {tuple(_split_row(line, widths)[:2]): _split_row(line, widths)[2:] for line in lines[2:]}
    assert lines[0].split()[3:6] == ["base", "ft", "(n=2)"]
    assert rows[("mdqa/20", "gold at 1")] == ["50.0 ± 5.0", "65.0 ± 5.0 (n=1)", "+15.0"]
    assert rows[("mdqa/20", "gold at 20")] == ["40.0 ± 5.0", "50.0 ± 7.1", "+10.0"]
