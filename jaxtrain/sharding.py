"""Device mesh, the one logical-axis rules table, and multi-host glue.

The model names every parameter and activation dimension with a *logical* axis ("embed", "heads", ...);
this module is the single place that maps those names onto the *mesh* axes ("data", "fsdp", "tensor").
Changing the parallelism strategy means changing a rules table here, never the model.

The rules are in Flax's format (a sequence of ``(logical_name, mesh_axes)`` pairs), so the same table
serves both the shardings computed here (``logical_to_sharding``) and ``nn.with_logical_constraint``
inside the model::

    mesh = make_mesh(MeshConfig(fsdp=-1))
    rules = rules_for("fsdp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        ...   # jit-compiled train step; activations constrained by the model

Flax resolves each array's names in table order and never uses one mesh axis twice for one array: for
an activation ("batch", "length", "embed") "batch" takes ("data", "fsdp") and "embed" therefore stays
unsharded, while a parameter ("embed", "mlp") is sharded "fsdp" x "tensor".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# FSDP (ZeRO-3): parameters and optimizer state sharded over "fsdp" along their embedding dimension,
# the batch split over data x fsdp; the "tensor" entries are Megatron-style tensor parallelism and are
# no-ops while the tensor axis has size 1. Order matters: see the module docstring.
FSDP_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
)

# Pure tensor parallelism: parameters replicated over "data"/"fsdp" (which then both act as plain data
# parallelism), split over "tensor" along heads / mlp / vocab only.
TENSOR_PARALLEL_RULES: LogicalRules = tuple(
    (name, None) if name == "embed" else (name, axes) for name, axes in FSDP_RULES
)

RULES: dict[str, LogicalRules] = {"fsdp": FSDP_RULES, "tensor_parallel": TENSOR_PARALLEL_RULES}
LOGICAL_AXES = tuple(name for name, _ in FSDP_RULES)


def rules_for(name: str) -> LogicalRules:
    """The named rules table ("fsdp" or "tensor_parallel")."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown sharding rules {name!r}; choose one of {sorted(RULES)}") from None


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take all remaining devices."""

    data: int = 1
    """data-parallel replicas (parameters replicated across them)"""
    fsdp: int = -1
    """fully-sharded data parallelism: parameters, gradients and optimizer state split across these"""
    tensor: int = 1
    """tensor parallelism: heads / mlp / vocab dimensions split across these"""
    rules: Literal["fsdp", "tensor_parallel"] = "fsdp"
    """logical-axis rules table: "fsdp" (parameters sharded over fsdp and tensor) or "tensor_parallel"
    (parameters sharded over tensor only)"""

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
        """Resolve -1 and check that the mesh uses exactly ``num_devices`` devices."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        desc = " x ".join(f"{k}={v}" for k, v in sizes.items())
        bad = [k for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"bad mesh {desc}: axis sizes must be positive or -1 (got {', '.join(bad)})")
        free = [k for k, v in sizes.items() if v == -1]
        if len(free) > 1:
            raise ValueError(f"bad mesh {desc}: at most one axis may be -1 (\"the rest\"), got {free}")
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(f"bad mesh {desc}: the fixed axes use {fixed} devices, which does not "
                                 f"divide the {num_devices} devices available")
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"bad mesh {desc}: it needs {fixed} devices but {num_devices} are available; "
                             "set one axis to -1 to use the rest")
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all devices of all processes).

    ``jax.make_mesh`` orders devices by the physical TPU topology (so "tensor", the innermost axis, gets
    the fastest links); an explicit list, e.g. the devices of a TPU topology description for ahead-of-time
    compilation, is accepted too. Axes are ``Auto`` so Flax's logical constraints and jit's in/out
    shardings drive the partitioner.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.axis_sizes(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: batch rows must be a multiple of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


# --- logical axes -> shardings ------------------------------------------------------------------------

def _is_spec(x) -> bool:
    return x is None or isinstance(x, PartitionSpec) or (
        isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x))


def _names(spec) -> tuple:
    return () if spec is None else tuple(spec)


def _leaves_with_paths(logical_axes_tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(logical_axes_tree, is_leaf=_is_spec)
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), _names(s)) for p, s in leaves], treedef


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """Mesh PartitionSpec of one array from its logical dimension names (Flax's resolution)."""
    known = {n for n, _ in rules}
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(f"logical axis name(s) {unknown} have no rule; known names: {sorted(known)}")
    return nn.logical_to_mesh_axes(tuple(names), rules)


