"""Every task end to end from the command line on the shared data, with a tiny random model saved as an HF
folder (accuracy is meaningless; plumbing, counts and formats are checked). One MMLU log-likelihood is
recomputed independently with transformers' PyTorch Mistral and the HF tokenizer from the same folder."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from data_gen import tasks as data_tasks
from eval import metrics as M
from eval.__main__ import main
from eval.results import load_results


def run(task, model, out, *flags):
    results = main([task, "--model", str(model), "--out", str(out), "--batch-size", "4", "--no-progress", *flags])
    assert load_results(out) == results
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == results["num_examples"]
    for source in results["data"]:
        with open(source["path"], "rb") as f:
            assert source["sha256"] == hashlib.sha256(f.read()).hexdigest()
    return results, predictions


def mean(values):
    return sum(values) / len(values)


def test_mdqa_and_compare(tiny_model, shared_data, tmp_path, capsys):
    results, preds = run("mdqa", tiny_model, tmp_path / "mdqa", "--data-dir", str(shared_data / "mdqa"),
                         "--positions", "1", "20", "--no-oracle", "--limit", "1", "--max-new-tokens", "4",
                         "--batch-size", "2")
    assert results["num_examples"] == 2 and results["settings"]["num_documents"] == 20
    assert [(p["setting"], p["gold_position"]) for p in preds] == [("1", 1), ("20", 20)]
    for p in preds:
        assert p["answer"] == M.first_line(p["output"])
        assert p["best_subspan_em"] == M.best_subspan_em(p["answer"], p["answers"])
        assert p["prompt_tokens"] > 2000  # 20 passages
    by_pos = results["metrics"]["by_gold_position"]
    assert list(by_pos) == ["1", "20"] and by_pos["20"]["best_subspan_em"] == preds[1]["best_subspan_em"]
    assert "oracle" not in results["metrics"]
    assert (tmp_path / "mdqa" / "mdqa_positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    table = main(["compare", str(tmp_path / "mdqa"), str(tmp_path / "mdqa" / "results.json"),
                  "--labels", "base", "finetuned", "--out", str(tmp_path / "cmp")])
    assert "base" in table and "finetuned" in table and "gold at 20" in table and "+0.0" in table
    assert table in capsys.readouterr().out
    assert (tmp_path / "cmp" / "mdqa_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_mdqa_all_positions_and_oracle(tiny_model, shared_data, tmp_path):
    results, preds = run("mdqa", tiny_model, tmp_path, "--data-dir", str(shared_data / "mdqa"), "--limit", "2",
                         "--max-new-tokens", "8")
    assert list(results["metrics"]["by_gold_position"]) == ["1", "5", "10", "15", "20"]
    assert results["metrics"]["oracle"]["n"] == 2 and results["num_examples"] == 12
    assert [p["setting"] for p in preds].count("oracle") == 2


def test_synthetic(tiny_model, tmp_path):
    cfg = data_tasks.PRESETS["demo-simple"].replace(num_train=0, num_eval=4)
    data_tasks.generate(cfg, 0, tmp_path / "data", progress=False)
    results, preds = run("synthetic", tiny_model, tmp_path / "out", "--data-dir", str(tmp_path / "data"),
                         "--limit", "3", "--max-new-tokens", "6")
    assert results["num_examples"] == 3
    for name in ("value_em", "dict_em", "both_em"):
        assert results["metrics"][name] == mean([p[name] for p in preds])
    assert sum(b["n"] for b in results["metrics"]["by_gold_position"].values()) == 3
    assert (tmp_path / "out" / "synthetic_positions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mmlu_loglikelihood_matches_transformers(tiny_model, shared_data, tmp_path):
    results, preds = run("mmlu", tiny_model, tmp_path, "--data-dir", str(shared_data / "mmlu"),
                         "--subjects", "abstract_algebra", "medical_genetics", "--limit", "2", "--num-fewshot", "2")
    assert results["num_examples"] == 4 and results["metrics"]["acc"] == mean([p["acc"] for p in preds])
    assert set(results["metrics"]["by_subject"]) == {"abstract_algebra", "medical_genetics"}

    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.mmlu import build_context, read_mmlu_csv

    dev = read_mmlu_csv(shared_data / "mmlu" / "dev" / "abstract_algebra_dev.csv", "abstract_algebra")
    test = read_mmlu_csv(shared_data / "mmlu" / "test" / "abstract_algebra_test.csv", "abstract_algebra")
    context = build_context(test[0], dev[:2])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ctx_len = len(tok(context)["input_ids"])
    expected = []
    for letter in "ABCD":
        ids = tok(context + " " + letter, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
        expected.append(sum(logprobs[t - 1, ids[0, t]].item() for t in range(ctx_len, ids.shape[1])))
    assert preds[0]["question"] == test[0].question
    np.testing.assert_allclose(preds[0]["loglikelihoods"], expected, rtol=1e-4, atol=1e-3)


def test_hellaswag(tiny_model, shared_data, tmp_path):
    results, preds = run("hellaswag", tiny_model, tmp_path, "--data-file",
                         str(shared_data / "hellaswag" / "hellaswag_val.txt"), "--limit", "3")
    assert results["num_examples"] == 3
    for p in preds:
        lls = p["loglikelihoods"]
        assert p["prediction"] == int(np.argmax(lls))
        assert p["prediction_norm"] == int(np.argmax([ll / len(c) for ll, c in zip(lls, p["choices"])]))
    assert results["metrics"]["acc_norm"] == mean([p["acc_norm"] for p in preds])


def test_gsm8k(tiny_model, shared_data, tmp_path):
    results, preds = run("gsm8k", tiny_model, tmp_path, "--data-file", str(shared_data / "gsm8k" / "gsm8k_test.jsonl"),
                         "--limit", "2", "--max-new-tokens", "8")
    assert results["num_examples"] == 2 and results["settings"]["num_fewshot"] == 5
    assert [p["target"] for p in preds] == ["18", "3"]
    for p in preds:
        assert p["strict"] == M.gsm8k_extract_strict(p["output"]) and "Question:" not in p["output"]


@pytest.mark.parametrize("task, path", [("triviaqa", "triviaqa/triviaqa_sm_sub.jsonl"),
                                        ("nq_open", "nq_open/nq_open_dev.jsonl")])
def test_open_qa(tiny_model, shared_data, tmp_path, task, path):
    results, preds = run(task, tiny_model, tmp_path, "--data-file", str(shared_data / path), "--limit", "3",
                         "--max-new-tokens", "6")
    assert results["num_examples"] == 3
    for p in preds:
        assert not any(s in p["output"] for s in ("\n", ".", ","))  # cut at the stop strings
        assert p["answer"] == p["output"].strip()
    assert results["metrics"]["exact_match"] == mean([p["exact_match"] for p in preds])


def test_sharded_model_scores_like_unsharded(tiny_model, shared_data, tmp_path):
    """--shard on 8 (CPU) devices: parameters split fsdp-wise as in training, same log-likelihoods."""
    import os
    import subprocess
    import sys

    flags = ["--data-file", str(shared_data / "hellaswag" / "hellaswag_val.txt"), "--limit", "2"]
    _, unsharded = run("hellaswag", tiny_model, tmp_path / "one", *flags)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "eval", "hellaswag", "--model", str(tiny_model), "--out",
                    str(tmp_path / "eight"), "--batch-size", "4", "--no-progress", "--shard", *flags],
                   check=True, env=env, capture_output=True, cwd=Path(__file__).resolve().parents[1])
    results = load_results(tmp_path / "eight")
    assert results["settings"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    sharded = [json.loads(line) for line in (tmp_path / "eight" / "predictions.jsonl").read_text().splitlines()]
    for a, b in zip(unsharded, sharded, strict=True):
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], rtol=1e-4)
