"""Finetuning: the train step (answer-only loss, AdamW, accumulation) and the loop around it.

Data → `jaxtrain.batches.BucketedBatches` (grain over the data_gen shards) → `make_train_step` (one
jitted step with explicit in/out shardings, state donated) → `jaxtrain.checkpoint.Checkpointer` (orbax,
async, exact resume) → `python -m jaxtrain export` (Hugging Face folder).

The loss needs logits only where the loss mask is set (the answer, ~25 tokens of a 4K prompt), so the
step gathers those hidden states and projects only them onto the 32000-token vocabulary.

LoRA mode (`--lora-rank`): the base weights are a separate, non-donated argument of the step (bf16 or
int8, never differentiated, never checkpointed; `jaxtrain.runs.load_base`); the state's "params" are the
adapters (`jaxtrain.lora`), so gradients and optimizer state exist for them only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from data_gen.shards import open_shards
from data_gen.tokenizer import Tokenizer, TokenizerError, get_tokenizer
from jaxtrain import lora as lora_lib
from jaxtrain import model, offload, runs
from jaxtrain.batches import MODEL_INPUT_KEYS, BatchConfig, BucketedBatches
from jaxtrain.checkpoint import CHECKPOINT_DIR, DISCARDED_DIR, CheckpointConfig, Checkpointer, abstract_state
from jaxtrain.config import ModelConfig
from jaxtrain.flops import device_peak_flops, train_step_flops
from jaxtrain.hf_io import load_pretrained
from jaxtrain.sharding import (MeshConfig, batch_sharding, check_divisible, data_parallel_size,
                               logical_to_sharding, make_global_batch, make_mesh,
                               maybe_initialize_distributed, rules_for)
from jaxtrain.topology import compiler_options_for


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 5e-6
    """peak learning rate (the paper: 5e-6 for Mistral 7B)"""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """decay after warm-up"""
    warmup_ratio: float = 0.03
    """fraction of all steps spent warming up linearly from 0"""
    final_lr_ratio: float = 0.0
    """learning rate at the last step, as a fraction of the peak"""
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    """global gradient-norm clip (0: off)"""
    offload_state: bool = False
    """keep Adam's moments in host memory, streamed through HBM one layer at a time (jaxtrain.offload)"""
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of Adam's first moment (bfloat16 saves a quarter of the optimizer memory)"""


DEFAULT_MODEL = "tiny"
"""What `train` builds from random weights when neither --model nor --init-from is given."""


