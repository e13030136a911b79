"""Ahead-of-time compilation for a TPU slice we do not have: does a step (a full or LoRA finetune step,
eval's decoding) fit, and how much room?

`compile_for_topology` lowers and compiles any jitted step for the compile-only devices of a
`jaxtrain.topology.TpuTopology` (libtpu runs on this CPU machine; no TPU needed) and reads the
compiler's own per-device memory accounting. The TPU compiler refuses a program whose temporaries
alone exceed HBM (we keep its message); the full per-chip sum below is checked here.

Memory accounting (per device; one device per chip except v2/v3, whose TensorCores each own their HBM):
    per_chip_bytes = argument_bytes + temp_bytes + generated_code_bytes + (output_bytes - alias_bytes)
Outputs that alias a donated argument (``alias_bytes``) need no memory of their own: for the train step
(state donated) the last term is the metrics, a few bytes; a decode prefill's new KV cache counts whole.
Arrays placed in host memory (``memory_kind="pinned_host"``) are reported separately as ``host_*_bytes``
and do not count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import tyro

from jaxtrain import generate, model, runs, train
from jaxtrain.batches import MODEL_INPUT_KEYS
from jaxtrain.checkpoint import abstract_state
from jaxtrain.config import ModelConfig
from jaxtrain.flops import train_step_flops
from jaxtrain.lora import Adapters, LoraSettings, num_params
from jaxtrain.sharding import (MeshConfig, check_divisible, data_parallel_size, logical_to_sharding, make_mesh,
                               rules_for)
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
                stack.enter_context(nn.logical_axis_rules(rules))
            return jitted.lower(*abstract_args)

    return compile_lowered(lower, topology, extra=extra)


def compile_lowered(lower: Callable[[], Any], topology: TpuTopology, *, compiler_options=None,
                    extra: dict[str, Any] | None = None, keep: dict | None = None) -> AotReport:
    """Run `lower()` (returns a `jax.stages.Lowered` for `topology`'s devices), compile, report.

    `keep`, if given, receives the executable as ``keep["compiled"]`` (e.g. for its output shardings).
    """
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
    if keep is not None:
        keep["compiled"] = compiled
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
    report.per_chip_bytes = (report.argument_bytes + report.temp_bytes + report.generated_code_bytes
                             + report.output_bytes - report.alias_bytes)
    report.fits = report.per_chip_bytes <= report.hbm_bytes
    if not report.fits:
        report.error = (f"needs {report.per_chip_bytes / GIB:.2f} GiB per device, "
                        f"{report.hbm_bytes / GIB:.2f} GiB usable")
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    report.flops_compiler = float(cost["flops"]) if cost and "flops" in cost else None


# --- analytic FLOPs ---------------------------------------------------------------------------------

def flops_analytic(config: ModelConfig, tokens: int, seq_len: int, logit_tokens: int | None = None) -> float:
    """Model FLOPs of one training step over `tokens` tokens in rows of `seq_len` (`jaxtrain.flops`):

        6 * N_body * tokens + 6 * V * D * logit_tokens + 3 * 4 * L * Hq * D_head * K(seq_len, window) * tokens

    N_body = parameters outside the embedding and LM head (2 FLOPs per multiply-add; backward = 2 x
    forward, hence 6). The LM head counts only the `logit_tokens` positions the step projects onto the
    vocabulary (answer-only loss; default: every token). The attention term is the QK^T and PV matmuls,
    2 * 2 * Hq * D_head FLOPs per query-key pair and layer, with K the mean number of keys a causal
    query sees (T / 2; with a sliding window W < T: W - W^2 / (2T)). Remat recomputation is not counted
    (the MFU convention of MaxText and PaLM).
    """
    return train_step_flops(config, tokens, seq_len, logit_tokens=logit_tokens)


# --- the `aot` command: the real train and decode steps ----------------------------------------------

@dataclasses.dataclass
class AotConfig:
    """Compile a real step (train: full finetune or LoRA; decode: eval's generation) for a TPU slice on
    this machine and report its memory per chip."""

    model: str = "mistral-7b-v0.1"
    """model preset, or a Hugging Face folder (only its config.json is read)"""
    topology: str = "v5e-8"
    """TPU accelerator type: v5e-8 (= v5litepod-8), v5e-16, v4-8, v4-32, v5p-8, v6e-8, v6e-1, v3-8, ..."""
    step: Literal["train", "decode"] = "train"
    """train: `python -m jaxtrain train`'s step; decode: `python -m eval`'s generation (the prompt's
    prefill, then one chunk of single-token steps; the larger of the two programs is reported)"""
    seq_len: int = 4096
    """train: row length (one length bucket of the data); decode: prompt tokens (the longest prompt of a
    batch), compiled at the bucket eval pads it to"""
    global_batch: int = 16
    """train: rows per step; decode: prompts per batch (eval's --batch-size)"""
    answer_tokens: int | None = None
    """train: loss tokens per row projected onto the vocabulary (answer-only logits; `train` reads the real
    maximum from the data); 0: logits for every position. Default 64 for a full finetune, 32 with
    --lora-rank (the figures of the README's and docs/lora.md's tables)"""
    grad_accum: int = 1
    """train: micro-batches per step"""
    remat: str | None = None
    """train: remat policy override (default: the preset's)"""
    adapters: Annotated[LoraSettings, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=LoraSettings)
    """train: LoRA adapters on a frozen base (--lora-rank ...; 0: full finetune); decode: unmerged adapters
    riding along (--lora-rank), and --base-dtype for the decoded model's weights (`eval --base-dtype`)"""
    new_tokens: int = 100
    """decode: tokens generated per prompt (eval's --max-new-tokens; sizes the KV cache)"""
    prefill_len: int | None = None
    """decode: compile this prompt bucket instead of the one eval pads --seq-len to (to weigh another
    bucketing; the splash kernel needs a multiple of 128)"""
    attention: Literal["splash", "xla"] = "splash"
    """attention implementation compiled for the TPU (decode steps with a KV cache always run XLA)"""
    optimizer: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """device mesh: train shards its state over it; decode shards the weights as `eval --shard` does"""
    bf16_propagation: bool = False
    """let XLA:TPU propagate bf16 into the layer loop (XLA's default, which the train step turns off:
    see jaxtrain.topology.TPU_COMPILER_OPTIONS); for measuring what that costs"""
    total_steps: int = 1000
    """length of the learning-rate schedule (no effect on memory)"""

    def loss_tokens(self) -> int | None:
        tokens = self.answer_tokens if self.answer_tokens is not None else (32 if self.adapters.lora_rank else 64)
        return tokens or None

    def model_config(self) -> ModelConfig:
        """The preset or folder's config as this step compiles it (decode: no backward, nothing to remat)."""
        return ModelConfig.resolve(self.model, attention_impl=self.attention,
                                     remat="none" if self.step == "decode" else self.remat)

    def check(self) -> None:
        """Clear errors for options that do not apply to the chosen step, before anything compiles."""
        self.adapters.lora()   # checks the LoRA settings
        if self.global_batch < 1 or self.seq_len < 1:
            raise ValueError(f"--global-batch and --seq-len must be positive (got {self.global_batch}, "
                             f"{self.seq_len})")
        if self.step == "decode":
            misplaced = [flag for flag, given, default in (
                ("--grad-accum", self.grad_accum, 1), ("--answer-tokens", self.answer_tokens, None),
                ("--remat", self.remat, None), ("--offload-state", self.optimizer.offload_state, False),
                ("--state-dtype", self.optimizer.state_dtype, OptimizerConfig.state_dtype),
                ("--lora-dropout", self.adapters.lora_dropout, 0.0),
                ("--base-on-host", self.adapters.base_on_host, False))
                if given != default]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)}: train-step options; --step decode compiles eval's "
                                 f"generation (weights, KV cache, no gradients)")
            if self.new_tokens < 1:
                raise ValueError(f"--new-tokens must be >= 1 (got {self.new_tokens})")
        else:
            if self.prefill_len is not None or self.new_tokens != AotConfig.new_tokens:
                raise ValueError("--prefill-len / --new-tokens apply to --step decode")
            if self.adapters.base_dtype != LoraSettings.base_dtype and not self.adapters.lora_rank:
                raise ValueError(f"--base-dtype {self.adapters.base_dtype} applies to LoRA (--lora-rank > 0) and to "
                                 f"--step decode; a full finetune trains float32 weights")
            if self.adapters.base_on_host and not self.adapters.lora_rank:
                raise ValueError("--base-on-host applies to LoRA (--lora-rank > 0)")
            if self.answer_tokens is not None and self.answer_tokens < 0:
                raise ValueError(f"--answer-tokens must be >= 0 (got {self.answer_tokens})")
            answer = self.loss_tokens()
            if answer and answer >= self.seq_len:
                raise ValueError(f"--seq-len must be larger than --answer-tokens (got {self.seq_len}, {answer})")


