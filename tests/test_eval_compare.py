"""`python -m eval compare` and the MDQA plot on hand-written results files (values worked out by hand)."""

import json

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
    assert lines[0].split() == ["task", "metric", "(%)", "base", "ft", "B", "-", "A"]
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
