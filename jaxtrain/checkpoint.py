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

Every step directory carries ``checksums.json`` (size and sha256 of every file of its items), written by
process 0 once the items are on disk and before orbax renames the step into place, so a step that looks
complete always has them. Every read (resume, export, eval) verifies the files it is about to restore
first, in one sequential pass. Without an explicit step, a damaged newest checkpoint is reported by path
and the newest intact one is used instead; a writable ``Checkpointer`` (training) moves the damaged one
aside to ``RUN/discarded/<step>-damaged`` so that the run can save that step again. Rotation keeps the
newest ``keep`` steps plus the newest one known to hold finite weights (``mark_finite``), so a run that
diverges always has a good checkpoint left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxtrain.config import ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DISCARDED_DIR = "discarded"
"""RUN/discarded/<step>-<why>: checkpoints taken out of use (damaged, or holding weights that gave a
non-finite loss), kept for inspection and never read."""
CHECKSUMS = "checksums.json"
_ARRAY_ITEMS = ("params", "opt_state")
_JSON_ITEMS = ("data", "model_config", "metadata")
_STEP_MARKER = "_CHECKPOINT_METADATA"  # written by orbax into every finalized step directory


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming it and why."""


class _Unreadable(Exception):
    """Orbax could not read a step (a damaged file that no checksum covered)."""


class _QuietReadOnly(logging.Filter):
    """Orbax warns "Given directory is read only" on every read-only manager, i.e. on every export and eval."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how many checkpoints to keep."""

    save_every: int = 100
    """save every N steps (and always at the end of training)"""
    keep: int = 3
    """keep the newest K checkpoints"""
    async_save: bool = True
    """write checkpoints in the background while training continues"""
    verify: bool = True
    """check every file of a checkpoint against the sha256 recorded when it was saved before restoring it
    (one read pass over the files restored; off: restore unchecked)"""


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _files_of(step_dir: epath.Path, items: Sequence[str]) -> list[str]:
    """Every file under the given item folders of a step, as paths relative to the step, sorted."""
    found, folders = [], [step_dir / item for item in items if (step_dir / item).is_dir()]
    while folders:  # epath has no recursive glob on buckets
        for p in folders.pop().iterdir():
            if p.is_dir():
                folders.append(p)
            else:
                found.append(str(p.relative_to(step_dir)))
    return sorted(found)


def _sha256(path: epath.Path, bar) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _progress(step_dir: epath.Path, files: list[str], what: str):
    size = sum((step_dir / f).stat().length for f in files)
    return tqdm(total=size, unit="B", unit_scale=True, desc=f"{what} checkpoint {step_dir.name.split('.')[0]}",
                disable=size < 2**30, leave=False)