def _slice(cfg: AotConfig):
    """(topology, model config, mesh, rules) for `cfg`, with the parameters checked to split evenly."""
    prepare_libtpu_for_compile_only()
    cfg.check()
    topology = parse_accelerator_type(cfg.topology)
    config = cfg.model_config()
    mesh = make_mesh(cfg.mesh, topology.devices())
    rules = rules_for(cfg.mesh.rules)
    check_divisible(model.param_shapes(config), model.param_logical_axes(config), mesh, rules)
    return topology, config, mesh, rules


def _step_name(cfg: AotConfig) -> str:
    a = cfg.adapters
    lora = f"LoRA r{a.lora_rank} ({a.base_dtype} base)" if a.lora_rank else ""
    if cfg.step == "decode":
        return f"greedy decode, {a.base_dtype} weights" + (f" + {lora}" if lora else "")
    return f"train, {lora}" if lora else "train, full finetune"


def aot_train_step(cfg: AotConfig) -> AotReport:
    """Lower and compile `jaxtrain.train.make_train_step` for `cfg.topology` from abstract inputs: all
    weights (fp32 state), or with --lora-rank the adapters' state plus the frozen base as a third,
    non-donated argument (what `train --lora-rank` runs)."""
    topology, config, mesh, rules = _slice(cfg)
    rows_per_step = data_parallel_size(mesh) * cfg.grad_accum
    if cfg.global_batch % rows_per_step:
        raise ValueError(f"--global-batch {cfg.global_batch} must be a multiple of {rows_per_step} (the "
                         f"{data_parallel_size(mesh)}-way batch split of the mesh x --grad-accum "
                         f"{cfg.grad_accum}) on {topology.accelerator_type}")
    optimizer, schedule = train.make_optimizer(cfg.optimizer, cfg.total_steps)
    answer, lcfg = cfg.loss_tokens(), cfg.adapters.lora()
    fns = train.make_train_step(config, optimizer, schedule, mesh, rules, max_loss_tokens=answer,
                                grad_accum=cfg.grad_accum, lora=lcfg, base_dtype=cfg.adapters.base_dtype,
                                base_on_host=cfg.adapters.base_on_host)
    params = model.param_shapes(config) if lcfg is None else model.adapter_shapes(config, lcfg)
    shapes = {"params": params, "opt_state": jax.eval_shape(optimizer.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state = abstract_state(shapes, fns.state_shardings)
    frozen = None if lcfg is None else abstract_state(runs.base_shapes(config, cfg.adapters.base_dtype),
                                                      fns.frozen_shardings)
    rows, length = cfg.global_batch, cfg.seq_len
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.bool_ if k == "loss_mask" else jnp.int32,
                                     sharding=fns.batch_sharding)
             for k in MODEL_INPUT_KEYS}
    # Explicit either way: the train step's own jit carries the TPU options, and these override them.
    options = {**TPU_COMPILER_OPTIONS, "xla_jf_bf16_propagation": cfg.bf16_propagation}
    extra = _extra(cfg, config, mesh, options, seq_len=length, answer_tokens=answer or 0, grad_accum=cfg.grad_accum,
                   optimizer=dataclasses.asdict(cfg.optimizer),
                   flops_analytic=flops_analytic(config, rows * length, length,
                                                 logit_tokens=None if answer is None else rows * answer))
    if lcfg is not None:
        extra["adapter_params"] = num_params(params)
    return compile_lowered(lambda: fns.lower(state, batch, frozen), topology, compiler_options=options,
                           extra=extra)