@dataclasses.dataclass
class TrainConfig:
    data: str
    """shard folder written by `python -m data_gen shards`"""
    out: str
    """run folder: checkpoints, metrics.jsonl, TensorBoard events"""
    model: str | None = None
    """model preset or Hugging Face folder (its config.json) to train from random weights (default: tiny). With
    --init-from the folder's config.json decides the architecture: leave --model out, or give one that matches it
    (a differing preset is an error naming both); the run records the folder"""
    init_from: str | None = None
    """Hugging Face folder to finetune; without it the model starts from random weights"""
    tokenizer: str | None = None
    """the model's tokenizer, which must be the one the shards were made with: a folder or "mistral"
    (default: --init-from's own; Mistral 7B's for a preset without --init-from)"""
    epochs: int = 2
    max_steps: int | None = None
    """stop after this many steps (default: all epochs)"""
    global_batch: int | None = 16
    """rows per step (the paper: 16); ignored when --tokens-per-batch is set"""
    tokens_per_batch: int | None = None
    """token budget per step instead of a fixed row count (flat memory across length buckets)"""
    grad_accum: int = 1
    """split every batch into this many sequential micro-batches (same result, less memory)"""
    seed: int = 0
    optimizer: Annotated[OptimizerConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    resume: bool = False
    """continue from the newest intact checkpoint in --out (exactly: params, optimizer, data position)"""
    overwrite: bool = False
    """start afresh in an --out that holds another run: its checkpoints, metrics and TensorBoard events are
    deleted first (without --resume or --overwrite such a folder is refused)"""
    remat: str | None = None
    """remat policy override: none, full, save_dots, save_qkv_proj, save_out_proj, offload_dots, offload_input"""
    dtype: str | None = None
    """compute dtype override (default: the preset's; bfloat16 for the 7B presets)"""
    param_dtype: str | None = None
    """master-weight dtype override (default float32)"""
    log_every: int = 1
    progress: bool = True
    adapters: Annotated[lora_lib.LoraSettings, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=lora_lib.LoraSettings)
    """LoRA instead of a full finetune (--lora-rank ...) and its frozen base (--base-dtype, --base-on-host)"""

    def lora(self) -> lora_lib.LoraConfig | None:
        return self.adapters.lora()

    def model_name(self) -> str:
        """What the run trains, as recorded: the --init-from folder, else the preset or folder of --model."""
        return self.init_from or self.model or DEFAULT_MODEL

    def model_config(self) -> ModelConfig:
        """The preset or --init-from folder's config with this run's overrides. A --model given beside --init-from
        must describe the folder's architecture (checked here), since the folder's config.json is what is used."""
        config = ModelConfig.resolve(self.model_name(), remat=self.remat, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
        if self.init_from and self.model and Path(self.model).resolve() != Path(self.init_from).resolve():
            differences = ModelConfig.resolve(self.model).architecture_differences(config)
            if differences:
                raise ValueError(f"--model {self.model} and --init-from {self.init_from} are different architectures "
                                 f"(--model vs --init-from: {'; '.join(differences)}): the folder's config.json is "
                                 "what trains, so drop --model or name the matching preset")
        return config

    def model_tokenizer(self, config: ModelConfig) -> Tokenizer:
        """--tokenizer, else --init-from's own, else Mistral 7B's; its ids must fit the model's vocabulary."""
        try:
            tokenizer = get_tokenizer(self.tokenizer or self.init_from)
        except TokenizerError as e:
            raise ValueError(f"{e} (the model's tokenizer: pass --tokenizer mistral or a tokenizer folder)") from None
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, more than the model's "
                             f"vocab_size {config.vocab_size}: not this model's tokenizer (--tokenizer)")
        return tokenizer

    def validate(self) -> None:
        """Refuse settings that cannot train (one line naming every bad flag) before anything is written."""
        o, c = self.optimizer, self.checkpoint
        rules = [
            (o.lr > 0 and math.isfinite(o.lr), f"--lr must be positive (got {o.lr})"),
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1 (got {self.grad_accum})"),
            (self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})"),
            (0 <= o.warmup_ratio <= 1, f"--warmup-ratio must lie in [0, 1] (got {o.warmup_ratio})"),
            (o.final_lr_ratio >= 0, f"--final-lr-ratio must not be negative (got {o.final_lr_ratio})"),
            (o.weight_decay >= 0, f"--weight-decay must not be negative (got {o.weight_decay})"),
            (o.clip_norm >= 0, f"--clip-norm must not be negative (got {o.clip_norm})"),
            (0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"--b1 and --b2 must lie in [0, 1) (got {o.b1}, {o.b2})"),
            (o.eps > 0, f"--eps must be positive (got {o.eps})"),
            (c.save_every >= 1 and c.keep >= 1, f"--checkpoint.save-every and --checkpoint.keep must be at least 1 "
                                                f"(got {c.save_every}, {c.keep})"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other (continue the run "
                                                   "in --out, or replace it)"),
        ]
        problems = [message for ok, message in rules if not ok]
        if problems:
            raise ValueError("; ".join(problems))


# --- the step -----------------------------------------------------------------------------------------

def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    return round(cfg.warmup_ratio * total_steps)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    warmup = warmup_steps(cfg, total_steps)
    decay_steps = max(1, total_steps - warmup)
    end = cfg.lr * cfg.final_lr_ratio
    decay = {"cosine": optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_ratio),
             "linear": optax.linear_schedule(cfg.lr, end, decay_steps),
             "constant": optax.constant_schedule(cfg.lr)}[cfg.schedule]
    schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup]) if warmup else decay
    adam = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mu_dtype=jnp.dtype(cfg.state_dtype))
    if cfg.offload_state:
        return offload.layerwise(adam, clip_norm=cfg.clip_norm), schedule
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*chain, adam), schedule


