"""Bucketed, token-budgeted batches: coverage, no bucket mixing, determinism, exact resume, host shares."""

import dataclasses
import itertools

import numpy as np
import pytest

from jaxtrain.batches import BatchConfig, BucketedBatches


@dataclasses.dataclass
class HandBucket:
    max_len: int
    num_examples: int
    source: list


def hand_made_set(lengths_by_bucket: dict[int, list[int]]):
    """Buckets of in-memory examples; example ids encode (bucket, index) and tokens are recognisable."""
    buckets, examples = [], {}
    rng = np.random.default_rng(0)
    for max_len, lengths in lengths_by_bucket.items():
        source = []
        for i, n in enumerate(lengths):
            ex = {"id": f"b{max_len}-{i}", "input_ids": rng.integers(3, 1000, n).astype(np.int32),
                  "loss_mask": rng.random(n) < 0.5}
            source.append(ex)
            examples[ex["id"]] = ex
        buckets.append(HandBucket(max_len, len(source), source))
    return buckets, examples


LENGTHS = {8: [8, 3, 5, 8, 1, 2, 7], 16: [9, 16, 12, 10, 11], 32: [20, 32, 17]}


def run_epoch(batches: BucketedBatches):
    return [next(batches) for _ in range(batches.steps_per_epoch)]


def test_epoch_covers_every_example_once_and_never_mixes_buckets():
    buckets, examples = hand_made_set(LENGTHS)
    it = BucketedBatches(buckets, BatchConfig(tokens_per_batch=32, seed=1), process_index=0, process_count=1)
    assert it.rows_per_batch == [4, 2, 1]  # 32 tokens // bucket length
    assert it.steps_per_epoch == 2 + 3 + 3
    seen = []
    for batch in run_epoch(it):
        L, B = batch["bucket_len"], len(batch["example_ids"])
        assert B * L == 32 and batch["input_ids"].shape == (B, L)
        for r, ex_id in enumerate(batch["example_ids"]):
            seg, mask, ids, pos = (batch[k][r] for k in ("segment_ids", "loss_mask", "input_ids", "positions"))
            if ex_id == "":  # padding row: nothing real, nothing in the loss
                assert not seg.any() and not mask.any()
                continue
            assert ex_id.startswith(f"b{L}-"), "a batch mixed buckets"
            ex = examples[ex_id]
            n = len(ex["input_ids"])
            np.testing.assert_array_equal(ids[:n], ex["input_ids"])
            np.testing.assert_array_equal(mask[:n], ex["loss_mask"])
            np.testing.assert_array_equal(seg, np.r_[np.ones(n), np.zeros(L - n)])
            np.testing.assert_array_equal(pos[:n], np.arange(n))
            assert not mask[n:].any()
            seen.append(ex_id)
    assert sorted(seen) == sorted(examples)  # every example exactly once, none dropped
    assert it.epoch == 1


def test_same_seed_same_batches_other_epoch_or_seed_other_order():
    buckets, _ = hand_made_set(LENGTHS)

    def order(seed, epochs=2):
        it = BucketedBatches(buckets, BatchConfig(tokens_per_batch=32, seed=seed), process_index=0,
                             process_count=1, num_epochs=epochs)
        return [tuple(b["example_ids"]) for b in it]

    a, b = order(3), order(3)
    assert a == b and len(a) == 16
    assert a[:8] != a[8:]  # epoch 1 is reshuffled
    assert order(4) != a
    # buckets are interleaved, not consumed one after the other
    lengths = [int(ids[0].split("-")[0][1:]) for ids in a[:8]]
    assert lengths != sorted(lengths)


def test_state_restore_continues_exactly_across_epoch_boundary():
    buckets, _ = hand_made_set(LENGTHS)
    cfg = BatchConfig(tokens_per_batch=32, seed=7, prefetch=3)
    ref = BucketedBatches(buckets, cfg, process_index=0, process_count=1)
    expected = [next(ref) for _ in range(20)]
    for k in (0, 5, 8, 13):
        it = BucketedBatches(buckets, cfg, process_index=0, process_count=1)
        for _ in range(k):
            next(it)
        state = it.get_state()
        resumed = BucketedBatches(buckets, cfg, process_index=0, process_count=1)
        resumed.set_state(state)
        for want in expected[k:]:
            got = next(resumed)
            assert list(got["example_ids"]) == list(want["example_ids"])
            np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    other = BucketedBatches(buckets, BatchConfig(tokens_per_batch=64, seed=7), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="different data or batching"):
        other.set_state(state)


