"""The `needles` model backend of lm-evaluation-harness (eval/lmeval_backend.py) against the harness's own `hf`
backend on the same tiny model: every request type (log-likelihoods of HellaSwag's endings, GSM8K's greedy
generations, rolling log-likelihoods of whole texts), with a 64-token context so that the harness's left
truncation of long requests, long prompts and rolling windows is exercised; and `python -m eval.lmeval`
(the harness's command line) on a LoRA training run, against `hf` on the run's merged export."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

lm_eval = pytest.importorskip("lm_eval")

import eval.lmeval_backend  # noqa: E402,F401  registers "needles"
from bench import lmeval_compare as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4
GEN = {"max_gen_toks": 16}


@pytest.fixture(scope="module")
def tasks(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmeval_tasks")
    return out, C.write_tasks(shared_data, out)


def _check(comparison, rolling: bool = False, rolling_rel: float = 1e-6):
    """Same requests, texts and greedy flags; log-likelihoods within 1e-3 (a rolling one within `rolling_rel` of
    itself) and metrics within 1e-5, or for rolling ones (perplexities: exp of the summed gap over the words)
    within 10 * `rolling_rel`."""
    c = comparison
    assert c.rows > 0 and c.same_arguments == c.rows
    assert c.same_texts == c.texts and c.same_greedy == c.scores
    if rolling:   # a whole text's log-likelihood sums thousands of tokens
        assert c.max_rel_gap <= rolling_rel, (c.max_ll_gap, c.max_rel_gap)
    else:
        assert c.max_ll_gap <= 1e-3
    for ours, reference in c.metrics.values():
        assert ours == pytest.approx(reference, rel=max(1e-5, 10 * rolling_rel) if rolling else 1e-5, abs=1e-9)


def _both_backends(model, tasks_dir, wanted, *, limit=LIMIT, gen_kwargs=GEN, chat=False, **model_args):
    """The harness over `wanted` through the `needles` and the `hf` backend, float32 on CPU."""
    return {backend: C.run_harness(backend, {"pretrained": str(model), **model_args, **extra}, tasks_dir, wanted,
                                   limit=limit, batch_size=4, gen_kwargs=gen_kwargs, chat=chat)
            for backend, extra in (("needles", {"compute_dtype": "float32"}),
                                   ("hf", {"dtype": "float32", "device": "cpu"}))}


def test_every_request_type_as_the_hf_backend(decisive_tiny_model, tasks):
    tasks_dir, names = tasks
    wanted = names["hellaswag"] + names["gsm8k"] + names["wikitext"]
    runs = _both_backends(decisive_tiny_model, tasks_dir, wanted, max_length=64)
    for task in wanted:
        c = C.compare_runs(runs["needles"], runs["hf"], task)
        assert c.rows == LIMIT * (2 if task == "needles_gsm8k" else 1)   # GSM8K: a sample per filter
        assert (c.texts > 0) == (task == "needles_gsm8k") and (c.scores > 0) == (task == "needles_hellaswag")
        _check(c, rolling=task == "needles_wikitext")


def test_chat_template_as_the_hf_backend(decisive_tiny_model, tasks):
    """`--apply_chat_template --fewshot_as_multiturn`: the 5-shot MMLU conversation rendered in the Mistral-Instruct
    format and read back into ids as the Hugging Face tokenizer reads the `hf` backend's rendering."""
    tasks_dir, names = tasks
    wanted = names["mmlu_5shot"][:1]
    runs = _both_backends(decisive_tiny_model, tasks_dir, wanted, limit=2, gen_kwargs=None, chat=True)
    c = C.compare_runs(runs["needles"], runs["hf"], wanted[0])
    assert c.rows == 2 and "[/INST] B</s>[INST]" in runs["hf"]["samples"][wanted[0]][0]["arguments"][0][0]
    _check(c)


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_smollm2_as_the_hf_backend(smollm2_dir, tasks, chat):
    """The real SmolLM2-135M-Instruct: HellaSwag's log-likelihoods and GSM8K's generations, plain and with its
    ChatML template; plain also the rolling log-likelihoods of whole texts, whose first window follows the
    prefix token, SmolLM2's BOS `<|im_start|>` (which its tokenizer never adds to a text). A whole text's sum over
    thousands of tokens through 30 float32 layers drifts by a few 1e-6 of itself between JAX and torch (2.8e-6
    measured), hence 1e-5 (and a word perplexity within 1e-4: 1.1e-5 measured); EOS instead of BOS before the first window moves it by ~1e-4 (1.1 nats on a 15-token
    text), which this still catches."""
    tasks_dir, names = tasks
    wanted = names["hellaswag"] + names["gsm8k"] + ([] if chat else names["wikitext"])
    runs = _both_backends(smollm2_dir, tasks_dir, wanted, chat=chat)
    for task in wanted:
        c = C.compare_runs(runs["needles"], runs["hf"], task)
        assert c.rows == LIMIT * (2 if task == "needles_gsm8k" else 1)
        assert all(s["arguments"][0][0].startswith("<|im_start|>") == chat for s in runs["hf"]["samples"][task]
                   if task != "needles_wikitext")
        _check(c, rolling=task == "needles_wikitext", rolling_rel=1e-5)