def _extra(cfg: AotConfig, config: ModelConfig, mesh, compiler_options, *, seq_len: int,
           flops_analytic: float | None = None, **options) -> dict[str, Any]:
    """The JSON line's fields beyond the compiler's: what was compiled, with which options."""
    lora = cfg.adapters.lora()
    return {"step": _step_name(cfg), "model": cfg.model, "seq_len": seq_len, "global_batch": cfg.global_batch,
            "flops_analytic": flops_analytic,
            "options": {"step": cfg.step, "remat": config.remat, "attention": config.attention_impl,
                        "param_dtype": config.param_dtype, **options,
                        "lora": None if lora is None else lora.to_dict(),
                        "base_dtype": cfg.adapters.base_dtype if cfg.step == "decode" or lora else None,
                        "base_on_host": cfg.adapters.base_on_host,
                        "mesh": dict(mesh.shape), "rules": cfg.mesh.rules, "compiler_options": compiler_options}}


_PROGRAM_FIELDS = ("fits", "per_chip_bytes", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                   "compile_s", "error")


def decode_prefill_length(prompt_tokens: int, new_tokens: int, max_length: int) -> int:
    """The prompt bucket `jaxtrain.generate.Generator.generate` pads a batch whose longest prompt has
    `prompt_tokens` tokens to (`jaxtrain.generate.prompt_bucket`)."""
    return generate.prompt_bucket(prompt_tokens, max_length - new_tokens)


