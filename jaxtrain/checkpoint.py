"""Training checkpoints: an orbax ``CheckpointManager`` laid out for exact resume and for export.

``RUN/checkpoints/<step>/`` holds five items: ``params`` and ``opt_state`` (sharded arrays, written by
every process in parallel), ``data`` (the input iterator's JSON state), ``model_config`` (the
ModelConfig as JSON) and ``metadata`` (free JSON, e.g. the train config). Saves are asynchronous:
``save`` returns once the arrays are copied off the accelerator, and the files are written in the
background. Orbax writes into a temporary directory and renames it when complete, so a save killed
midway never looks like a checkpoint; step directories that are nonetheless incomplete (e.g. a
non-atomic file system) are ignored here as well.

Restoring takes an *abstract* state (``jax.ShapeDtypeStruct`` leaves carrying the target shardings), so
arrays are read straight into their shards on the current mesh, whatever mesh wrote them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxtrain.config import ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_ARRAY_ITEMS = ("params", "opt_state")
_JSON_ITEMS = ("data", "model_config", "metadata")
_STEP_MARKER = "_CHECKPOINT_METADATA"  # written by orbax into every finalized step directory


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how many checkpoints to keep."""

    save_every: int = 100
    """save every N steps (and always at the end of training)"""
    keep: int = 3
    """keep the newest K checkpoints"""
    async_save: bool = True
    """write checkpoints in the background while training continues"""


@dataclasses.dataclass
class Restored:
    """What a checkpoint holds; ``opt_state`` is None when it was not asked for."""

    step: int
    params: Any
    opt_state: Any | None
    data_state: dict | None
    model_config: ModelConfig | None
    metadata: dict


def checkpoint_dir(run_dir: str | os.PathLike) -> epath.Path:
    """RUN/checkpoints; ``run_dir`` may be local or a bucket (``gs://...``), as orbax supports. A relative
    local path is made absolute: orbax's OCDBT store refuses to write under a relative one."""
    if "://" not in str(run_dir):
        run_dir = os.path.abspath(run_dir)
    return epath.Path(run_dir) / CHECKPOINT_DIR


def _is_complete(step_dir: epath.Path) -> bool:
    """Orbax's own test (temporary name locally, commit marker on buckets) plus our items being there."""
    return ((step_dir / _STEP_MARKER).is_file() and (step_dir / "params").is_dir()
            and ocp.step.is_checkpoint_finalized(step_dir))


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _manager(directory: epath.Path, config: CheckpointConfig, *, read_only: bool) -> ocp.CheckpointManager:
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False,
                                               save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep, cleanup_tmp_directories=True,
            enable_async_checkpointing=config.async_save)
    handlers = {**{k: ocp.StandardCheckpointHandler() for k in _ARRAY_ITEMS},
                **{k: ocp.JsonCheckpointHandler() for k in _JSON_ITEMS}}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _as_abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if getattr(x, "sharding", None) is None:
        raise ValueError(f"restore needs a sharding for every leaf; got {x!r} (build the target with "
                         "abstract_state(shapes, shardings))")
    return x


