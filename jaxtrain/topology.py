"""TPU accelerator types (what users rent: ``v5e-8``, ``v4-32``, ...) as compile-only TPU topologies.

`jax.experimental.topologies.get_topology_desc` gives libtpu's compile-only devices for a slice we do
not have, so the real train step can be compiled for it from a CPU machine (see `jaxtrain.aot`). The
mapping follows MaxText's ``accelerator_to_spec_map`` with two deliberate corrections taken from the
Cloud TPU machine types: ``v5e-8`` / ``v6e-8`` are one host with 8 chips (MaxText models them as two
4-chip hosts), and v2 / v3 are included (two TensorCores per chip, each its own device).

Naming: the number after the generation counts TensorCores for v2, v3, v4 and v5p (``v4-8`` = 4 chips,
one "megacore" device per chip) and chips for v5e and v6e (``v5e-8`` = 8 chips).

Usable HBM per device is what libtpu's compiler reports as "available HBM" when a program does not
fit (``tests/test_tpu_topology.py`` re-derives every value from the compiler).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str            # user-facing prefix ("v5e")
    libtpu_name: str     # prefix of libtpu's topology name ("v5e", "v5" for v5p)
    dims: int            # 2 (torus/mesh of chips in a plane) or 3
    count_unit: str      # "cores" or "chips": what the number in "v4-8" counts
    chip_config: str     # "megacore" fuses a chip's two TensorCores into one device
    devices_per_chip: int
    hbm_bytes: int       # usable HBM per device, as the compiler reports it
    max_chips_per_host: int


def _gib(x: float) -> int:
    return int(round(x * GIB))


GENERATIONS: dict[str, Generation] = {
    g.name: g for g in (
        Generation("v2", "v2", 2, "cores", "default", 2, _gib(7.48), 4),
        Generation("v3", "v3", 2, "cores", "default", 2, _gib(15.48), 4),
        Generation("v4", "v4", 3, "cores", "megacore", 1, _gib(30.75), 4),
        Generation("v5p", "v5", 3, "cores", "megacore", 1, _gib(95.74), 4),
        Generation("v5e", "v5e", 2, "chips", "default", 1, _gib(15.75), 8),
        Generation("v6e", "v6e", 2, "chips", "default", 1, _gib(31.25), 8),
    )
}
ALIASES = {"v5litepod": "v5e", "v6": "v6e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """One TPU slice: what to ask libtpu for, and what each device can hold."""

    accelerator_type: str          # canonical user-facing name, e.g. "v5e-8"
    generation: Generation
    topology_name: str             # libtpu's name, e.g. "v5e:2x4"
    chips_per_host_bounds: tuple[int, int, int]
    chips: int
    hosts: int

    @property
    def num_devices(self) -> int:
        return self.chips * self.generation.devices_per_chip

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.generation.hbm_bytes

    @property
    def chip_config_name(self) -> str:
        return self.generation.chip_config

    def devices(self) -> list:
        """libtpu's compile-only devices for this slice (cached; works on a machine without a TPU)."""
        return list(_topology_devices(self.topology_name, self.chip_config_name, self.chips_per_host_bounds))

    def summary(self) -> dict:
        return {"topology": self.accelerator_type, "libtpu_topology": self.topology_name,
                "chips": self.chips, "devices": self.num_devices, "hosts": self.hosts,
                "hbm_gib_per_device": round(self.hbm_bytes_per_device / GIB, 2)}