def aot_decode_step(cfg: AotConfig) -> AotReport:
    """Lower and compile eval's generation (`jaxtrain.generate`: `prefill` of a left-padded batch into an empty
    KV cache, then `decode_chunk`'s loop of single-token steps, greedy) for `cfg.topology`.

    The two are separate programs on the device, as in eval: the chunk takes the prefill's output state
    (laid out as the prefill's compiled output shardings say) donated. Weights are sharded over the mesh
    as `eval --shard` loads them. The report is the program with the larger per-chip figure (or the one
    the compiler refused); both programs' figures are under "programs".
    """
    topology, config, mesh, rules = _slice(cfg)
    if cfg.seq_len + cfg.new_tokens > config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} + --new-tokens {cfg.new_tokens} exceeds {cfg.model}'s "
                         f"{config.max_position_embeddings} positions")
    length = cfg.prefill_len or decode_prefill_length(cfg.seq_len, cfg.new_tokens, config.max_position_embeddings)
    if not cfg.seq_len <= length <= config.max_position_embeddings - cfg.new_tokens:
        raise ValueError(f"--prefill-len {length} must hold the prompt (--seq-len {cfg.seq_len}) and leave room "
                         f"for --new-tokens {cfg.new_tokens} in {config.max_position_embeddings} positions")
    base_dtype = cfg.adapters.base_dtype
    params = abstract_state(runs.base_shapes(config, base_dtype), runs.base_shardings(config, base_dtype, mesh, rules))
    lcfg, adapters = cfg.adapters.lora(), None
    if lcfg is not None:
        adapter_shardings = logical_to_sharding(model.adapter_logical_axes(config, lcfg), mesh, rules)
        adapters = Adapters(abstract_state(model.adapter_shapes(config, lcfg), adapter_shardings), lcfg)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ids = jax.ShapeDtypeStruct((cfg.global_batch, length), jnp.int32, sharding=replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    static = dict(config=config, greedy=True)
    options = {**TPU_COMPILER_OPTIONS, "xla_jf_bf16_propagation": cfg.bf16_propagation}
    extra = _extra(cfg, config, mesh, options, seq_len=cfg.seq_len, chunk_steps=generate.CHUNK_STEPS)
    extra.update(prefill_len=length, new_tokens=cfg.new_tokens)

    def lower(fn, *args, **kwargs):
        def run():
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                return fn.lower(*args, **kwargs)
        return run

    stop_ids = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)
    prefill_args = (params, adapters, ids, ids, ids, rng, scalar, scalar, stop_ids)
    kept: dict = {}
    prefill = compile_lowered(lower(generate.prefill, *prefill_args, max_new_tokens=cfg.new_tokens, **static),
                              topology, compiler_options=options, extra=extra, keep=kept)
    reports = {"prefill": prefill}
    if prefill.per_chip_bytes is not None:
        out_shapes = jax.eval_shape(functools.partial(generate.prefill, max_new_tokens=cfg.new_tokens, **static),
                                    *prefill_args)
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             out_shapes, kept["compiled"].output_shardings)
        reports["decode_chunk"] = compile_lowered(
            lower(generate.decode_chunk, params, adapters, state, scalar, scalar, **static), topology,
            compiler_options=options, extra=extra)
    worst = max(reports.values(), key=lambda r: (r.per_chip_bytes is None, r.per_chip_bytes or 0))
    worst.extra = {**extra, "program": next(k for k, r in reports.items() if r is worst),
                   "programs": {k: {key: getattr(r, key) for key in _PROGRAM_FIELDS} for k, r in reports.items()}}
    worst.lower_s = round(sum(r.lower_s for r in reports.values()), 2)
    worst.compile_s = round(sum(r.compile_s for r in reports.values()), 2)
    return worst


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f}"