def write_checksums(step_dir: epath.Path) -> None:
    """Record size and sha256 of every file of every item of a step in ``step_dir/checksums.json``."""
    files = _files_of(step_dir, _ARRAY_ITEMS + _JSON_ITEMS)
    with _progress(step_dir, files, "hashing") as bar:
        table = {f: {"size": (step_dir / f).stat().length, "sha256": _sha256(step_dir / f, bar)} for f in files}
    (step_dir / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": table}, indent=1) + "\n")


def verify_checksums(step_dir: epath.Path, items: Sequence[str]) -> str | None:
    """None when every recorded file of ``items`` (and of the small JSON items) is there with its recorded size
    and sha256, else the first problem ("params/d/ab12: 1024 bytes, checksums.json says 4096"). Sizes are
    compared before anything is read; then one sequential read pass. Raises FileNotFoundError without
    checksums.json."""
    try:
        table = json.loads((step_dir / CHECKSUMS).read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{CHECKSUMS} is unreadable ({_first_line(e)})"
    wanted = tuple(items) + _JSON_ITEMS
    listed = sorted(f for f in table if f.split("/", 1)[0] in wanted)
    for f in listed:
        path = step_dir / f
        if not path.is_file():
            return f"{f}: missing"
        size = path.stat().length
        if size != table[f]["size"]:
            return f"{f}: {size} bytes, {CHECKSUMS} says {table[f]['size']}"
    with _progress(step_dir, listed, "verifying") as bar:
        for f in listed:
            if _sha256(step_dir / f, bar) != table[f]["sha256"]:
                return f"{f}: sha256 differs from {CHECKSUMS} (the file changed after it was saved)"
    return None


@dataclasses.dataclass
class _KeepNewestAndLastFinite:
    """Orbax preservation policy: the newest ``keep`` steps, and the newest step at or below ``finite``
    (its weights gave a finite loss), whatever ``keep`` says."""

    keep: int
    finite: int | None = None

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        steps = [c.step for c in checkpoints]
        good = [s for s in steps if self.finite is not None and s <= self.finite]
        protected = max(good) if good else None
        return [i >= len(steps) - self.keep or s == protected for i, s in enumerate(steps)]


def _manager(directory: epath.Path, config: CheckpointConfig, *, read_only: bool,
             policy: _KeepNewestAndLastFinite | None = None,
             on_written: Callable[[], None] | None = None) -> ocp.CheckpointManager:
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False,
                                               save_interval_steps=0)
    else:  # always the async checkpointer: its post-finalization callback writes checksums.json
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, cleanup_tmp_directories=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=on_written))
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
        self.read_only = read_only
        self._in_flight: int | None = None  # the step whose background save is being finalised
        self._policy = _KeepNewestAndLastFinite(config.keep)
        if not read_only:
            if jax.process_index() == 0:
                self._remove_incomplete()
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("jaxtrain.checkpoint: incomplete steps removed")
        self._mngr = _manager(self.directory, config, read_only=read_only, policy=self._policy,
                              on_written=self._write_checksums)

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
        copied to host memory, so the caller may then donate or overwrite them (with ``async_save=False``:
        until the checkpoint is on disk).
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
        self._mngr.wait_until_finished()  # orbax waits for the previous save anyway; then _in_flight is ours
        self._in_flight = step
        started = self._mngr.save(step, args=args, force=True)
        if not self.config.async_save:
            self._mngr.wait_until_finished()
        return started

    def _write_checksums(self) -> None:
        """Orbax's post-finalisation callback (process 0, background thread): the items of the step in flight
        are complete and the step is not yet renamed into place (or, on a bucket, not yet marked committed)."""
        step = self._in_flight
        candidates = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*")) or [self.directory / str(step)]
        write_checksums(candidates[-1])

    def mark_finite(self, step: int) -> None:
        """The weights of every checkpoint up to ``step`` gave a finite loss: rotation keeps the newest of them
        even when ``keep`` newer ones exist, so a run that diverges later still has a good checkpoint."""
        self._policy.finite = step

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

    def discard(self, step: int, why: str) -> epath.Path:
        """Take a checkpoint out of use: move it to RUN/discarded/<step>-<why> (process 0; every process waits)
        and return where it went. Only a writable Checkpointer (training) does this."""
        if self.read_only:
            raise RuntimeError("a read-only Checkpointer never moves checkpoints")
        self._mngr.wait_until_finished()
        aside = self.directory.parent / DISCARDED_DIR
        target = aside / f"{step}-{why}"
        n = 1
        while target.exists():
            n += 1
            target = aside / f"{step}-{why}-{n}"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxtrain.checkpoint: step {step} discarded")
        self._mngr.reload()
        return target

    # --- restoring --------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first."""
        self._mngr.reload()
        return sorted(s for s in self._mngr.all_steps() if _is_complete(self.directory / str(s)))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def _damage(self, step: int, items: Sequence[str]) -> str | None:
        """Why a step's files of ``items`` cannot be trusted, or None (verified, or not verifiable: a warning).
        Process 0 reads the files; every process gets its verdict."""
        step_dir = self.directory / str(step)
        why, unverified = None, False
        if self.config.verify and jax.process_index() == 0:
            try:
                why = verify_checksums(step_dir, items)
            except FileNotFoundError:
                unverified = True
        if jax.process_count() > 1:
            code = multihost_utils.broadcast_one_to_all(np.int32(2 if why else int(unverified)))
            why = why or ("damaged (found by process 0, see its log)" if int(code) == 2 else None)
            unverified = int(code) == 1
        if unverified and jax.process_index() == 0:
            print(f"warning: {step_dir} has no {CHECKSUMS} (saved before checkpoints carried checksums); "
                  "restoring it unverified", file=sys.stderr)
        return why

    def _newest_intact(self, step: int | None, items: Sequence[str], read: Callable[[int], Any]) -> Any:
        """``read(s)`` for ``step``, or without one for the newest checkpoint whose files of ``items`` are
        intact, reporting every newer damaged one (and, when writable, moving it aside)."""
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint for step {step} "
                                    f"(available: {steps})")
        damaged: list[tuple[int, str]] = []
        for s in [step] if step is not None else steps[::-1]:
            why = self._damage(s, items)
            if why is None:
                try:
                    result = read(s)
                except _Unreadable as e:
                    why = str(e)
                else:
                    self._report_damaged(damaged, s)
                    return result
            if step is not None:
                raise CheckpointError(f"{self.directory / str(s)} is damaged ({why})")
            damaged.append((s, why))
        listed = "; ".join(f"{s}: {why}" for s, why in damaged)
        raise CheckpointError(f"{self.directory}: no intact checkpoint ({listed})")

    def _report_damaged(self, damaged: list[tuple[int, str]], used: int) -> None:
        for s, why in damaged:
            moved = "" if self.read_only else f"; moved it to {self.discard(s, 'damaged')}"
            if jax.process_index() == 0:
                print(f"warning: {self.directory / str(s)} is damaged ({why}); using {self.directory / str(used)}, "
                      f"the newest intact checkpoint{moved}", file=sys.stderr)

    def _orbax(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore report a damaged file in many ways
            raise _Unreadable(_first_line(e)) from e

    def _check_matches(self, step: int, abstract: dict) -> None:
        """The arrays asked for have the saved tree and shapes (else: another model or optimizer, not damage)."""
        saved_items = self._orbax(lambda: self._mngr.item_metadata(step))
        for item, what in (("params", "parameters do not match the model"),
                           ("opt_state", "optimizer state does not match (another optimizer or its settings?)")):
            if item not in abstract:
                continue
            saved = getattr(saved_items[item], "tree", saved_items[item])
            want, have = _shapes_by_path(abstract[item]), _shapes_by_path(saved)
            diffs = [f"{k}: checkpoint {have.get(k, 'missing')} vs model {want.get(k, 'missing')}"
                     for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
            if diffs:
                raise ValueError(f"{self.directory / str(step)}: {what} ({len(diffs)} differences):\n  "
                                 + "\n  ".join(diffs[:20]))

    def _restore_step(self, step: int, abstract: dict) -> Restored:
        self._check_matches(step, abstract)
        items = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
        items.update({k: ocp.args.JsonRestore() for k in _JSON_ITEMS})
        out = self._orbax(lambda: self._mngr.restore(step, args=ocp.args.Composite(**items)))
        config = out["model_config"]
        return Restored(step=step, params=out["params"], opt_state=out.get("opt_state"),
                        data_state=out["data"] or None,
                        model_config=ModelConfig(**config) if config else None,
                        metadata=out["metadata"] or {})

    def restore(self, abstract: dict, step: int | None = None) -> Restored:
        """Restore ``abstract["params"]`` (and ``abstract["opt_state"]`` if given) onto their shardings.

        Leaves of ``abstract`` are ``jax.ShapeDtypeStruct`` with ``sharding`` set (or arrays, whose
        sharding is used); the mesh may differ from the one that saved. ``step`` defaults to the newest
        intact checkpoint (see the module docstring); a damaged ``step`` is a ``CheckpointError``.
        """
        abstract = {k: jax.tree.map(_as_abstract, abstract[k]) for k in _ARRAY_ITEMS if abstract.get(k) is not None}
        return self._newest_intact(step, tuple(abstract), lambda s: self._restore_step(s, abstract))

    def _read_json(self, step: int) -> tuple[int, ModelConfig | None, dict]:
        out = self._orbax(lambda: self._mngr.restore(step, args=ocp.args.Composite(
            model_config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore())))
        config = out["model_config"]
        return step, (ModelConfig(**config) if config else None), out["metadata"] or {}

    def read_json(self, step: int | None = None) -> tuple[int, ModelConfig | None, dict]:
        """(step, model config, metadata) of a checkpoint (default: the newest whose small JSON items are
        intact) without touching its arrays."""
        return self._newest_intact(step, (), self._read_json)

    def saved_params_shapes(self, step: int) -> Any:
        """The params tree of a checkpoint as ShapeDtypeStructs (no sharding)."""
        saved = self._orbax(lambda: self._mngr.item_metadata(step))["params"]
        saved = getattr(saved, "tree", saved)
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), saved)

    def restore_params(self, step: int | None = None, *, shardings=None) -> Restored:
        """The parameters only (never the optimizer state) of ``step`` or the newest intact checkpoint, in the
        saved tree; ``shardings`` (a tree matching the params) places them, by default on this process's
        first device."""
        def read(s: int) -> Restored:
            _, config, _ = self._read_json(s)
            if config is None:
                raise ValueError(f"{self.directory / str(s)}: the checkpoint has no model config")
            shapes = self.saved_params_shapes(s)
            where = shardings if shardings is not None else jax.tree.map(
                lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), shapes)
            return self._restore_step(s, {"params": abstract_state(shapes, where)})
        return self._newest_intact(step, ("params",), read)


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
                         shardings=None, verify: bool = True) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) of a run's newest intact checkpoint (or ``step``), for eval and export; see
    ``Checkpointer.restore_params``."""
    with Checkpointer(run_dir, CheckpointConfig(verify=verify), read_only=True) as ckpt:
        restored = ckpt.restore_params(step, shardings=shardings)
    return restored.model_config, restored.params
