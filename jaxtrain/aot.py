"""Ahead-of-time compilation for a TPU slice we do not have: does the train step fit, and how much room?

`compile_for_topology` lowers and compiles any jitted step for the compile-only devices of a
`jaxtrain.topology.TpuTopology` (libtpu runs on this CPU machine; no TPU needed) and reads the
compiler's own per-device memory accounting. The TPU compiler refuses a program whose temporaries
alone exceed HBM (we keep its message); the full per-chip sum below is checked here.

Memory accounting (per device; one device per chip except v2/v3, whose TensorCores each own their HBM):
    per_chip_bytes = argument_bytes + temp_bytes + generated_code_bytes
With the train state donated, outputs alias arguments (``alias_bytes``), so outputs add nothing beyond
``output_bytes - alias_bytes`` (the metrics: a few bytes). Arrays placed in host memory
(``memory_kind="pinned_host"``) are reported separately as ``host_*_bytes`` and do not count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import tyro

from jaxtrain.config import MistralConfig
from jaxtrain.sharding import MeshConfig
from jaxtrain.topology import (GIB, TPU_COMPILER_OPTIONS, TpuTopology, parse_accelerator_type,
                               prepare_libtpu_for_compile_only)
from jaxtrain.train import OptimizerConfig


@dataclasses.dataclass
class AotReport:
    """What the compiler says about one step on one slice. All byte counts are per device."""

    topology: str
    chips: int
    devices: int
    hbm_bytes: int                      # usable HBM per device
    fits: bool
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    generated_code_bytes: int | None = None
    host_argument_bytes: int | None = None
    host_temp_bytes: int | None = None
    per_chip_bytes: int | None = None
    flops_compiler: float | None = None  # XLA's count for one device; kernels (splash) count as zero
    lower_s: float = 0.0
    compile_s: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready: the fields, `extra` merged in, and GiB renderings of the headline sizes."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d.update(self.extra)
        d["hbm_gib"] = round(self.hbm_bytes / GIB, 2)
        d["per_chip_gib"] = None if self.per_chip_bytes is None else round(self.per_chip_bytes / GIB, 2)
        d["headroom_gib"] = (None if self.per_chip_bytes is None
                             else round((self.hbm_bytes - self.per_chip_bytes) / GIB, 2))
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=False)


def _first_lines(text: str, limit: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def compile_for_topology(fn: Callable, abstract_args: Sequence[Any], in_shardings, out_shardings,
                         donate_argnums: Sequence[int], topology: TpuTopology, *, mesh=None,
                         rules=None, extra: dict[str, Any] | None = None) -> AotReport:
    """``jax.jit(fn, ...).lower(*abstract_args).compile()`` for `topology`, as an `AotReport`.

    `abstract_args` are pytrees of `jax.ShapeDtypeStruct` (no data is ever allocated); shardings must
    live on a mesh of ``topology.devices()``. `mesh` / `rules` (a Flax logical-axis rules table) are
    made current while tracing so the model's ``with_logical_constraint`` calls and kernels that read
    the context mesh (splash attention) see the slice. A compile that runs out of HBM is not an error:
    the report says ``fits=False`` and carries the compiler's message.
    """
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums))

    def lower():
        with contextlib.ExitStack() as stack:
            if mesh is not None:
                stack.enter_context(jax.set_mesh(mesh))
            if rules is not None:
                import flax.linen as nn

                stack.enter_context(nn.logical_axis_rules(rules))
            return jitted.lower(*abstract_args)

    return compile_lowered(lower, topology, extra=extra)


def compile_lowered(lower: Callable[[], Any], topology: TpuTopology, *, compiler_options=None,
                    extra: dict[str, Any] | None = None) -> AotReport:
    """Run `lower()` (returns a `jax.stages.Lowered` for `topology`'s devices), compile, report."""
    report = AotReport(topology=topology.accelerator_type, chips=topology.chips,
                       devices=topology.num_devices, hbm_bytes=topology.hbm_bytes_per_device, fits=False,
                       extra=dict(extra or {}))
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    report.lower_s = round(t1 - t0, 2)
    try:
        compiled = lowered.compile(compiler_options)
    except Exception as e:  # XlaRuntimeError; RESOURCE_EXHAUSTED when it does not fit
        report.compile_s = round(time.perf_counter() - t1, 2)
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
            raise
        report.error = _first_lines(message)
        required = re.search(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
        if required:
            report.extra["required_gib_reported"] = float(required.group(1)) * {
                "K": 2**-20, "M": 2**-10, "G": 1.0, "T": 1024.0}[required.group(2)]
        return report
    report.compile_s = round(time.perf_counter() - t1, 2)
    _fill_memory(report, compiled)
    return report


def _fill_memory(report: AotReport, compiled) -> None:
    stats = compiled.memory_analysis()
    report.argument_bytes = int(stats.argument_size_in_bytes)
    report.output_bytes = int(stats.output_size_in_bytes)
    report.alias_bytes = int(stats.alias_size_in_bytes)
    report.temp_bytes = int(stats.temp_size_in_bytes)
    report.generated_code_bytes = int(stats.generated_code_size_in_bytes)
    report.host_argument_bytes = int(getattr(stats, "host_argument_size_in_bytes", 0))
    report.host_temp_bytes = int(getattr(stats, "host_temp_size_in_bytes", 0))
    report.per_chip_bytes = report.argument_bytes + report.temp_bytes + report.generated_code_bytes
    report.fits = report.per_chip_bytes <= report.hbm_bytes
    if not report.fits:
        report.error = (f"needs {report.per_chip_bytes / GIB:.2f} GiB per device, "
                        f"{report.hbm_bytes / GIB:.2f} GiB usable")
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    report.flops_compiler = float(cost["flops"]) if cost and "flops" in cost else None


# --- analytic FLOPs ---------------------------------------------------------------------------------

def flops_analytic(config: MistralConfig, tokens: int, seq_len: int, logit_tokens: int | None = None) -> float:
    """Model FLOPs of one training step over `tokens` tokens in rows of `seq_len` (`jaxtrain.flops`):

        6 * N_body * tokens + 6 * V * D * logit_tokens + 3 * 4 * L * Hq * D_head * K(seq_len, window) * tokens

    N_body = parameters outside the embedding and LM head (2 FLOPs per multiply-add; backward = 2 x
    forward, hence 6). The LM head counts only the `logit_tokens` positions the step projects onto the
    vocabulary (answer-only loss; default: every token). The attention term is the QK^T and PV matmuls,
    2 * 2 * Hq * D_head FLOPs per query-key pair and layer, with K the mean number of keys a causal
    query sees (T / 2; with a sliding window W < T: W - W^2 / (2T)). Remat recomputation is not counted
    (the MFU convention of MaxText and PaLM).
    """
    from jaxtrain.flops import train_step_flops

    return train_step_flops(config, tokens, seq_len, logit_tokens=logit_tokens)


# --- the `aot` command: the real train step -----------------------------------------------------------

@dataclasses.dataclass
class AotConfig:
    """Compile the real train step for a TPU slice on this machine and report its memory per chip."""

    model: str = "mistral-7b-v0.1"
    """model preset, or a Hugging Face folder (only its config.json is read)"""
    topology: str = "v5e-8"
    """TPU accelerator type: v5e-8 (= v5litepod-8), v5e-16, v4-8, v4-32, v5p-8, v6e-8, v6e-1, v3-8, ..."""
    seq_len: int = 4096
    """row length (one length bucket of the data)"""
    global_batch: int = 16
    """rows per step"""
    answer_tokens: int = 64
    """loss tokens per row projected onto the vocabulary (answer-only logits; `train` reads the real
    maximum from the data); 0: logits for every position"""
    grad_accum: int = 1
    """micro-batches per step"""
    remat: str | None = None
    """remat policy override (default: the preset's)"""
    attention: Literal["splash", "xla"] = "splash"
    """attention implementation compiled for the TPU"""
    optimizer: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    bf16_propagation: bool = False
    """let XLA:TPU propagate bf16 into the layer loop (XLA's default, which the train step turns off:
    see jaxtrain.topology.TPU_COMPILER_OPTIONS); for measuring what that costs"""
    total_steps: int = 1000
    """length of the learning-rate schedule (no effect on memory)"""


def _model_config(cfg: AotConfig) -> MistralConfig:
    overrides = {"attention_impl": cfg.attention}
    if cfg.remat is not None:
        overrides["remat"] = cfg.remat
    if Path(cfg.model).is_dir():
        return MistralConfig.from_pretrained(cfg.model, **overrides)
    return MistralConfig.preset(cfg.model).replace(**overrides)


def aot_train_step(cfg: AotConfig) -> AotReport:
    """Lower and compile `jaxtrain.train.make_train_step` for `cfg.topology` from abstract inputs."""
    prepare_libtpu_for_compile_only()
    from jaxtrain import model, train
    from jaxtrain.checkpoint import abstract_state
    from jaxtrain.sharding import check_divisible, data_parallel_size, make_mesh, rules_for

    topology = parse_accelerator_type(cfg.topology)
    config = _model_config(cfg)
    devices = topology.devices()
    mesh = make_mesh(cfg.mesh, devices)
    rules = rules_for(cfg.mesh.rules)
    check_divisible(model.param_shapes(config), model.param_logical_axes(config), mesh, rules)
    rows_per_step = data_parallel_size(mesh) * cfg.grad_accum
    if cfg.global_batch % rows_per_step:
        raise ValueError(f"--global-batch {cfg.global_batch} must be a multiple of {rows_per_step} (the "
                         f"{data_parallel_size(mesh)}-way batch split of the mesh x --grad-accum "
                         f"{cfg.grad_accum}) on {topology.accelerator_type}")
    if cfg.seq_len <= 0 or (cfg.answer_tokens and cfg.answer_tokens >= cfg.seq_len):
        raise ValueError(f"--seq-len must be positive and larger than --answer-tokens (got {cfg.seq_len}, "
                         f"{cfg.answer_tokens})")
    optimizer, schedule = train.make_optimizer(cfg.optimizer, cfg.total_steps)
    answer = cfg.answer_tokens or None
    fns = train.make_train_step(config, optimizer, schedule, mesh, rules, max_loss_tokens=answer,
                                grad_accum=cfg.grad_accum)
    params = model.param_shapes(config)
    shapes = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state = abstract_state(shapes, fns.state_shardings)
    rows, length = cfg.global_batch, cfg.seq_len
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.bool_ if k == "loss_mask" else jnp.int32,
                                     sharding=fns.batch_sharding)
             for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
    # Explicit either way: the train step's own jit carries the TPU options, and these override them.
    options = {**TPU_COMPILER_OPTIONS, "xla_jf_bf16_propagation": cfg.bf16_propagation}
    extra = {
        "model": cfg.model, "seq_len": length, "global_batch": rows,
        "flops_analytic": flops_analytic(config, rows * length, length,
                                         logit_tokens=None if answer is None else rows * answer),
        "options": {"remat": config.remat, "attention": config.attention_impl,
                    "param_dtype": config.param_dtype, "optimizer": dataclasses.asdict(cfg.optimizer),
                    "answer_tokens": cfg.answer_tokens, "grad_accum": cfg.grad_accum,
                    "mesh": dict(mesh.shape), "rules": cfg.mesh.rules, "compiler_options": options},
    }
    return compile_lowered(lambda: fns.lower(state, batch), topology, compiler_options=options, extra=extra)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f}"