def test_padding_efficiency_on_hand_made_set():
    buckets, _ = hand_made_set({8: [8, 8, 4, 4, 4]})
    it = BucketedBatches(buckets, BatchConfig(tokens_per_batch=16), process_index=0, process_count=1)
    # 2 rows per batch, 3 batches (the last has one empty row): 48 slots hold 28 real tokens
    assert it.padding_stats() == {"real_tokens": 28, "padded_tokens": 20, "efficiency": 28 / 48}


def test_row_multiple_and_global_batch_mode():
    buckets, _ = hand_made_set(LENGTHS)
    it = BucketedBatches(buckets, BatchConfig(tokens_per_batch=64), row_multiple=4, process_index=0, process_count=1)
    assert it.rows_per_batch == [8, 4, 4]  # 64//32 = 2 rows is raised to the multiple
    fixed = BucketedBatches(buckets, BatchConfig(global_batch=4), process_index=0, process_count=1)
    assert fixed.rows_per_batch == [4, 4, 4]
    assert {b["input_ids"].shape for b in run_epoch(fixed)} == {(4, 8), (4, 16), (4, 32)}
    with pytest.raises(ValueError, match="not a multiple of 8"):
        BucketedBatches(buckets, BatchConfig(global_batch=12), row_multiple=8, process_index=0, process_count=1)


def test_each_process_reads_its_share_of_rows():
    buckets, _ = hand_made_set(LENGTHS)
    cfg = BatchConfig(global_batch=4, seed=2)
    whole = BucketedBatches(buckets, cfg, process_index=0, process_count=1)
    parts = [BucketedBatches(buckets, cfg, process_index=p, process_count=2) for p in range(2)]
    for w, p0, p1 in zip(run_epoch(whole), run_epoch(parts[0]), run_epoch(parts[1])):
        assert p0["input_ids"].shape[0] == 2
        for key in ("input_ids", "loss_mask", "segment_ids", "positions", "example_ids"):
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), w[key])
    with pytest.raises(ValueError, match="not a multiple of 2"):
        BucketedBatches(buckets, BatchConfig(global_batch=3), process_index=0, process_count=2)


def test_bad_example_is_named():
    buckets, _ = hand_made_set({8: [3, 4]})
    buckets[0].source[1]["input_ids"] = np.arange(9, dtype=np.int32)
    buckets[0].source[1]["loss_mask"] = np.ones(9, bool)
    it = BucketedBatches(buckets, BatchConfig(global_batch=2, shuffle=False), process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"bucket 8 example #1 \(id 'b8-1'\): length 9"):
        next(it)


def test_reads_array_record_shards(tmp_path):
    from data_gen.shards import TokenizedExample, write_shards

    rng = np.random.default_rng(1)
    lengths = [5, 30, 17, 64, 40, 100, 3, 128, 90, 12]
    examples = [TokenizedExample(f"ex{i}", rng.integers(3, 32000, n).astype(np.int32),
                                 np.r_[np.zeros(n - 2, bool), np.ones(2, bool)]) for i, n in enumerate(lengths)]
    write_shards(examples, tmp_path / "shards", buckets=(32, 64, 128), records_per_shard=2, progress=False)
    it = BucketedBatches(tmp_path / "shards", BatchConfig(tokens_per_batch=128, seed=0), process_index=0,
                         process_count=1, num_epochs=1)
    by_id = {e.id: e for e in examples}
    seen = []
    for batch in it:
        for r, ex_id in enumerate(batch["example_ids"]):
            if ex_id:
                ex = by_id[ex_id]
                assert len(ex.input_ids) <= batch["bucket_len"]
                np.testing.assert_array_equal(batch["input_ids"][r, :len(ex.input_ids)], ex.input_ids)
                np.testing.assert_array_equal(batch["loss_mask"][r, :len(ex.input_ids)], ex.loss_mask)
                seen.append(ex_id)
    assert sorted(seen) == sorted(by_id)
    assert list(itertools.islice(it, 1)) == []