def abstract_state(shapes, shardings):
    """ShapeDtypeStruct tree with shardings (what ``restore`` wants) from shapes and a sharding tree."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


class Checkpointer:
    """Saves and restores one run's checkpoints. Use as a context manager (or call ``close``)."""

    def __init__(self, run_dir: str | os.PathLike, config: CheckpointConfig = CheckpointConfig(), *,
                 model_config: ModelConfig | None = None, metadata: dict | None = None,
                 read_only: bool = False):
        if config.save_every < 1 or config.keep < 1:
            raise ValueError(f"save_every and keep must be >= 1 (got {config})")
        self.directory = checkpoint_dir(run_dir)
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no checkpoints here; is {run_dir} a training run?")
        self.config = config
        self.model_config = model_config
        self.metadata = dict(metadata or {})
        if not read_only:
            if jax.process_index() == 0:
                self._remove_incomplete()
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jaxtrain.checkpoint: incomplete steps removed")
        self._mngr = _manager(self.directory, config, read_only=read_only)

    def _remove_incomplete(self) -> None:
        """Remove step directories that never finished: they would otherwise block later saves."""
        if not self.directory.is_dir():
            return
        for d in self.directory.iterdir():
            if d.is_dir() and d.name.isdigit() and not _is_complete(d):
                log.warning("removing incomplete checkpoint %s", d)
                d.rmtree()

    # --- saving -----------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a periodic save step (a multiple of ``save_every``)."""
        return step % self.config.save_every == 0

    def save(self, step: int, *, params, opt_state, data_state: dict | None = None, force: bool = False) -> bool:
        """Save if ``step`` is due (every ``save_every``) or ``force`` (end of training, preemption).

        Returns whether a save was started (never twice for one step). Blocks only until the arrays are
        copied to host memory, so the caller may then donate or overwrite them.
        """
        if not (force or self.should_save(step)) or step == self._mngr.latest_step():
            return False
        model_config = dataclasses.asdict(self.model_config) if self.model_config is not None else None
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state or {}),
            model_config=ocp.args.JsonSave(model_config),
            metadata=ocp.args.JsonSave(self.metadata),
        )
        return self._mngr.save(step, args=args, force=True)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any of them received a preemption notice (multi-host safe)."""
        return self._mngr.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending background saves are on disk (raises if one failed)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- restoring --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        self._mngr.reload()
        return sorted(s for s in self._mngr.all_steps() if _is_complete(self.directory / str(s)))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _step_or_latest(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint for step {step} "
                                    f"(available: {steps})")
        return step

    def _check_params_match(self, step: int, abstract_params) -> None:
        saved = self._mngr.item_metadata(step)["params"]
        saved = getattr(saved, "tree", saved)
        want, have = _shapes_by_path(abstract_params), _shapes_by_path(saved)
        diffs = [f"{k}: checkpoint {have.get(k, 'missing')} vs model {want.get(k, 'missing')}"
                 for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        if diffs:
            raise ValueError(f"{self.directory / str(step)}: parameters do not match the model "
                             f"({len(diffs)} differences):\n  " + "\n  ".join(diffs[:20]))

    def restore(self, abstract: dict, step: int | None = None) -> Restored:
        """Restore ``abstract["params"]`` (and ``abstract["opt_state"]`` if given) onto their shardings.

        Leaves of ``abstract`` are ``jax.ShapeDtypeStruct`` with ``sharding`` set (or arrays, whose
        sharding is used); the mesh may differ from the one that saved. ``step`` defaults to the newest
        complete checkpoint.
        """
        step = self._step_or_latest(step)
        abstract = {k: jax.tree.map(_as_abstract, abstract[k]) for k in _ARRAY_ITEMS if abstract.get(k) is not None}
        self._check_params_match(step, abstract["params"])
        items = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
        items.update({k: ocp.args.JsonRestore() for k in _JSON_ITEMS})
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.directory / str(step)}: cannot restore onto the given state "
                             f"(different optimizer or model?): {e}") from e
        config = out["model_config"]
        return Restored(step=step, params=out["params"], opt_state=out.get("opt_state"),
                        data_state=out["data"] or None,
                        model_config=ModelConfig(**config) if config else None,
                        metadata=out["metadata"] or {})

    def read_json(self, step: int | None = None) -> tuple[int, ModelConfig | None, dict]:
        """(step, model config, metadata) of a checkpoint without touching its arrays."""
        step = self._step_or_latest(step)
        out = self._mngr.restore(step, args=ocp.args.Composite(
            model_config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
        config = out["model_config"]
        return step, (ModelConfig(**config) if config else None), out["metadata"] or {}

    def saved_params_shapes(self, step: int) -> Any:
        """The params tree of a checkpoint as ShapeDtypeStructs (no sharding)."""
        saved = self._mngr.item_metadata(step)["params"]
        saved = getattr(saved, "tree", saved)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Newest complete checkpoint step of a run, or None (also when the run has no checkpoints yet)."""
    if not checkpoint_dir(run_dir).is_dir():
        return None
    with Checkpointer(run_dir, read_only=True) as ckpt:
        return ckpt.latest_step()


def restore(run_dir: str | os.PathLike, abstract: dict, step: int | None = None) -> Restored:
    """See ``Checkpointer.restore``."""
    with Checkpointer(run_dir, read_only=True) as ckpt:
        return ckpt.restore(abstract, step)


def load_params_from_run(run_dir: str | os.PathLike, step: int | None = None, *,
                         shardings=None) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) of a run's newest complete checkpoint (or ``step``), for eval and export.

    Reads the parameters only, never the optimizer state. ``shardings`` (a tree matching the params)
    places them on a mesh; by default they land on this process's first device.
    """
    with Checkpointer(run_dir, read_only=True) as ckpt:
        step, config, _ = ckpt.read_json(step)
        if config is None:
            raise ValueError(f"{ckpt.directory / str(step)}: the checkpoint has no model config")
        shapes = ckpt.saved_params_shapes(step)
        if shardings is None:
            shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), shapes)
        return config, ckpt.restore({"params": abstract_state(shapes, shardings)}, step).params

