"""Accelerator types -> libtpu topologies, checked against MaxText's table and libtpu's own compiler."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxtrain.topology import GENERATIONS, GIB, parse_accelerator_type

# Copied from MaxText's accelerator_to_spec_map.py (topology name, chip config, chips per host, devices).
# v5e-8 / v6e-8 are the deliberate exception: one 8-chip host (ct5lp-hightpu-8t, ct6e-standard-8t),
# where MaxText lists two 2x2 hosts.
MAXTEXT = {
    "v5e-1": ("v5e:1x1", "default", (1, 1, 1), 1),
    "v5e-4": ("v5e:2x2", "default", (2, 2, 1), 4),
    "v5e-8": ("v5e:2x4", "default", (2, 4, 1), 8),
    "v5e-16": ("v5e:4x4", "default", (2, 2, 1), 16),
    "v5e-32": ("v5e:4x8", "default", (2, 2, 1), 32),
    "v5e-128": ("v5e:8x16", "default", (2, 2, 1), 128),
    "v5e-256": ("v5e:16x16", "default", (2, 2, 1), 256),
    "v6e-1": ("v6e:1x1", "default", (1, 1, 1), 1),
    "v6e-8": ("v6e:2x4", "default", (2, 4, 1), 8),
    "v6e-64": ("v6e:8x8", "default", (2, 2, 1), 64),
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1), 4),
    "v4-16": ("v4:2x2x2", "megacore", (2, 2, 1), 8),
    "v4-32": ("v4:2x2x4", "megacore", (2, 2, 1), 16),
    "v4-64": ("v4:2x4x4", "megacore", (2, 2, 1), 32),
    "v4-128": ("v4:4x4x4", "megacore", (2, 2, 1), 64),
    "v4-256": ("v4:4x4x8", "megacore", (2, 2, 1), 128),
    "v4-512": ("v4:4x8x8", "megacore", (2, 2, 1), 256),
    "v4-1024": ("v4:8x8x8", "megacore", (2, 2, 1), 512),
    "v4-2048": ("v4:8x8x16", "megacore", (2, 2, 1), 1024),
    "v4-4096": ("v4:8x16x16", "megacore", (2, 2, 1), 2048),
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1), 4),
    "v5p-32": ("v5:2x2x4", "megacore", (2, 2, 1), 16),
    "v5p-128": ("v5:4x4x4", "megacore", (2, 2, 1), 64),
    "v5p-8192": ("v5:16x16x16", "megacore", (2, 2, 1), 4096),
}


@pytest.mark.parametrize("name", sorted(MAXTEXT))
def test_mapping_matches_maxtext(name):
    topo = parse_accelerator_type(name)
    want_topology, want_config, want_bounds, want_devices = MAXTEXT[name]
    assert (topo.topology_name, topo.chip_config_name, topo.chips_per_host_bounds, topo.num_devices) == (
        want_topology, want_config, want_bounds, want_devices)


@pytest.mark.parametrize("name, kind, devices, processes", [
    ("v5e-8", "TPU v5 lite", 8, 1), ("v5litepod-16", "TPU v5 lite", 16, 4), ("v4-8", "TPU v4", 4, 1),
    ("v4-32", "TPU v4", 16, 4), ("v5p-8", "TPU v5", 4, 1), ("v6e-1", "TPU v6 lite", 1, 1),
    ("v3-8", "TPU v3", 8, 1),
])
def test_libtpu_devices(name, kind, devices, processes):
    got = parse_accelerator_type(name).devices()
    assert len(got) == devices
    assert {d.device_kind for d in got} == {kind}
    assert len({d.process_index for d in got}) == processes


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_usable_hbm_is_what_the_compiler_allows(generation):
    """Ask libtpu's compiler for 1 TiB of temporaries on one device; it names the usable HBM."""
    smallest = {"cores": 8, "chips": 1}[GENERATIONS[generation].count_unit]
    topo = parse_accelerator_type(f"{generation}-{smallest}")
    mesh = Mesh(np.array(topo.devices()[:1]), ("x",))
    arg = jax.ShapeDtypeStruct((1 << 19, 64), jnp.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as err:
        jax.jit(lambda a: jnp.sort(a @ a.T, axis=0)[0]).lower(arg).compile()
    available = float(re.search(r"available HBM \(([\d.]+)G\)", str(err.value)).group(1))
    assert topo.hbm_bytes_per_device / GIB == pytest.approx(available, abs=0.006)


@pytest.mark.parametrize("name", ["v5e-8", "v4-8", "v5e-1"])
def test_sharded_function_compiles_for_the_slice(name):
    topo = parse_accelerator_type(name)
    mesh = Mesh(np.array(topo.devices()), ("x",))
    sharding = NamedSharding(mesh, P("x"))
    rows = 128 * topo.num_devices
    arg = jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16, sharding=sharding)
    compiled = jax.jit(lambda a: (a @ a.T).sum(), in_shardings=sharding).lower(arg).compile()
    assert compiled.memory_analysis().argument_size_in_bytes == 128 * 256 * 2   # one shard per device
    assert compiled.cost_analysis()["flops"] > 0


@pytest.mark.parametrize("name, message", [
    ("v5e-2", "must be a power of two"), ("v4-4", "counts TensorCores"), ("v5e-12", "power of two"),
    ("h100-8", "unknown TPU accelerator type"), ("v5e", "unknown TPU accelerator type"),
])
def test_bad_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        parse_accelerator_type(name)


def test_aliases():
    assert parse_accelerator_type("v5litepod-8") == parse_accelerator_type("V5E-8")
    assert parse_accelerator_type("v5litepod-8").accelerator_type == "v5e-8"
