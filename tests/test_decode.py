"""KV-cache decoding against `transformers.generate(do_sample=False)` and full-forward scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from data_gen.tokenizer import EOS_ID
from hf_reference import hf_model, tiny_config
from jaxtrain import attention, kv_cache, model
from jaxtrain.generate import Generator, bucket_length
from jaxtrain.hf_io import load_pretrained


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random model with a short sliding window (8), in both frameworks."""
    folder = tmp_path_factory.mktemp("hf")
    config = tiny_config(sliding_window=8, vocab_size=32000, num_kv_heads=1)
    reference = hf_model(config, seed=3)
    with torch.no_grad():  # sharpen the output layer so greedy choices are far from ties
        reference.lm_head.weight.mul_(20.0)
    reference.save_pretrained(folder)
    ours_config, params = load_pretrained(folder, config_overrides=dict(dtype="float32"))
    return reference, ours_config, params


def _hf_greedy(reference, prompt, max_new_tokens):
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=EOS_ID, pad_token_id=0)
    ids = out[0, len(prompt):].tolist()
    return ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids


@pytest.mark.parametrize("impl, per_layer", [("xla", False), ("chunked", False), ("auto", True)])
def test_greedy_matches_transformers_including_prompts_longer_than_the_window(models, impl, per_layer,
                                                                                 monkeypatch):
    """Both CPU attention paths of the prefill (the chunked one in blocks of 8 queries, tiles of 4 keys),
    with the stacked layer scan and with per-layer buffers ("auto" on CPU: chunked prefill from 16 tokens,
    the one-query decode step), decode exactly like transformers; `timings` accounts for every prompt
    token and decode step."""
    reference, config, params = models
    monkeypatch.setattr(attention, "CHUNK", 8)
    monkeypatch.setattr(attention, "KEY_CHUNK", 4)
    monkeypatch.setattr(attention, "CHUNKED_MIN_LEN", 16)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 32000, size=n).tolist() for n in (3, 20, 11, 5, 30)]
    gen = Generator(config.replace(attention_impl=impl), params, batch_size=4)
    assert kv_cache.is_per_layer(gen.params) == per_layer
    ours = gen.generate(prompts, max_new_tokens=12, progress=False)
    for prompt, got in zip(prompts, ours):
        assert len(got.token_ids) == 12, "the test needs rows that run to the token limit"
        assert got.token_ids == _hf_greedy(reference, prompt, 12), f"prompt of {len(prompt)} tokens"
    assert gen.timings.prompt_tokens == sum(map(len, prompts))
    assert gen.timings.decode_steps == 2 * 11   # two batches, 11 steps after the prefill's token
    assert gen.timings.prefill_s > 0 and gen.timings.decode_s > 0


def test_batch_of_one_decodes_like_transformers(models):
    """At batch 1 each per-layer cache write is a one-token scatter, which `write_cache` pads with an
    update that is dropped (see there): the dropped one must never land in the cache."""
    reference, config, params = models
    rng = np.random.default_rng(2)
    prompts = [[1] + rng.integers(3, 32000, size=n).tolist() for n in (4, 13)]
    gen = Generator(config, params, batch_size=1)
    assert kv_cache.is_per_layer(gen.params)
    for prompt, got in zip(prompts, gen.generate(prompts, max_new_tokens=10, progress=False)):
        assert got.token_ids == _hf_greedy(reference, prompt, 10)


def test_prompt_in_a_quarter_step_bucket_decodes_like_transformers(models):
    """A 1100-token prompt is padded to 1280 (not 2048), which the CPU prefill splits into query blocks of
    512, 512 and 256; it and a short row in the same batch decode as transformers does."""
    reference, config, params = models
    rng = np.random.default_rng(5)
    prompts = [[1] + rng.integers(3, 32000, size=n).tolist() for n in (1099, 40)]
    assert bucket_length(len(prompts[0])) == 1280
    gen = Generator(config, params, batch_size=2, max_length=2048)   # the test config says 512
    for prompt, got in zip(prompts, gen.generate(prompts, max_new_tokens=6, progress=False)):
        assert got.token_ids == _hf_greedy(reference, prompt, 6), f"prompt of {len(prompt)} tokens"


def test_sharded_generator_decodes_like_transformers(models):
    """Parameters split fsdp-wise over 8 CPU devices and decoding under the mesh and its rules (what
    `eval --shard` runs, KV cache sharding constraints included): the same tokens as transformers."""
    from jaxtrain.sharding import MeshConfig, logical_to_sharding, make_mesh

    reference, config, params = models
    mesh = make_mesh(MeshConfig(fsdp=-1), jax.devices()[:8])
    sharded = jax.device_put(params, logical_to_sharding(model.param_logical_axes(config), mesh))
    rng = np.random.default_rng(1)
    prompts = [[1] + rng.integers(3, 32000, size=n).tolist() for n in (9, 17)]
    ours = Generator(config, sharded, batch_size=8, mesh=mesh).generate(prompts, max_new_tokens=6, progress=False)
    for prompt, got in zip(prompts, ours):
        assert got.token_ids == _hf_greedy(reference, prompt, 6)


def test_stop_strings_cut_each_row(models):
    _, config, params = models
    gen = Generator(config, params, batch_size=2)
    prompts = [[1, 100, 200], [1, 300, 400, 500]]
    full = gen.generate(prompts, max_new_tokens=10, progress=False)
    stop = full[0].text[2:4] or full[0].text[:1]
    cut = gen.generate(prompts, max_new_tokens=10, stop_strings=[stop], progress=False)
    assert cut[0].text == full[0].text[: full[0].text.find(stop)]
    if stop not in full[1].text:
        assert cut[1].text == full[1].text