def _chip_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The chip grid of a slice, as Cloud TPU lays it out (v5e-8 = 2x4, v4-32 = 2x2x4, v5p-128 = 4x4x4).

    2D: 2^floor(k/2) x 2^ceil(k/2). 3D: start from 2x2x1 and double the smallest axis (the last one on
    ties), which reproduces 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...
    """
    k = int(math.log2(chips))
    if dims == 2:
        return (1 << (k // 2), 1 << (k - k // 2))
    if chips == 1:
        return (1, 1, 1)
    grid = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
    while math.prod(grid) < chips:
        smallest = min(grid)
        i = max(j for j, g in enumerate(grid) if g == smallest)
        grid[i] *= 2
    return tuple(grid)


def _host_bounds(grid: tuple[int, ...], max_chips_per_host: int) -> tuple[int, int, int]:
    """Chips per host along each axis: a whole small slice on one host, else 2x2 (or 2x4) blocks."""
    chips = math.prod(grid)
    if chips <= max_chips_per_host:
        bounds = grid
    elif max_chips_per_host == 8 and len(grid) == 2 and chips < 16:
        bounds = (2, 4)
    else:
        bounds = (2, 2) if len(grid) == 2 else (2, 2, 1)
    return tuple(bounds) + (1,) * (3 - len(bounds))


_NAME = re.compile(r"^(?P<gen>[a-z0-9]+?)-(?P<n>\d+)$")


def parse_accelerator_type(name: str) -> TpuTopology:
    """``"v5e-8"`` / ``"v5litepod-8"`` / ``"v4-32"`` / ``"v5p-8"`` / ``"v6e-1"`` -> `TpuTopology`.

    Raises ValueError naming the accepted forms for anything else.
    """
    m = _NAME.match(name.strip().lower())
    gen_name = ALIASES.get(m["gen"], m["gen"]) if m else None
    if gen_name not in GENERATIONS:
        raise ValueError(f"unknown TPU accelerator type {name!r}; expected <generation>-<count> with "
                         f"generation one of {sorted(GENERATIONS) + sorted(ALIASES)}, e.g. v5e-8, v4-8, "
                         "v5p-8, v6e-8, v5litepod-16")
    gen = GENERATIONS[gen_name]
    count = int(m["n"])
    per_chip = 2 if gen.count_unit == "cores" else 1
    chips, rest = divmod(count, per_chip)
    valid = (rest == 0 and chips >= 1 and chips & (chips - 1) == 0 and chips != 2
             and (gen.count_unit == "chips" or chips >= 4))
    if not valid:
        unit = "TensorCores (2 per chip)" if gen.count_unit == "cores" else "chips"
        smallest = "8" if gen.count_unit == "cores" else "1, 4"
        raise ValueError(f"unsupported TPU accelerator type {name!r}: the number counts {unit} and must be "
                         f"a power of two ({smallest}, ... for {gen.name})")
    grid = _chip_grid(chips, gen.dims)
    bounds = _host_bounds(grid, gen.max_chips_per_host)
    topology_name = f"{gen.libtpu_name}:{'x'.join(map(str, grid))}"
    hosts = chips // math.prod(bounds)
    return TpuTopology(f"{gen.name}-{count}", gen, topology_name, bounds, chips, hosts)


# XLA:TPU's bf16 propagation turns the fp32 weights that enter the scanned layers into a bf16 copy of the
# whole stack (hoisted out of the layer loop): 1.5 GiB per v5e-8 chip for Mistral 7B, alive through the
# backward pass. Off, each layer converts its own slice.
TPU_COMPILER_OPTIONS = {"xla_jf_bf16_propagation": False}


def compiler_options_for(devices) -> dict:
    """`jax.jit(..., compiler_options=...)` for a step running on `devices` (TPU: see above)."""
    return dict(TPU_COMPILER_OPTIONS) if devices and devices[0].platform == "tpu" else {}


def prepare_libtpu_for_compile_only() -> None:
    """Environment for using libtpu as a compiler only, on a machine without TPU chips.

    libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) so that two processes never drive the same
    chips; without chips there is nothing to protect, and the lock would stop two AOT compiles (or a
    compile and a test run) from running side by side. It also queries GCE metadata at start-up and
    prints alarming warnings when there is none; naming a (fake) single-host slice silences them
    without influencing compilation for an explicit topology. Must run before libtpu is first loaded;
    does nothing on a TPU VM.
    """
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        return
    for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-1"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("TPU_SKIP_MDS_QUERY", "1")):
        if not os.environ.get(key):
            os.environ[key] = value


@functools.lru_cache(maxsize=None)
def _topology_devices(topology_name: str, chip_config: str, bounds: tuple[int, int, int]) -> tuple:
    from jax.experimental import topologies

    prepare_libtpu_for_compile_only()
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology_name,
                                        chip_config_name=chip_config, chips_per_host_bounds=bounds,
                                        num_slices=1)
    return tuple(desc.devices)
