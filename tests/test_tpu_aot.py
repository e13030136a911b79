"""`python -m jaxtrain aot`: the real train step compiled for TPU slices on this CPU machine."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain import aot
from jaxtrain.config import ModelConfig
from jaxtrain.topology import GIB, parse_accelerator_type


def run_main(capsys, *args):
    """(stdout lines, the JSON report); stderr must say what compiles before the compiler's silent minutes."""
    cfg = tyro.cli(aot.AotConfig, args=list(args))
    assert aot.main(cfg) == 0
    out, err = capsys.readouterr()
    what = "greedy decode" if cfg.step == "decode" else "train, LoRA" if cfg.adapters.lora_rank else "train, full"
    assert err.startswith(f"aot: compiling one step ({what}") and f") of {cfg.model} for {cfg.topology} (" in err
    lines = out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_tiny_train_step_compiles_for_v5e_8(capsys):
    """The issue's in-suite proof: the real step (answer-only loss, AdamW, donation, splash) for a v5e-8."""
    lines, report = run_main(capsys, "--model", "tiny", "--topology", "v5e-8", "--seq-len", "256",
                             "--global-batch", "8", "--answer-tokens", "16")
    assert report["fits"] is True and report["error"] is None
    assert (report["topology"], report["chips"], report["seq_len"], report["global_batch"]) == ("v5e-8", 8, 256, 8)
    assert report["per_chip_bytes"] == (report["argument_bytes"] + report["temp_bytes"] + report["generated_code_bytes"]
                                        + report["output_bytes"] - report["alias_bytes"])
    assert report["output_bytes"] - report["alias_bytes"] < 2**16  # the metrics: the state updates in place
    # Arguments per chip: fp32 params + two fp32 Adam moments, FSDP-split 8 ways, plus 1/8 of the batch
    # (4 arrays of 8 x 256; TPU tiling pads these small shards, hence the tolerance).
    n = ModelConfig.preset("tiny").num_params
    state = 3 * 4 * n / 8
    assert report["argument_bytes"] == pytest.approx(state + 4 * 8 * 256 * 4 / 8, rel=0.05)
    assert report["alias_bytes"] >= 0.95 * state          # the donated state is updated in place
    assert report["options"]["attention"] == "splash"
    assert "fits" in lines[0] and "GiB per chip" in lines[0]


def test_offloaded_optimizer_state_leaves_hbm(capsys):
    """With --offload-state the Adam moments are host arguments: HBM holds the fp32 params only."""
    _, report = run_main(capsys, "--model", "tiny", "--topology", "v5e-8", "--seq-len", "256",
                         "--global-batch", "8", "--answer-tokens", "16", "--offload-state",
                         "--remat", "offload_input")
    assert report["fits"] is True
    n = ModelConfig.preset("tiny").num_params
    assert report["host_argument_bytes"] == pytest.approx(2 * 4 * n / 8, rel=0.05)
    assert report["argument_bytes"] == pytest.approx(4 * n / 8 + 4 * 8 * 256 * 4 / 8, rel=0.05)


def test_out_of_memory_is_a_report_not_an_error(capsys):
    lines, report = run_main(capsys, "--model", "tiny", "--topology", "v5e-1", "--seq-len", "4096",
                             "--global-batch", "2048", "--answer-tokens", "512")
    assert report["fits"] is False
    assert "RESOURCE_EXHAUSTED" in report["error"] and "HBM" in report["error"]
    assert report["required_gib_reported"] > 15.75
    assert "DOES NOT FIT" in lines[0]


def test_bad_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="--global-batch 12 must be a multiple of 8"):
        aot.aot_train_step(tyro.cli(aot.AotConfig, args=["--model", "tiny", "--global-batch", "12"]))