def loss_sums(config: ModelConfig, params, batch, max_loss_tokens: int | None, *,
              adapters: lora_lib.Adapters | None = None, dropout_rng=None):
    """(sum of token losses, number of loss tokens, correctly predicted tokens) of one batch.

    Position t-1 predicts token t, which counts when `loss_mask[t]` is set. With `max_loss_tokens`, only
    the first that-many such positions of each row are projected to the vocabulary; the caller guarantees
    no row has more (see `max_answer_tokens`), so nothing is dropped.
    """
    ids, segments = batch["input_ids"], batch["segment_ids"]
    targets = ids[:, 1:]
    predict = batch["loss_mask"][:, 1:].astype(bool) & (segments[:, 1:] != 0)
    hidden = model.hidden_states(config, params, ids, positions=batch["positions"], segment_ids=segments,
                                 adapters=adapters, dropout_rng=dropout_rng)[:, :-1]
    if max_loss_tokens is not None:
        order = jnp.argsort(~predict, axis=1, stable=True)[:, :max_loss_tokens]
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        predict = jnp.take_along_axis(predict, order, axis=1)
    logits = model.logits_from_hidden(config, params, hidden)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = predict.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weight
    return (token_loss * weight).sum(), weight.sum(), correct.sum()


def _wrap_loss_sums(config, params, batch, max_loss_tokens, **lora_kwargs):
    loss, count, correct = loss_sums(config, params, batch, max_loss_tokens, **lora_kwargs)
    return loss, (count, correct)


def train_step(state, batch, frozen=None, *, config: ModelConfig, optimizer, schedule, max_loss_tokens,
               grad_accum, lora: lora_lib.LoraConfig | None = None, seed: int = 0):
    """One optimizer step on state["params"]: all weights, or (LoRA) the adapters on the `frozen` base."""
    if lora is None:
        def loss_fn(p, b):
            return _wrap_loss_sums(config, p, b, max_loss_tokens)
    else:  # dropout masks depend on (seed, step) only, so a resumed run draws the same ones
        rng = jax.random.fold_in(jax.random.key(seed), state["step"]) if lora.dropout > 0 else None

        def loss_fn(p, b):
            return _wrap_loss_sums(config, frozen, b, max_loss_tokens, adapters=lora_lib.Adapters(p, lora),
                                   dropout_rng=rng)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, (count, correct)), grads = grad_fn(state["params"], batch)
    else:
        grads, loss, count, correct = _accumulate(grad_fn, state["params"], batch, grad_accum)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # The norm of the updated weights overflows float32 once any weight passes ~1e19: such a state is never saved.
    metrics = {"loss": loss / denom, "accuracy": correct / denom, "loss_tokens": count,
               "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
               "lr": schedule(state["step"])}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def _accumulate(grad_fn, params, batch, grad_accum):
    def split(x):
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

    def micro(carry, b):
        (loss, (count, correct)), grads = grad_fn(params, b)
        acc = (grads, loss, count, correct)
        return jax.tree.map(jnp.add, carry, acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    out, _ = jax.lax.scan(micro, init, jax.tree.map(split, batch))
    return out


@dataclasses.dataclass
class StepFunctions:
    """The jitted step and the shardings of everything it touches (also what `aot` compiles).

    Tracing happens under the mesh (`jax.set_mesh`), which is what turns the model's logical activation
    constraints into real sharding constraints; call `step` / `lower` rather than `jitted` directly.
    """

    jitted: object
    mesh: jax.sharding.Mesh
    state_shardings: dict
    batch_sharding: NamedSharding
    optimizer: optax.GradientTransformation
    frozen_shardings: Any = None
    """LoRA: shardings of the frozen base weights, the step's third argument"""
    frozen: Any = None
    """LoRA: the frozen base weights (set once loaded)"""

    def _args(self, state, batch, frozen):
        return (state, batch) if self.frozen_shardings is None else (state, batch, frozen)

    def step(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self.jitted(*self._args(state, batch, self.frozen))

    def lower(self, state, batch, frozen=None):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*self._args(state, batch, frozen))


def state_shardings(config: ModelConfig, optimizer, mesh, rules, lora: lora_lib.LoraConfig | None = None) -> dict:
    """Shardings of params (from their logical axes) and of the optimizer state (like its params).
    With `lora`, "params" are the adapters."""
    if lora is None:
        params = logical_to_sharding(model.param_logical_axes(config), mesh, rules)
        opt_shapes = jax.eval_shape(optimizer.init, model.param_shapes(config))
    else:
        params = logical_to_sharding(model.adapter_logical_axes(config, lora), mesh, rules)
        opt_shapes = jax.eval_shape(optimizer.init, model.adapter_shapes(config, lora))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, params,
                                transform_non_params=lambda _: replicated)
    opt = offload.place_state(optimizer, opt)
    return {"params": params, "opt_state": opt, "step": replicated}


