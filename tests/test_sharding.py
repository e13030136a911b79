"""Mesh construction, the logical-axis rules table, divisibility errors and batch assembly on 8 CPU devices."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxtrain.sharding import (  # noqa: E402
    MeshConfig, _env_says_multi_process, batch_sharding, check_divisible, data_parallel_size,
    logical_to_sharding, make_global_batch, make_mesh, maybe_initialize_distributed, rules_for)


@pytest.fixture(scope="module")
def cpus():
    devices = jax.devices("cpu")
    assert len(devices) == 8, "these tests need XLA_FLAGS=--xla_force_host_platform_device_count=8 set " \
                              "before JAX initialises its CPU backend"
    return devices


@pytest.mark.parametrize("cfg, shape", [
    (MeshConfig(), (1, 8, 1)),
    (MeshConfig(data=2), (2, 4, 1)),
    (MeshConfig(fsdp=4, tensor=-1), (1, 4, 2)),
    (MeshConfig(data=-1, fsdp=1, tensor=2), (4, 1, 2)),
    (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
])
def test_mesh_sizes(cpus, cfg, shape):
    mesh = make_mesh(cfg, cpus)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in cpus)
    assert data_parallel_size(mesh) == shape[0] * shape[1]


@pytest.mark.parametrize("cfg, message", [
    (MeshConfig(data=2, fsdp=2, tensor=1), "it needs 4 devices but 8 are available"),
    (MeshConfig(data=-1, fsdp=-1), "at most one axis may be -1"),
    (MeshConfig(tensor=3), "the fixed axes use 3 devices, which does not divide the 8"),
    (MeshConfig(data=0), "axis sizes must be positive or -1"),
])
def test_bad_mesh_is_a_clear_error(cpus, cfg, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(cfg, cpus)


FAKE_AXES = {
    "embed": ("vocab", "embed"),
    "layers": {"attn": {"wq": ("layers", "embed", "heads", "head_dim"),
                        "wk": ("layers", "embed", "kv_heads", "head_dim")},
               "mlp": {"up": ("layers", "embed", "mlp")},
               "norm": P("layers", "embed")},
    "step": None,
}
FAKE_SHAPES = {
    "embed": (32000, 64),
    "layers": {"attn": {"wq": (2, 64, 8, 16), "wk": (2, 64, 2, 16)},
               "mlp": {"up": jax.ShapeDtypeStruct((2, 64, 192), jnp.float32)},
               "norm": (2, 64)},
    "step": (),
}


def test_shardings_of_a_logical_axes_tree(cpus):
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2), cpus)
    fsdp = logical_to_sharding(FAKE_AXES, mesh, rules_for("fsdp"))
    assert fsdp["embed"].spec == P("tensor", "fsdp")
    assert fsdp["layers"]["attn"]["wq"].spec == P(None, "fsdp", "tensor", None)
    assert fsdp["layers"]["mlp"]["up"].spec == P(None, "fsdp", "tensor")
    assert fsdp["layers"]["norm"].spec == P(None, "fsdp")
    assert fsdp["step"].spec == P()
    tp = logical_to_sharding(FAKE_AXES, mesh, rules_for("tensor_parallel"))
    assert tp["layers"]["attn"]["wq"].spec == P(None, None, "tensor", None)
    # Placing an array: each device holds the hand-computed block.
    x = jax.device_put(np.zeros((2, 64, 192), np.float32), fsdp["layers"]["mlp"]["up"])
    assert {s.data.shape for s in x.addressable_shards} == {(2, 16, 96)}
    # Activations: "batch" takes data x fsdp first, so "embed" is left replicated.
    act = logical_to_sharding({"h": ("batch", "length", "embed")}, mesh, rules_for("fsdp"))
    assert act["h"].spec == P(("data", "fsdp"), None, None)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match=r"layers/x: logical axis name\(s\) \['hiddn'\] have no rule"):
        logical_to_sharding({"layers": {"x": ("embed", "hiddn")}}, mesh)
    with pytest.raises(ValueError, match="unknown sharding rules 'zero'"):
        rules_for("zero")


def test_indivisible_dimensions_are_reported_before_compiling(cpus):
    mesh = make_mesh(MeshConfig(fsdp=1, tensor=8), cpus)
    shapes = dict(FAKE_SHAPES, layers=dict(FAKE_SHAPES["layers"], attn={"wq": (2, 64, 12, 16), "wk": (2, 64, 8, 16)}))
    with pytest.raises(ValueError) as err:
        check_divisible(shapes, FAKE_AXES, mesh)
    msg = str(err.value)
    assert "parameter layers/attn/wq dim 2 (heads=12) is not divisible by mesh axis tensor=8" in msg
    assert "mlp/up dim 2 (mlp=192)" not in msg and "wk" not in msg
    check_divisible(FAKE_SHAPES, FAKE_AXES, make_mesh(MeshConfig(fsdp=4, tensor=2), cpus))  # fine
    with pytest.raises(ValueError, match=r"parameter embed dim 1 \(embed=60\) is not divisible by mesh axis fsdp=8"):
        check_divisible({"embed": (8, 60)}, {"embed": ("vocab", "embed")}, make_mesh(MeshConfig(), cpus))
    with pytest.raises(ValueError, match=r"parameter norm has shape \(4, 2\) but 1 logical axes"):
        check_divisible({"norm": (4, 2)}, {"norm": ("embed",)}, mesh)


def test_rules_drive_flax_logical_constraints(cpus):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), cpus)
    rules = rules_for("fsdp")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
            return nn.with_logical_constraint(x * 2, ("batch", "length", "mlp"))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = jax.jit(lambda x: Block().apply({}, x)).lower(jnp.ones((8, 4, 16))).as_text()
    assert '[{"data", "fsdp"}, {}, {}]' in hlo and '[{"data", "fsdp"}, {}, {"tensor"}]' in hlo


def test_make_global_batch_single_process(cpus):
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1), cpus)
    local = {"input_ids": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "loss_mask": np.ones((8, 5), bool),
             "example_ids": np.array(list("abcdefgh"), object), "bucket_len": 5}
    out = make_global_batch(local, mesh, batch_sharding(mesh))
    assert set(out) == {"input_ids", "loss_mask"}
    np.testing.assert_array_equal(np.asarray(out["input_ids"]), local["input_ids"])
    assert {s.data.shape for s in out["input_ids"].addressable_shards} == {(1, 5)}


def test_distributed_initialisation_is_a_no_op_on_one_host():
    assert maybe_initialize_distributed({}) is False
    assert maybe_initialize_distributed({"JAXTRAIN_DISTRIBUTED": "0", "SLURM_NTASKS": "4"}) is False
    assert _env_says_multi_process({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"})
    assert not _env_says_multi_process({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert _env_says_multi_process({"SLURM_NTASKS": "4"}) and not _env_says_multi_process({"SLURM_NTASKS": "1"})
