"""Our general benchmarks against lm-evaluation-harness 0.4.13 itself, example by example: the harness (its
`hf` backend, its own task configs over the shared files: bench/lmeval_compare.py) and `python -m eval` score
the same rows of HellaSwag, MMLU (0- and 5-shot), GSM8K, TriviaQA and NQ-Open with the same model, and must
agree on the prompts, the choices or extracted answers, the metrics and the log-likelihoods; plain, and with the
model's chat template (the harness's `--apply_chat_template --fewshot_as_multiturn` against our `--chat-template`).

The default suite uses a tiny random model whose lm_head is scaled up: its choices are decisive (far from ties)
and agreement means the same computation, not luck (Mistral's tokenizer and Mistral-Instruct template). The
slow tests run the real SmolLM2-135M-Instruct (its own BPE tokenizer and ChatML template). Generation is
capped at 32 tokens on both sides (the harness's `--gen_kwargs max_gen_toks=32`) to keep the tests short; the
defaults are compared in docs/eval.md's tables.
"""

import functools

import pytest

lm_eval = pytest.importorskip("lm_eval")

from bench import lmeval_compare as C  # noqa: E402

LIMIT = 8
SMOLLM2_LIMIT = 4
"""rows per task (per subject for MMLU) of the slow SmolLM2 comparison, which runs every task twice (plain, chat)"""
MAX_GEN_TOKS = 32
CHAT_TASKS = ("mmlu_5shot", "gsm8k", "nq_open")
"""the tiny model's chat checks: a system message (the task description) with answered turns, scored and
generated, and a description alone"""


def run_harness(model, shared_data, out, tasks, *, chat: bool, limit: int = LIMIT):
    """One harness run over `tasks` (`hf` backend, float32, CPU), samples logged."""
    names = C.write_tasks(shared_data, out / "tasks")
    results = C.run_harness("hf", {"pretrained": str(model), "dtype": "float32", "device": "cpu"}, out / "tasks",
                            [t for task in tasks for t in names[task]], limit=limit,
                            gen_kwargs={"max_gen_toks": MAX_GEN_TOKS}, chat=chat)
    return names, results


def check_against_harness(task, model, shared_data, harness, tmp_path, *, chat: bool, template_start: str,
                          limit: int = LIMIT):
    """`python -m eval <task>` on the harness's rows: same prompts and ids, choices or answers, metrics and
    log-likelihoods. `template_start`: how the model's chat template begins a rendered conversation, which the
    harness's contexts must (chat) or must not (plain) begin with."""
    from data_gen.tokenizer import get_tokenizer
    from jaxtrain.generate import harness_ids

    names, results = harness
    contexts = [s["arguments"][0][0] for t in names[task] for s in results["samples"][t]]
    assert contexts and all(c.startswith(template_start) == chat for c in contexts)
    ours = C.run_ours(task, model, shared_data, tmp_path, limit=limit, max_gen_toks=MAX_GEN_TOKS,
                      flags=["--chat-template"] if chat else [])
    c = C.compare(task, results, names[task], ours, C.hf_token_ids(model),
                  functools.partial(harness_ids, get_tokenizer(model)))
    expected_rows = limit * (len(C.SUBJECTS) if task.startswith("mmlu") else 1)
    assert c.rows == expected_rows
    assert c.same_prompt == c.rows and c.same_ids == c.rows
    assert c.agreement >= 0.99
    assert c.max_metric_gap <= 0.005, c.metrics
    if c.max_ll_gap is not None:
        assert c.max_ll_gap <= 1e-3
    else:
        assert c.same_output >= 0.99 * c.rows
    return c


@pytest.fixture(scope="module")
def harness(decisive_tiny_model, shared_data, tmp_path_factory):
    return run_harness(decisive_tiny_model, shared_data, tmp_path_factory.mktemp("harness"), C.TASKS, chat=False)


@pytest.fixture(scope="module")
def harness_chat(decisive_tiny_model, shared_data, tmp_path_factory):
    return run_harness(decisive_tiny_model, shared_data, tmp_path_factory.mktemp("harness_chat"), CHAT_TASKS,
                       chat=True)


@pytest.mark.parametrize("task", C.TASKS)
def test_per_example_agreement_with_the_harness(task, decisive_tiny_model, shared_data, harness, tmp_path):
    check_against_harness(task, decisive_tiny_model, shared_data, harness, tmp_path, chat=False,
                          template_start="<s>[INST]")


@pytest.mark.parametrize("task", CHAT_TASKS)
def test_chat_template_as_the_harness_applies_it(task, decisive_tiny_model, shared_data, harness_chat, tmp_path):
    """The Mistral-Instruct template: the description joins the first user turn, answered examples follow as
    `[/INST] answer</s>[INST]`, and a choice is scored right after `[/INST]` (no generation prompt, no delimiter)."""
    check_against_harness(task, decisive_tiny_model, shared_data, harness_chat, tmp_path, chat=True,
                          template_start="<s>[INST]")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat"])
def smollm2_harness(request, smollm2_dir, shared_data, tmp_path_factory):
    chat = request.param
    return chat, run_harness(smollm2_dir, shared_data, tmp_path_factory.mktemp("harness_smollm2"), C.TASKS, chat=chat,
                             limit=SMOLLM2_LIMIT)


@pytest.mark.slow
@pytest.mark.parametrize("task", C.TASKS)
def test_smollm2_per_example_agreement_with_the_harness(task, smollm2_dir, shared_data, smollm2_harness, tmp_path):
    """The real SmolLM2-135M-Instruct, plain and with its ChatML template (the description as the system message,
    else the template's default one; each choice scored after `<|im_start|>assistant`, its newline included as
    the harness moves it into the continuation)."""
    chat, harness = smollm2_harness
    check_against_harness(task, smollm2_dir, shared_data, harness, tmp_path, chat=chat,
                          template_start="<|im_start|>", limit=SMOLLM2_LIMIT)