def make_train_step(config: ModelConfig, optimizer, schedule, mesh, rules, *, max_loss_tokens: int | None,
                    grad_accum: int = 1, lora: lora_lib.LoraConfig | None = None,
                    base_dtype: lora_lib.BaseDtype = "bfloat16",
                    base_on_host: bool = False, seed: int = 0) -> StepFunctions:
    shardings = state_shardings(config, optimizer, mesh, rules, lora)
    batch_shard = batch_sharding(mesh, rules)
    body = jax.tree_util.Partial(train_step, config=config, optimizer=optimizer, schedule=schedule,
                                 max_loss_tokens=max_loss_tokens, grad_accum=grad_accum, lora=lora, seed=seed)

    def step(state, batch, frozen=None):
        with nn.logical_axis_rules(rules):
            return body(state, batch, frozen)

    replicated = NamedSharding(mesh, PartitionSpec())
    in_shardings = (shardings, batch_shard)
    frozen_shardings = None
    if lora is not None:
        frozen_shardings = runs.base_shardings(config, base_dtype, mesh, rules, on_host=base_on_host)
        in_shardings += (frozen_shardings,)
    jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, replicated), donate_argnums=0,
                     compiler_options=compiler_options_for(list(mesh.devices.flat)))
    return StepFunctions(jitted, mesh, shardings, batch_shard, optimizer, frozen_shardings)


# --- setting up ---------------------------------------------------------------------------------------