def logical_to_sharding(logical_axes_tree, mesh: Mesh, rules: LogicalRules = FSDP_RULES):
    """NamedSharding tree matching a tree of logical-name tuples / PartitionSpecs (None = replicated)."""
    leaves, treedef = _leaves_with_paths(logical_axes_tree)
    out = []
    for path, names in leaves:
        try:
            out.append(NamedSharding(mesh, logical_to_spec(names, rules)))
        except ValueError as e:
            raise ValueError(f"{path or '<root>'}: {e}") from None
    return treedef.unflatten(out)


def batch_sharding(mesh: Mesh, rules: LogicalRules = FSDP_RULES) -> NamedSharding:
    """Sharding of the [batch, length] input arrays."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def _axis_size(mesh: Mesh, axes) -> tuple[int, str]:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes), "x".join(axes)


def check_divisible(shapes_tree, logical_axes_tree, mesh: Mesh, rules: LogicalRules = FSDP_RULES,
                    *, what: str = "parameter") -> None:
    """Raise one ValueError listing every dimension that its mesh axes do not divide.

    Called before compiling so a bad mesh is reported as "parameter layers/attn/wq dim 1 (heads=12) is
    not divisible by mesh axis tensor=8" instead of an XLA error deep in the partitioner. ``shapes_tree``
    has the structure of ``logical_axes_tree`` with leaves that have a ``.shape`` (arrays,
    ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``) or are shape tuples.
    """
    leaves, treedef = _leaves_with_paths(logical_axes_tree)
    shapes = treedef.flatten_up_to(shapes_tree)
    problems = []
    for (path, names), leaf in zip(leaves, shapes):
        shape = tuple(getattr(leaf, "shape", leaf))
        name = path or "<root>"
        if len(names) != len(shape):
            problems.append(f"{what} {name} has shape {shape} but {len(names)} logical axes {names}")
            continue
        spec = logical_to_spec(names, rules)
        for dim, (size, logical, axes) in enumerate(zip(shape, names, tuple(spec) + (None,) * len(shape))):
            if axes is None:
                continue
            n, axes_desc = _axis_size(mesh, axes)
            if size % n:
                problems.append(f"{what} {name} dim {dim} ({logical}={size}) is not divisible by mesh axis "
                                f"{axes_desc}={n}")
    if problems:
        mesh_desc = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
        raise ValueError(f"cannot shard on mesh {mesh_desc}:\n  " + "\n  ".join(problems)
                         + "\nchoose mesh axis sizes (--mesh.data/fsdp/tensor) that divide these dimensions")


# --- multi-host ---------------------------------------------------------------------------------------

_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
_PROCESS_COUNT_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")


def _env_says_multi_process(env: Mapping[str, str]) -> bool:
    if any(env.get(k) for k in _MULTI_PROCESS_ENV):
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return True
    return any(env.get(k, "").isdigit() and int(env[k]) > 1 for k in _PROCESS_COUNT_ENV)


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when this is one process of several, else do nothing.

    Must run before anything touches a JAX backend. Multi-process is detected from the launcher's
    environment (TPU pod worker list, Slurm, Open MPI, an explicit JAX_COORDINATOR_ADDRESS);
    ``JAXTRAIN_DISTRIBUTED=1`` / ``=0`` forces the decision. Returns whether JAX is now distributed.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    forced = env.get("JAXTRAIN_DISTRIBUTED", "").strip().lower()
    if forced in ("0", "false", "no"):
        return False
    if forced in ("1", "true", "yes") or _env_says_multi_process(env):
        jax.distributed.initialize()
        log.info("jax.distributed initialized: process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, batch_sharding: NamedSharding,
                      keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """Assemble global arrays from this process's rows of a batch.

    Each process passes only the rows it read (``BucketedBatches`` gives every process its share);
    the global batch has ``process_count`` times as many rows. ``keys`` selects the model inputs
    (default: every entry that is a numeric array with a batch dimension, so example ids and other
    metadata are left out). On one process this is a plain ``device_put``.
    """
    if getattr(batch_sharding, "mesh", mesh) != mesh:
        raise ValueError("make_global_batch: batch_sharding belongs to a different mesh")
    if keys is None:
        keys = [k for k, v in local_batch.items()
                if isinstance(v, np.ndarray) and v.ndim >= 1 and v.dtype.kind in "biuf"]
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local_batch[k]))
            for k in keys}
