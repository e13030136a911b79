"""Input pipeline: length-bucketed, token-budgeted batches over the data_gen ArrayRecord shards.

Each batch comes from ONE length bucket and is padded to that bucket's length, so the train step compiles
once per bucket. In token-budget mode a bucket of length L gets ``tokens_per_batch // L`` rows, so every
batch holds about the same number of tokens and memory stays flat from the 256 to the 32K bucket; in
global-batch mode every batch has the same number of rows (the paper's "global batch 16").

An epoch is a *plan*, a pure function of (seed, epoch, bucket sizes): each bucket's examples are shuffled,
cut into batches (the last one padded with empty rows, so no example is ever dropped), and all the
(bucket, batch) pairs of the epoch are put in one seeded order. The iterator state is therefore just
(epoch, position in the plan): resuming from ``get_state()`` reproduces the exact continuation. Reading
goes through grain (a MapDataset over the plan whose elements read their rows from the bucket's
ArrayRecord source, prefetched by grain's reader threads).

Multi-host: every process computes the same plan and reads only its own contiguous slice of each
batch's rows; ``jaxtrain.sharding.make_global_batch`` assembles the global arrays.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any, Protocol

import grain
import numpy as np

from data_gen.shards import ShardSet, content_sha256, open_shards

PAD_ID = 0
MODEL_INPUT_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
_STATE_VERSION = 1


class BucketLike(Protocol):
    max_len: int
    num_examples: int
    source: Any  # random access: len() and [i] -> {"id": str, "input_ids": int[n], "loss_mask": bool[n]}


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How examples become batches."""

    tokens_per_batch: int | None = None
    """token budget per batch: a bucket of length L gets tokens_per_batch // L rows (flat memory across
    buckets); mutually exclusive with global_batch"""
    global_batch: int | None = 16
    """fixed number of rows per batch, whatever the bucket length (the paper uses 16); ignored when
    tokens_per_batch is set"""
    seed: int = 0
    """shuffling seed; each epoch's order is derived from (seed, epoch)"""
    shuffle: bool = True
    """shuffle examples and interleave buckets; off: buckets in ascending length, examples in file order"""
    prefetch: int = 2
    """batches read ahead by grain's reader threads (0: read synchronously)"""


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
    """One step of an epoch's plan: a bucket and the example indices of its rows (-1 = padding row)."""

    bucket: int
    rows: tuple[int, ...]


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def _as_buckets(shards) -> tuple[list[BucketLike], dict | None]:
    """The buckets, and what identifies the data: where the shards are and the sha256 of their manifest's
    checksums (None for buckets given as a sequence)."""
    if isinstance(shards, (str, os.PathLike)):  # a local folder or gs://... (read through etils.epath)
        shards = open_shards(shards)
    buckets = list(getattr(shards, "buckets", shards))
    if not buckets:
        raise ValueError("the shard set has no buckets")
    identity = None
    if isinstance(shards, ShardSet):
        path = str(shards.path) if "://" in str(shards.path) else os.path.abspath(shards.path)
        identity = {"shards": path, "shards_sha256": content_sha256(shards.manifest)}
    return buckets, identity