def test_smollm2_special_ids_as_the_hf_backend(smollm2_dir):
    """SmolLM2's BOS `<|im_start|>`, which its tokenizer never adds to a text, is still the harness's prefix token
    (an empty context's, a rolling text's first window's), and its EOS `<|im_end|>` the end-of-text token."""
    from transformers import AutoTokenizer

    from data_gen.tokenizer import get_tokenizer
    from jaxtrain.generate import harness_ids, harness_prefix_id

    ours, hf = get_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
    assert hf.encode("Hello") == ours.encode_text("Hello") and hf.bos_token_id not in hf.encode("Hello")
    assert harness_prefix_id(ours) == hf.bos_token_id and ours.eos_id == hf.eos_token_id
    backend = SimpleNamespace(tokenizer=ours)   # the backend's properties read only its tokenizer
    NeedlesLM = eval.lmeval_backend.NeedlesLM
    assert NeedlesLM.prefix_token_id.fget(backend) == hf.bos_token_id
    assert NeedlesLM.eot_token_id.fget(backend) == hf.eos_token_id
    encode = C.hf_token_ids(smollm2_dir)
    for text in ("Hello", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"):
        assert harness_ids(ours, text) == encode(text)


@pytest.mark.slow
def test_sharded_over_eight_devices_as_on_one(decisive_tiny_model):
    """shard=True: the weights split fsdp-wise over the test process's 8 CPU devices, as on a TPU slice (slow:
    ~25 s of compiling; sharded decoding itself is in the default suite through `python -m eval --shard`)."""
    import jax
    from lm_eval.api.instance import Instance

    assert jax.device_count() == 8
    requests = {
        "loglikelihood": [("Roof shingle removal: A man is sitting on a roof. He", " is using wrap."),
                          ("Question: What is 2 + 3?\nAnswer:", " 5")],
        "loglikelihood_rolling": [("Paris is the capital of France. " * 12,)],
        "generate_until": [("Question: What is 2 + 3?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8})],
    }
    out = {}
    for shard in (False, True):
        lm = eval.lmeval_backend.NeedlesLM(pretrained=str(decisive_tiny_model), compute_dtype="float32",
                                           shard=shard, max_length=32, batch_size=2)
        out[shard] = {kind: getattr(lm, kind)([Instance(kind, {}, args, i) for i, args in enumerate(reqs)],
                                              disable_tqdm=True)
                      for kind, reqs in requests.items()}
    assert out[True]["generate_until"] == out[False]["generate_until"]
    for kind in ("loglikelihood", "loglikelihood_rolling"):
        flat = [(r[0] if isinstance(r, tuple) else r) for r in out[True][kind]]
        assert flat == pytest.approx([(r[0] if isinstance(r, tuple) else r) for r in out[False][kind]], rel=1e-5)


def test_command_line_on_a_lora_run(decisive_tiny_model, tasks, tmp_path):
    """`python -m eval.lmeval --model needles --model_args pretrained=RUN` (adapters unmerged on the run's
    base) scores as the `hf` backend does on the run exported merged."""
    from tiny_runs import write_lora_run

    from jaxtrain.__main__ import main as jaxtrain_main

    tasks_dir, names = tasks
    write_lora_run(tmp_path / "run", decisive_tiny_model)
    assert jaxtrain_main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "merged"),
                          "--dtype", "float32", "--merged"]) == 0
    wanted = names["hellaswag"]   # generation through the backend is compared above, through LoRA in test_eval_lora
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "eval.lmeval", "--model", "needles", "--model_args",
                    f"pretrained={tmp_path / 'run'},compute_dtype=float32", "--batch_size", "4",
                    "--tasks", ",".join(wanted), "--include_path", str(tasks_dir), "--limit", str(LIMIT),
                    "--output_path", str(tmp_path / "out"), "--log_samples"],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    ours = C.read_cli_output(tmp_path / "out")
    reference, base = (C.run_harness("hf", {"pretrained": str(model), "dtype": "float32", "device": "cpu"},
                                     tasks_dir, wanted, limit=LIMIT, batch_size=4)
                       for model in (tmp_path / "merged", decisive_tiny_model))
    _check(C.compare_runs(ours, reference, "needles_hellaswag"))
    assert C.compare_runs(ours, base, "needles_hellaswag").max_ll_gap > 1.0   # the adapters change the scores