def test_loglikelihood_equals_full_forward(models):
    _, config, params = models
    rng = np.random.default_rng(1)
    requests = [([1] + rng.integers(3, 32000, size=n).tolist(), rng.integers(3, 32000, size=m).tolist())
                for n, m in ((5, 1), (12, 4), (30, 2))]
    scores = Generator(config, params, batch_size=2).loglikelihood(requests, progress=False)
    for (context, continuation), (logprob, greedy) in zip(requests, scores):
        ids = jnp.asarray([context + continuation], jnp.int32)
        logp = jax.nn.log_softmax(model.forward(config, params, ids)[0], axis=-1)
        rows = np.arange(len(context) - 1, len(context) + len(continuation) - 1)
        expected = float(logp[rows, np.asarray(continuation)].sum())
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((np.argmax(logp[rows], -1) == np.asarray(continuation)).all())
    # a continuation that *is* the greedy one is reported as greedy
    context = requests[0][0]
    first = int(np.argmax(model.forward(config, params, jnp.asarray([context], jnp.int32))[0, -1]))
    assert Generator(config, params).loglikelihood([(context, [first])], progress=False)[0][1]


def test_loglikelihood_cuts_long_requests_like_the_harness(models):
    """A request longer than the model keeps its last max_length + 1 tokens, all but the last as input (the
    `hf` backend of lm-evaluation-harness): a rolling window of exactly max_length + 1 tokens is scored whole."""
    _, config, params = models
    rng = np.random.default_rng(4)
    context, continuation = [1] + rng.integers(3, 32000, size=25).tolist(), rng.integers(3, 32000, size=6).tolist()
    (logprob, _), = Generator(config, params, max_length=16).loglikelihood([(context, continuation)], progress=False)
    kept = (context + continuation)[-17:]
    logp = jax.nn.log_softmax(model.forward(config, params, jnp.asarray([kept[:-1]], jnp.int32))[0], axis=-1)
    expected = float(logp[np.arange(10, 16), np.asarray(kept[11:])].sum())
    assert logprob == pytest.approx(expected, abs=1e-4)


def test_stop_strings_after_leading_whitespace(models, monkeypatch):
    """With skip_leading_whitespace a newline before the answer does not end decoding; one after it does."""
    _, config, params = models
    texts = ["", "\n", "\n A", "\n A\nB", "\n A\nBC"]   # the text of the first n generated tokens
    gen = Generator(config, params, batch_size=1)
    monkeypatch.setattr(gen.tokenizer, "decode", lambda ids: texts[len(ids)])
    plain = gen.generate([[1, 5]], max_new_tokens=4, stop_strings=["\n"], progress=False)[0]
    answer = gen.generate([[1, 5]], max_new_tokens=4, stop_strings=["\n"], progress=False,
                          skip_leading_whitespace=True)[0]
    assert EOS_ID not in answer.token_ids and len(answer.token_ids) == 4
    assert plain.text == "" and answer.text == "\n A"


def test_sampling_is_reproducible_and_top_p_tiny_is_greedy(models):
    _, config, params = models
    gen = Generator(config, params, batch_size=2)
    prompts = [[1, 5, 6, 7]]
    a = gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=7, progress=False)
    b = gen.generate(prompts, max_new_tokens=6, temperature=1.0, seed=7, progress=False)
    assert a[0].token_ids == b[0].token_ids
    nucleus = gen.generate(prompts, max_new_tokens=6, temperature=1.0, top_p=1e-9, progress=False)
    greedy = gen.generate(prompts, max_new_tokens=6, progress=False)
    assert nucleus[0].token_ids == greedy[0].token_ids


def test_bad_requests_are_refused(models):
    _, config, params = models
    gen = Generator(config, params, max_length=64)
    with pytest.raises(ValueError, match="prompt 1 has 70 tokens"):
        gen.generate([[1, 2], [1] * 70], max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="empty continuation"):
        gen.loglikelihood([([1, 2], [])], progress=False)
    with pytest.raises(ValueError, match="empty context"):
        gen.loglikelihood([([], [5, 6])], progress=False)


def test_bucket_ladder():
    # powers of two up to 1024 tokens (at least 32), then quarter steps of each doubling
    assert [bucket_length(n) for n in (1, 32, 33, 1000, 1024)] == [32, 32, 64, 1024, 1024]
    assert [bucket_length(n) for n in (1025, 1281, 1537, 1793, 2049, 2100, 3585, 3885, 4097)] == \
        [1280, 1536, 1792, 2048, 2560, 2560, 4096, 4096, 5120]
    assert bucket_length(20_000) == 20_480 and bucket_length(24_577) == 28_672
    assert bucket_length(1, minimum=1) == 1 and bucket_length(3, minimum=1) == 4


def test_prompt_bucket_keeps_long_prompts_on_the_kernel_tile():
    from jaxtrain.generate import prompt_bucket

    assert prompt_bucket(100, 4000) == 128
    assert prompt_bucket(20_000, 32_768 - 100) == 20_480
    assert prompt_bucket(30_000, 32_768 - 100) == 32_640   # capped: 32,668 rounded down to 128s
    assert prompt_bucket(32_650, 32_768 - 100) == 32_650   # never shorter than the prompt