class BucketedBatches:
    """Deterministic, resumable iterator of per-process batches (dicts of numpy arrays).

    Every batch has ``input_ids`` int32 [B, L], ``loss_mask`` bool [B, L] (aligned with input_ids: the
    train step shifts), ``segment_ids`` int32 [B, L] (1 = real token, 0 = padding), ``positions`` int32
    [B, L], ``example_ids`` object [B] ("" for padding rows) and ``bucket_len`` (int, = L). B is this
    process's share of the batch's rows.
    """

    def __init__(self, shards, config: BatchConfig = BatchConfig(), *, row_multiple: int = 1,
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None):
        """``shards``: a ``data_gen.shards.ShardSet``, its path (a local folder or ``gs://bucket/...``), or a
        sequence of buckets.

        ``row_multiple``: rows of every batch are a multiple of this (pass the mesh's data-parallel size,
        ``jaxtrain.sharding.data_parallel_size(mesh)``). ``num_epochs``: stop after this many (None:
        forever). Process index/count default to JAX's.
        """
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
        if row_multiple < 1:
            raise ValueError(f"row_multiple must be >= 1 (got {row_multiple})")
        self.config = config
        self.buckets, self._identity = _as_buckets(shards)
        self.process_index, self.process_count = process_index, process_count
        self.num_epochs = num_epochs
        self.rows_per_batch = self._rows_per_batch(config, math.lcm(row_multiple, process_count))
        self._epoch, self._index = 0, 0
        self._plan_cache: tuple[int, list[PlannedBatch]] | None = None
        self._reader: Iterator[dict] | None = None

    # --- the plan ---------------------------------------------------------------------------------
    def _rows_per_batch(self, config: BatchConfig, multiple: int) -> list[int]:
        lengths = [b.max_len for b in self.buckets]
        if config.tokens_per_batch is not None:
            if config.tokens_per_batch < 1:
                raise ValueError(f"tokens_per_batch must be positive (got {config.tokens_per_batch})")
            return [max(multiple, config.tokens_per_batch // L // multiple * multiple) for L in lengths]
        if config.global_batch is None or config.global_batch < 1:
            raise ValueError("set tokens_per_batch or a positive global_batch")
        if config.global_batch % multiple:
            raise ValueError(f"global batch {config.global_batch} is not a multiple of {multiple} (the "
                             "data-parallel size and the process count must both divide it)")
        return [config.global_batch] * len(lengths)

    @property
    def steps_per_epoch(self) -> int:
        return sum(-(-b.num_examples // r) for b, r in zip(self.buckets, self.rows_per_batch))

    def epoch_plan(self, epoch: int) -> list[PlannedBatch]:
        """Every batch of ``epoch`` in order; a pure function of (seed, epoch, bucket sizes)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        seed, shuffle = self.config.seed, self.config.shuffle
        plan = []
        for b, (bucket, rows) in enumerate(zip(self.buckets, self.rows_per_batch)):
            n = bucket.num_examples
            order = _seed(seed, epoch, b).permutation(n) if shuffle else np.arange(n)
            padded = np.full(-(-n // rows) * rows, -1, np.int64)
            padded[:n] = order
            plan += [PlannedBatch(b, tuple(int(i) for i in chunk)) for chunk in padded.reshape(-1, rows)]
        if shuffle:
            plan = [plan[i] for i in _seed(seed, epoch, len(self.buckets), 0x0DE7).permutation(len(plan))]
        self._plan_cache = (epoch, plan)
        return plan

    def local_rows(self, batch: PlannedBatch) -> tuple[int, ...]:
        """This process's contiguous share of a planned batch's rows."""
        share = len(batch.rows) // self.process_count
        return batch.rows[self.process_index * share:(self.process_index + 1) * share]

    # --- reading ----------------------------------------------------------------------------------
    def _read(self, bucket_index: int, indices: list[int]) -> list[dict]:
        """Read and check examples (one batched read where the source supports it)."""
        bucket = self.buckets[bucket_index]
        source = bucket.source
        if not indices:
            return []
        records = source.__getitems__(indices) if hasattr(source, "__getitems__") else [source[i] for i in indices]
        for i, ex in zip(indices, records):
            ids, mask = np.asarray(ex["input_ids"]), np.asarray(ex["loss_mask"])
            where = f"bucket {bucket.max_len} example #{i} (id {ex.get('id')!r})"
            if ids.ndim != 1 or mask.shape != ids.shape:
                raise ValueError(f"{where}: input_ids {ids.shape} and loss_mask {mask.shape} must be equal 1-D")
            if not 0 < len(ids) <= bucket.max_len:
                raise ValueError(f"{where}: length {len(ids)} does not fit the bucket (1..{bucket.max_len})")
        return records

    def materialize(self, batch: PlannedBatch) -> dict:
        """Read and pad this process's rows of one planned batch."""
        length = self.buckets[batch.bucket].max_len
        rows = self.local_rows(batch)
        out = {
            "input_ids": np.full((len(rows), length), PAD_ID, np.int32),
            "loss_mask": np.zeros((len(rows), length), bool),
            "segment_ids": np.zeros((len(rows), length), np.int32),
            "positions": np.zeros((len(rows), length), np.int32),
            "example_ids": np.full(len(rows), "", object),
            "bucket_len": length,
        }
        real = [r for r, i in enumerate(rows) if i >= 0]
        for r, ex in zip(real, self._read(batch.bucket, [rows[r] for r in real])):
            n = len(ex["input_ids"])
            out["input_ids"][r, :n] = ex["input_ids"]
            out["loss_mask"][r, :n] = ex["loss_mask"]
            out["segment_ids"][r, :n] = 1
            out["positions"][r, :n] = np.arange(n)
            out["example_ids"][r] = str(ex["id"])
        return out

    def _open_reader(self) -> Iterator[dict]:
        plan = self.epoch_plan(self._epoch)
        ds = grain.MapDataset.source(plan)[self._index:].map(self.materialize)
        if self.config.prefetch <= 0:
            return iter(ds)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=min(self.config.prefetch, 16),
                                                         prefetch_buffer_size=self.config.prefetch)))

    def _close_reader(self) -> None:
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()
        self._reader = None

    def __iter__(self) -> BucketedBatches:
        return self

    def __next__(self) -> dict:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        steps = len(self.epoch_plan(self._epoch))
        if steps == 0:
            raise ValueError("the data set has no examples")
        if self._reader is None:
            self._reader = self._open_reader()
        batch = next(self._reader)
        self._index += 1
        if self._index == steps:
            self._epoch, self._index = self._epoch + 1, 0
            self._close_reader()
        return batch

    # --- state ------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    def _fingerprint(self) -> dict:
        return {"seed": self.config.seed, "shuffle": self.config.shuffle,
                "buckets": [[b.max_len, b.num_examples, r] for b, r in zip(self.buckets, self.rows_per_batch)]}

    def get_state(self) -> dict:
        """JSON-serialisable position: the next batch is step ``index`` of epoch ``epoch``."""
        return {"version": _STATE_VERSION, "epoch": self._epoch, "index": self._index, **self._fingerprint(),
                **(self._identity or {})}

    def set_state(self, state: dict) -> None:
        """Continue exactly where ``get_state()`` was taken; the data (by content) and batching must be the same.
        A state without the shards' hash (saved before it was recorded) is compared by shape only."""
        saved = state.get("shards_sha256")
        if self._identity and saved and saved != self._identity["shards_sha256"]:
            now = self._identity
            raise ValueError(f"cannot resume on other data: the checkpoint was trained on the shards "
                             f"{state.get('shards')} (content sha256 {saved[:16]}...), not on {now['shards']} "
                             f"(sha256 {now['shards_sha256'][:16]}...); resume needs the same shards")
        expected = self._fingerprint()
        got = {k: state.get(k) for k in expected}
        if state.get("version") != _STATE_VERSION or got != expected:
            raise ValueError("cannot resume the data iterator: the checkpoint was taken with different data "
                             f"or batching ({got} in the checkpoint, {expected} now)")
        if not 0 <= int(state["index"]) < max(self.steps_per_epoch, 1) or int(state["epoch"]) < 0:
            raise ValueError(f"cannot resume the data iterator: position {state['epoch']}/{state['index']} "
                             f"is outside an epoch of {self.steps_per_epoch} steps")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        self._close_reader()

    def padding_stats(self) -> dict:
        """Real vs. padded tokens over one epoch (reads every example's length once)."""
        real = sum(len(b.source[i]["input_ids"]) for b in self.buckets for i in range(b.num_examples))
        slots = sum(-(-b.num_examples // r) * r * b.max_len for b, r in zip(self.buckets, self.rows_per_batch))
        return {"real_tokens": real, "padded_tokens": slots - real, "efficiency": real / slots if slots else 1.0}

    def summary(self) -> list[str]:
        """One line per bucket (length, examples, rows per batch, batches per epoch) for logs."""
        return [f"bucket {b.max_len:>6}: {b.num_examples:>6} examples, {r:>4} rows/batch, "
                f"{-(-b.num_examples // r):>5} batches/epoch" for b, r in zip(self.buckets, self.rows_per_batch)]
