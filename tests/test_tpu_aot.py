"""`python -m jaxtrain aot`: the real train step compiled for TPU slices on this CPU machine."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtrain import aot
from jaxtrain.config import MistralConfig
from jaxtrain.topology import GIB, parse_accelerator_type


def run_main(capsys, *args):
    assert aot.main(tyro.cli(aot.AotConfig, args=list(args))) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_tiny_train_step_compiles_for_v5e_8(capsys):
    """The issue's in-suite proof: the real step (answer-only loss, AdamW, donation, splash) for a v5e-8."""
    lines, report = run_main(capsys, "--model", "tiny", "--topology", "v5e-8", "--seq-len", "256",
                             "--global-batch", "8", "--answer-tokens", "16")
    assert report["fits"] is True and report["error"] is None
    assert (report["topology"], report["chips"], report["seq_len"], report["global_batch"]) == ("v5e-8", 8, 256, 8)
    assert report["per_chip_bytes"] == (report["argument_bytes"] + report["temp_bytes"]
                                        + report["generated_code_bytes"])
    # Arguments per chip: fp32 params + two fp32 Adam moments, FSDP-split 8 ways, plus 1/8 of the batch
    # (4 arrays of 8 x 256; TPU tiling pads these small shards, hence the tolerance).
    n = MistralConfig.preset("tiny").num_params
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
    n = MistralConfig.preset("tiny").num_params
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
    config = MistralConfig.preset("mistral-7b-v0.1")
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