def summary(report: AotReport) -> str:
    """Two human lines: the verdict, and where the memory goes."""
    d = report.as_dict()
    shape = f"seq {d.get('seq_len')} x batch {d.get('global_batch')}"
    if d.get("prefill_len") is not None:
        shape = (f"prompt {d['seq_len']} (bucket {d['prefill_len']}) + {d.get('new_tokens')} new tokens x batch "
                 f"{d['global_batch']} (larger program: {d.get('program')})")
    head = (f"{d['topology']} ({d['chips']} chips, {d['hbm_gib']} GiB HBM per device): {d.get('step', 'step')} "
            f"of {d.get('model')}, {shape}: ")
    if report.per_chip_bytes is None:
        return head + f"DOES NOT FIT ({report.error})"
    verdict = "fits" if report.fits else "DOES NOT FIT"
    return (head + f"{d['per_chip_gib']} GiB per chip, {verdict} ({d['headroom_gib']} GiB to spare)\n"
            f"  arguments {_gib(report.argument_bytes)} + temporaries {_gib(report.temp_bytes)} + code "
            f"{_gib(report.generated_code_bytes)} + outputs {_gib(report.output_bytes - report.alias_bytes)} GiB "
            f"(not aliased to a donated argument); host memory per chip: arguments "
            f"{_gib(report.host_argument_bytes)} + temporaries {_gib(report.host_temp_bytes)} GiB; "
            f"lowered in {report.lower_s} s, compiled in {report.compile_s} s")


def announce(cfg: AotConfig) -> str:
    """What is about to compile, said before the compiler's silent minutes (on stderr: stdout is the report)."""
    shape = (f"prompts of {cfg.seq_len} tokens + {cfg.new_tokens} new x batch {cfg.global_batch}"
             if cfg.step == "decode" else f"seq {cfg.seq_len} x batch {cfg.global_batch}")
    return (f"aot: compiling one step ({_step_name(cfg)}) of {cfg.model} for {cfg.topology} ({shape}) with libtpu on "
            "this machine, no TPU needed; a 7B model takes a few minutes")


def main(cfg: AotConfig) -> int:
    """`python -m jaxtrain aot`: the summary, then the report as one JSON line (exit 0 fit or not)."""
    print(announce(cfg), file=sys.stderr, flush=True)
    report = aot_decode_step(cfg) if cfg.step == "decode" else aot_train_step(cfg)
    print(summary(report))
    print(report.to_json())
    return 0