def test_compile_for_topology_reads_the_compilers_accounting():
    """A donated fp32 update on 4 v4 chips: arguments, aliasing and per-chip sum, computed by hand."""
    topo = parse_accelerator_type("v4-8")
    mesh = jax.sharding.Mesh(np.array(topo.devices()), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    arg = jax.ShapeDtypeStruct((4096, 1024), jnp.float32, sharding=sharding)
    report = aot.compile_for_topology(lambda w, g: w - 0.1 * g, (arg, arg), (sharding, sharding), sharding,
                                      (0,), topo)
    shard = 4096 * 1024 * 4 // 4
    assert (report.argument_bytes, report.output_bytes, report.alias_bytes) == (2 * shard, shard, shard)
    assert report.per_chip_bytes == report.argument_bytes + report.temp_bytes + report.generated_code_bytes
    assert report.fits and report.hbm_bytes == round(30.75 * GIB)
    assert report.flops_compiler == pytest.approx(2 * 1024 * 1024, rel=0.01)  # a multiply and a subtract


def test_flops_analytic_against_a_hand_count():
    """6 N per token plus causal attention, with N from the published Mistral-7B parameter count
    (7,241,732,096: transformers' MistralForCausalLM for this config, counted on the meta device)."""
    config = ModelConfig.preset("mistral-7b-v0.1")
    total = 7_241_732_096
    embed_and_head = 2 * 32000 * 4096
    rows, seq, answer = 16, 4096, 64
    tokens = rows * seq
    body = 6 * (total - embed_and_head) * tokens
    head = 6 * 32000 * 4096 * rows * answer
    # window (4096) == row length: a query sees seq / 2 keys on average; 2 matmuls x 2 FLOPs x 3 (fwd+bwd)
    attention = 12 * 32 * 32 * 128 * (seq / 2) * tokens
    got = aot.flops_analytic(config, tokens, seq, logit_tokens=rows * answer)
    assert got == pytest.approx(body + head + attention, rel=1e-4)


# --- the other steps a user must fit: LoRA on a quantised base, and eval's decoding -------------------

def model_folder(tmp_path, hidden: int, **overrides) -> tuple[ModelConfig, list[str]]:
    """A config.json-only model folder whose weights are large next to TPU tile padding (with `hidden` / 8
    >= 128 even their 8-way shards fill whole tiles), so that hand counts of argument bytes hold to a few
    per cent; and its --model flag."""
    config = ModelConfig.preset("tiny").replace(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                                                  num_heads=hidden // 128, num_kv_heads=2, head_dim=128,
                                                  max_position_embeddings=4096).replace(**overrides)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    return config, ["--model", str(tmp_path)]


def test_decode_step_compiles_for_v5e_8(capsys, tmp_path):
    """Eval's generation (prefill, then a chunk of cached steps) with bf16 weights split over 8 chips."""
    config, model = model_folder(tmp_path, hidden=1024)
    lines, report = run_main(capsys, *model, "--topology", "v5e-8", "--step", "decode", "--seq-len", "200",
                             "--global-batch", "8", "--new-tokens", "20")
    assert report["fits"] is True and report["error"] is None
    assert report["prefill_len"] == 256                    # eval pads a 200-token prompt to 256
    assert set(report["programs"]) == {"prefill", "decode_chunk"}
    prefill, chunk = report["programs"]["prefill"], report["programs"]["decode_chunk"]
    # Prefill arguments: bf16 weights split 8 ways, plus 3 replicated [8, 256] int32 inputs.
    assert prefill["argument_bytes"] == pytest.approx(2 * config.num_params / 8 + 3 * 8 * 256 * 4, rel=0.05)
    # The prefill's new bf16 KV cache (k and v: layers x rows x (256 + 20 slots) x kv heads x head dim) is
    # an output of its own and counts; the chunk receives it as an argument.
    cache = 2 * config.num_layers * 8 * 276 * config.num_kv_heads * config.head_dim * 2
    assert prefill["output_bytes"] >= cache / 8 and prefill["alias_bytes"] == 0
    assert prefill["per_chip_bytes"] >= prefill["argument_bytes"] + prefill["output_bytes"]
    assert chunk["argument_bytes"] >= 2 * config.num_params / 8 + cache / 8
    # Both programs lay the cache out alike (split by batch), so the chunk updates the donated one in place.
    assert prefill["output_bytes"] < cache / 4 and chunk["output_bytes"] - chunk["alias_bytes"] < 2**16
    assert report["per_chip_bytes"] == max(prefill["per_chip_bytes"], chunk["per_chip_bytes"])
    assert report["options"]["remat"] == "none" and report["options"]["base_dtype"] == "bfloat16"
    assert "greedy decode" in lines[0] and "prompt 200 (bucket 256) + 20 new tokens" in lines[0]


def testdecode_chunk_updates_the_kv_cache_in_place(capsys, tmp_path):
    """Issue #10: the chunk's temporaries stay below one layer's share of the cache. (A cache scanned
    through the layers was rebuilt as a second stacked copy: 0.75x the cache here, 1.4x for a 7B.)"""
    config, model = model_folder(tmp_path, hidden=1024, num_kv_heads=8, num_layers=4)
    _, report = run_main(capsys, *model, "--topology", "v5e-1", "--step", "decode", "--seq-len", "1000",
                         "--global-batch", "8", "--new-tokens", "32")
    chunk = report["programs"]["decode_chunk"]
    cache = 2 * config.num_layers * 8 * (1024 + 32) * config.num_kv_heads * config.head_dim * 2  # bf16 k, v
    assert chunk["alias_bytes"] >= cache
    assert chunk["temp_bytes"] < cache / config.num_layers


def test_lora_step_on_an_int8_base_compiles_for_v5e_1(capsys, tmp_path):
    """`train --lora-rank` on an int8 base: the frozen base is an int8 argument, the state the adapters."""
    config, model = model_folder(tmp_path, hidden=256)
    lines, report = run_main(capsys, *model, "--topology", "v5e-1", "--seq-len", "256", "--global-batch", "2",
                             "--lora-rank", "8", "--base-dtype", "int8")
    assert report["fits"] is True and report["options"]["answer_tokens"] == 32
    d, f, layers, r = config.hidden_size, config.intermediate_size, config.num_layers, 8
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    projections = layers * (2 * d * q + 2 * d * kv + 3 * d * f)            # int8, one byte each
    scales = layers * (q + 2 * kv + d + 2 * f + d)                          # fp32, one per output channel
    floats = config.num_params - projections           # embedding, head, norms: bf16 (the compute dtype)
    adapters = layers * r * ((d + q) * 2 + (d + kv) * 2 + 2 * (d + f) + (f + d))
    assert report["adapter_params"] == adapters
    batch = 4 * 2 * 256 * 4
    expected = projections + 4 * scales + 2 * floats + 3 * 4 * adapters + batch  # adapters + 2 Adam moments
    assert report["argument_bytes"] == pytest.approx(expected, rel=0.05)
    assert report["alias_bytes"] >= 0.95 * 3 * 4 * adapters                 # only the adapter state is donated
    assert "LoRA r8 (int8 base)" in lines[0]


@pytest.mark.parametrize("args, message", [
    (["--step", "decode", "--grad-accum", "2"], "--grad-accum: train-step options"),
    (["--step", "decode", "--offload-state"], "--offload-state: train-step options"),
    (["--step", "decode", "--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["--step", "decode", "--seq-len", "32700", "--new-tokens", "100"], "exceeds tiny's 32768 positions"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0"),
    (["--base-dtype", "int8"], "--base-dtype int8 applies to LoRA"),
    (["--base-on-host"], "--base-on-host applies to LoRA"),
    (["--seq-len", "32", "--answer-tokens", "32"], "--seq-len must be larger than --answer-tokens"),
])
def test_options_that_do_not_apply_are_clear_errors(capsys, args, message):
    from jaxtrain.__main__ import main

    assert main(["aot", "--model", "tiny", "--topology", "v5e-1", "--global-batch", "1", *args]) == 1
    assert message in capsys.readouterr().err
