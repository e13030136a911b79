"""Our general benchmarks against lm-evaluation-harness 0.4.13 itself, example by example: the harness (its
`hf` backend, its own task configs over the shared files: bench/lmeval_compare.py) and `python -m eval` score
the same rows of HellaSwag, MMLU (0- and 5-shot), GSM8K, TriviaQA and NQ-Open with the same tiny model, and
must agree on the prompts, the choices or extracted answers, the metrics and the log-likelihoods.

The model is random, so its lm_head is scaled up: its choices are decisive (far from ties) and agreement
means the same computation, not luck. Generation is capped at 32 tokens on both sides (the harness's
`--gen_kwargs max_gen_toks=32`) to keep the test short; the defaults are compared in docs/eval.md's table.
"""

import pytest

lm_eval = pytest.importorskip("lm_eval")

from bench import lmeval_compare as C  # noqa: E402

LIMIT = 8
MAX_GEN_TOKS = 32


@pytest.fixture(scope="module")
def harness(decisive_tiny_model, shared_data, tmp_path_factory):
    """One harness run over every task (`hf` backend, float32, CPU), samples logged."""
    out = tmp_path_factory.mktemp("harness")
    names = C.write_tasks(shared_data, out / "tasks")
    results = C.run_harness("hf", {"pretrained": str(decisive_tiny_model), "dtype": "float32", "device": "cpu"},
                            out / "tasks", [t for task in C.TASKS for t in names[task]], limit=LIMIT,
                            gen_kwargs={"max_gen_toks": MAX_GEN_TOKS})
    return names, results


@pytest.mark.parametrize("task", C.TASKS)
def test_per_example_agreement_with_the_harness(task, decisive_tiny_model, shared_data, harness, tmp_path):
    from data_gen.tokenizer import get_tokenizer

    names, results = harness
    ours = C.run_ours(task, decisive_tiny_model, shared_data, tmp_path, limit=LIMIT, max_gen_toks=MAX_GEN_TOKS)
    c = C.compare(task, results, names[task], ours, C.hf_token_ids(decisive_tiny_model),
                  get_tokenizer(decisive_tiny_model).encode_text)
    expected_rows = LIMIT * (len(C.SUBJECTS) if task.startswith("mmlu") else 1)
    assert c.rows == expected_rows
    assert c.same_prompt == c.rows and c.same_ids == c.rows
    assert c.agreement >= 0.99
    assert c.max_metric_gap <= 0.005, c.metrics
    if c.max_ll_gap is not None:
        assert c.max_ll_gap <= 1e-3
    else:
        assert c.same_output >= 0.99 * c.rows