def summary(report: AotReport) -> str:
    """Two human lines: the verdict, and where the memory goes."""
    d = report.as_dict()
    head = (f"{d['topology']} ({d['chips']} chips, {d['hbm_gib']} GiB HBM per device): {d.get('model')} "
            f"seq {d.get('seq_len')} x batch {d.get('global_batch')}: ")
    if report.per_chip_bytes is None:
        return head + f"DOES NOT FIT ({report.error})"
    verdict = "fits" if report.fits else "DOES NOT FIT"
    return (head + f"{d['per_chip_gib']} GiB per chip, {verdict} ({d['headroom_gib']} GiB to spare)\n"
            f"  arguments {_gib(report.argument_bytes)} + temporaries {_gib(report.temp_bytes)} + code "
            f"{_gib(report.generated_code_bytes)} GiB; host memory per chip: arguments "
            f"{_gib(report.host_argument_bytes)} + temporaries {_gib(report.host_temp_bytes)} GiB; "
            f"lowered in {report.lower_s} s, compiled in {report.compile_s} s")


def main(cfg: AotConfig) -> int:
    """`python -m jaxtrain aot`: the summary, then the report as one JSON line (exit 0 fit or not)."""
    report = aot_train_step(cfg)
    print(summary(report))
    print(report.to_json())
    return 0