def max_answer_tokens(batches: BucketedBatches) -> int | None:
    """The most loss tokens of any example, rounded up to a multiple of 8 (None: use every position).

    Read once from the data so that the answer-only logits never drop a loss token.
    """
    most, longest = 1, 1
    for bucket in batches.buckets:
        longest = max(longest, bucket.max_len)
        for i in range(bucket.num_examples):
            most = max(most, int(np.asarray(bucket.source[i]["loss_mask"]).sum()))
    rounded = -(-most // 8) * 8
    return None if rounded * 2 >= longest else rounded


def init_state(config: ModelConfig, cfg: TrainConfig, fns: StepFunctions) -> dict:
    """Parameters and optimizer state created directly in their shards (never whole on one device).
    LoRA: fresh adapters (the base is loaded separately, `runs.load_base`)."""
    lora = cfg.lora()
    if lora is not None:
        params = jax.jit(lambda r: model.init_adapters(config, lora, r), out_shardings=fns.state_shardings["params"])(
            jax.random.fold_in(jax.random.key(cfg.seed), 1))
    elif cfg.init_from:
        _, params = load_pretrained(cfg.init_from, shardings=fns.state_shardings["params"],
                                    dtype=config.param_dtype,
                                    config_overrides=dict(remat=config.remat, dtype=config.dtype))
    else:
        params = jax.jit(lambda r: model.init_params(config, r),
                         out_shardings=fns.state_shardings["params"])(jax.random.key(cfg.seed))
    opt_state = jax.jit(fns.optimizer.init, out_shardings=fns.state_shardings["opt_state"])(params)
    step = jax.device_put(jnp.int32(0), fns.state_shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}


def _check_same_base(run_dir: epath.Path, saved_metadata: dict, base: dict) -> None:
    """--resume of a LoRA run must find the base model it started from."""
    saved = saved_metadata.get("base")
    if saved and saved["sha256"] != base["sha256"]:
        raise ValueError(f"{run_dir}: --resume with a different base model: the checkpoints were trained on "
                         f"{saved['init_from'] or saved['sha256']} (sha256 {saved['sha256']}), "
                         f"--init-from gives sha256 {base['sha256']}")


class NonFiniteLoss(RuntimeError):
    pass


EX_TEMPFAIL = 75
"""Exit status of `python -m jaxtrain train` stopped by SIGTERM after saving (sysexits.h: temporary failure, try
again): not 0, so `train && export` stops, and not 1, so a wrapper can tell "resume me" from an error."""


class Preempted(Exception):
    """Training stopped on SIGTERM after saving its state; it is not finished (rerun with --resume)."""


_RUN_FILES = (CHECKPOINT_DIR, DISCARDED_DIR, runs.TOKENIZER_DIR, "metrics.jsonl", "tensorboard")


def _prepare_run_dir(run_dir: epath.Path, cfg: TrainConfig) -> None:
    """An --out that holds a run is continued (--resume), replaced (--overwrite: its files deleted first) or
    refused, so that no run's checkpoints are rotated away or shadowed by another's."""
    ckpts = run_dir / CHECKPOINT_DIR
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    held = bool(steps) or (run_dir / "metrics.jsonl").exists()
    if held and not (cfg.resume or cfg.overwrite):
        what = f"checkpoints {', '.join(map(str, steps))}" if steps else "metrics.jsonl"
        raise ValueError(f"{run_dir} holds a training run ({what}); pass --resume to continue it, or --overwrite to "
                         "delete it and start afresh")
    if jax.process_index() == 0:
        if held and cfg.overwrite:
            for name in _RUN_FILES:
                path = run_dir / name
                if path.is_dir():
                    path.rmtree()
                elif path.exists():
                    path.unlink()
            print(f"--overwrite: deleted the previous run's checkpoints and metrics in {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxtrain.train: run folder ready")


class _Preemption:
    """SIGTERM (a TPU preemption notice) asks the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class _MetricsLog:
    """metrics.jsonl plus TensorBoard event files, written by process 0.

    On a `gs://` run folder (pods) the JSONL goes to the bucket and the event files stay on the host,
    under ./tensorboard/<run name>, since tensorboardX writes local files only.
    """

    def __init__(self, run_dir: epath.Path, start: int):
        """Rows of steps after `start` (logged before a crash, about to be redone) are dropped."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        path = run_dir / "metrics.jsonl"
        kept = [row for row in _rows(path) if row["step"] <= start] if start and path.exists() else []
        path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.jsonl = path.open("a")
        local = "://" not in str(run_dir)
        self.tb = SummaryWriter(str(run_dir / "tensorboard") if local else f"tensorboard/{run_dir.name}")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _rows(path: epath.Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a crash is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a finetune; returns the last step's metrics. Raises `Preempted` when SIGTERM stopped it
    after saving, `NonFiniteLoss` when the loss, the gradient or the weights stop being finite."""
    cfg.validate()
    maybe_initialize_distributed()
    run_dir = epath.Path(cfg.out)
    config = cfg.model_config()
    tokenizer = cfg.model_tokenizer(config)
    mesh = make_mesh(cfg.mesh)
    rules = rules_for(cfg.mesh.rules)
    check_divisible(model.param_shapes(config), model.param_logical_axes(config), mesh, rules)
    batch_cfg = BatchConfig(tokens_per_batch=cfg.tokens_per_batch, global_batch=cfg.global_batch, seed=cfg.seed)
    batches = BucketedBatches(open_shards(cfg.data, tokenizer=tokenizer), batch_cfg,
                              row_multiple=data_parallel_size(mesh) * cfg.grad_accum, num_epochs=cfg.epochs)
    _prepare_run_dir(run_dir, cfg)
    total = batches.steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer, schedule = make_optimizer(cfg.optimizer, total)
    answer_tokens = max_answer_tokens(batches)
    lora = cfg.lora()
    fns = make_train_step(config, optimizer, schedule, mesh, rules, max_loss_tokens=answer_tokens,
                          grad_accum=cfg.grad_accum, lora=lora, base_dtype=cfg.adapters.base_dtype,
                          base_on_host=cfg.adapters.base_on_host, seed=cfg.seed)
    recorded = {**dataclasses.asdict(cfg), "model": cfg.model_name()}
    metadata = {"train_config": json.loads(json.dumps(recorded, default=str)),
                "tokenizer": runs.save_run_tokenizer(run_dir, tokenizer, copy=jax.process_index() == 0)}
    if lora is not None:
        metadata.update(lora=lora.to_dict(), base=runs.base_metadata(cfg.init_from, cfg.adapters.base_dtype, cfg.seed))
    ckpt = Checkpointer(run_dir, cfg.checkpoint, model_config=config, metadata=metadata)
    started = time.perf_counter()
    try:
        state, start, origin = None, 0, None
        if cfg.resume and ckpt.latest_step() is not None:
            shapes = jax.eval_shape(lambda: init_state(config, dataclasses.replace(cfg, init_from=None), fns))
            restored = ckpt.restore(abstract_state(shapes, fns.state_shardings))
            where = ckpt.directory / str(restored.step)
            try:
                batches.set_state(restored.data_state)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if lora is not None:
                _check_same_base(run_dir, restored.metadata, metadata["base"])
            state = {"params": restored.params, "opt_state": restored.opt_state,
                     "step": jax.device_put(jnp.int32(restored.step), fns.state_shardings["step"])}
            start = restored.step
            origin = f"resumed from {where} (step {start} of {total})"
        if jax.process_index() == 0:
            print(start_summary(cfg, config, batches, total, mesh, origin), flush=True)
        if lora is not None:
            fns.frozen = runs.load_base(config, init_from=cfg.init_from, base_dtype=cfg.adapters.base_dtype,
                                        seed=cfg.seed, shardings=fns.frozen_shardings)
        if state is None:
            state = init_state(config, cfg, fns)
        metrics = _loop(cfg, config, fns, state, batches, ckpt, start, total)
    finally:
        ckpt.close()
    if jax.process_index() == 0:
        print(end_summary(cfg, metrics, total - start, time.perf_counter() - started,
                          run_dir / CHECKPOINT_DIR / str(total)), flush=True)
    return metrics


def _count(n: int) -> str:
    """A parameter count the way model cards write it: 4.2M, 7.24B."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def start_summary(cfg: TrainConfig, config: ModelConfig, batches: BucketedBatches, total: int, mesh,
                  origin: str | None) -> str:
    """What is about to train, in four lines: the model and what is trained, the data and the step count, the
    optimizer, the devices and where the weights come from."""
    lora = cfg.lora()
    trained = "weights" if lora is None else "adapters"
    precision = f"{config.param_dtype} {trained}, {config.dtype} compute, remat {config.remat}"
    if lora is None:
        what = f"{cfg.model_name()}: full finetune of {_count(config.num_params)} parameters ({precision})"
    else:
        adapters = lora_lib.num_params(model.adapter_shapes(config, lora))
        what = (f"{cfg.model_name()}: LoRA rank {lora.rank} ({_count(adapters)} trainable parameters) on the frozen "
                f"{cfg.adapters.base_dtype} base of {_count(config.num_params)} ({precision})")
    examples = sum(b.num_examples for b in batches.buckets)
    rows = (f"{cfg.global_batch} rows" if cfg.tokens_per_batch is None else f"~{cfg.tokens_per_batch} tokens")
    steps = f"{batches.steps_per_epoch} steps an epoch x {cfg.epochs} epochs"
    full = batches.steps_per_epoch * cfg.epochs
    steps += f", stopping at --max-steps {total}" if total < full else f" = {total} steps"
    o = cfg.optimizer
    accum = f" in {cfg.grad_accum} micro-batches" if cfg.grad_accum > 1 else ""
    devices = jax.devices()
    shape = " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())
    weights = origin or (f"from {cfg.init_from}" if cfg.init_from and lora is None else
                         f"fresh adapters on {cfg.init_from}" if cfg.init_from else
                         f"from random weights (seed {cfg.seed})")
    return "\n".join([
        f"train: {what}",
        f"  data: {cfg.data}: {examples} examples; {steps}; {rows} a step{accum}",
        f"  optimizer: AdamW, lr {o.lr:g} ({o.schedule}, {warmup_steps(o, total)} warm-up steps), seed {cfg.seed}",
        f"  mesh: {shape} over {len(devices)} {devices[0].platform} device{'s' * (len(devices) > 1)}; {weights}"])


def end_summary(cfg: TrainConfig, metrics: dict, steps: int, seconds: float, checkpoint: epath.Path) -> str:
    """How it ended, where the weights are, and the command that makes a Hugging Face folder of them."""
    if metrics:
        head = (f"done: {steps} steps in {seconds:.1f} s; last step: loss {metrics['loss']:.4f}, answer-token "
                f"accuracy {metrics['accuracy']:.3f}")
    else:
        head = "done: nothing left to train (the run had reached its last step)"
    return "\n".join([head, f"  checkpoint: {checkpoint}",
                      f"  next: python -m jaxtrain export --checkpoint {cfg.out} --out HF_DIR"])


def _non_finite(out: dict, step: int, local: dict, ckpt: Checkpointer) -> NonFiniteLoss:
    """The error for a step whose loss, gradient or updated weights are not finite. Its state is never saved;
    a checkpoint of the weights that gave a non-finite loss (the previous step's) is moved aside."""
    ids = [i for i in local["example_ids"] if i]
    ckpt.wait()  # the previous step's save may still be finishing in the background
    if math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"]):
        what = (f"the update of step {step} made the weights non-finite (parameter norm {out['param_norm']}; batch "
                f"of examples {ids}); that state was not saved")
    else:
        what = (f"non-finite loss ({out['loss']}) or gradient norm ({out['grad_norm']}) at step {step}, batch of "
                f"examples {ids}")
        if step - 1 in ckpt.steps():
            what += f"; the checkpoint of step {step - 1} holds the weights that gave it: moved to " \
                    f"{ckpt.discard(step - 1, 'nonfinite')}"
    last = ckpt.latest_step()
    return NonFiniteLoss(what + (f"; the last good checkpoint is step {last}" if last is not None else
                                 "; no good checkpoint is left"))


def _loop(cfg: TrainConfig, config: ModelConfig, fns: StepFunctions, state: dict, batches: BucketedBatches,
          ckpt: Checkpointer, start: int, total: int) -> dict:
    """Steps `start` + 1 .. `total`, logging and saving; returns the last step's metrics."""
    peak = device_peak_flops() * jax.device_count()
    log = _MetricsLog(epath.Path(cfg.out), start)
    preemption = _Preemption()
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not cfg.progress)
    metrics: dict = {}
    step, stopped = start, False
    try:
        while step < total:
            local = next(batches)
            batch = make_global_batch(local, fns.mesh, fns.batch_sharding, keys=MODEL_INPUT_KEYS)
            t0 = time.perf_counter()
            state, out = fns.step(state, batch)
            out = {k: float(v) for k, v in jax.device_get(out).items()}
            seconds = time.perf_counter() - t0
            step += 1
            if not all(math.isfinite(out[k]) for k in ("loss", "grad_norm", "param_norm")):
                raise _non_finite(out, step, local, ckpt)
            ckpt.mark_finite(step - 1)  # the weights after step - 1 gave this finite loss
            tokens = int(np.asarray(local["segment_ids"]).sum()) * jax.process_count()
            flops = train_step_flops(config, tokens, int(local["bucket_len"]),
                                     logit_tokens=int(out["loss_tokens"]))
            metrics = {**out, "epoch": batches.epoch, "bucket_len": int(local["bucket_len"]),
                       "tokens_per_s": tokens / seconds, "mfu": flops / seconds / peak, "step_s": seconds}
            if step % cfg.log_every == 0 or step == total:
                log.write(step, metrics)
            bar.set_postfix({"loss": f"{out['loss']:.4f}", "acc": f"{out['accuracy']:.3f}",
                             "gnorm": f"{out['grad_norm']:.3g}", "lr": f"{out['lr']:.2e}",
                             "tok/s": f"{metrics['tokens_per_s']:.0f}", "mfu": f"{100 * metrics['mfu']:.1f}%"},
                            refresh=False)
            bar.update(1)
            stopped = preemption.requested or ckpt.reached_preemption(step)
            ckpt.save(step, params=state["params"], opt_state=state["opt_state"],
                      data_state=batches.get_state(), force=stopped or step == total)
            if stopped:
                print(f"preemption: saved step {step}; rerun with --resume to continue")
                break
    finally:
        bar.close()
        preemption.restore()
        log.close()
    if stopped:
        ckpt.wait()
        raise Preempted(f"stopped by SIGTERM at step {step} of {total} after saving it; rerun with --resume to "
                        "continue")
    return metrics
