"""Shards: bucketing and efficiency figures on a hand-made set, read-back through grain, checksum and manifest
verification, JSONL error reporting, and shards read from a gs:// bucket."""

import hashlib
import json
import os
import pathlib
import pickle

import grain
import numpy as np
import pytest

from data_gen.__main__ import main
from data_gen.chat import encode_chat
from data_gen.shards import ShardError, TokenizedExample, examples_from_jsonl, open_shards, write_shards
from data_gen.tokenizer import BOS_ID, EOS_ID

BUCKETS = (4, 8, 16)


def _example(i: int, n: int, answer: int = 2) -> TokenizedExample:
    """BOS, prompt tokens 100 + k, then `answer` loss tokens ending with EOS."""
    ids = [BOS_ID] + [100 + k for k in range(n - 1 - answer)] + [500 + k for k in range(answer - 1)] + [EOS_ID]
    return TokenizedExample(f"ex{i}", np.array(ids, np.int32), np.arange(n) >= n - answer)


LENGTHS = [3, 5, 8, 9, 16, 17, 40]


@pytest.fixture
def hand_made():
    return [_example(i, n) for i, n in enumerate(LENGTHS)]


def test_buckets_and_efficiency_by_hand(tmp_path, hand_made):
    manifest = write_shards(hand_made, tmp_path / "s", buckets=BUCKETS, metadata={"note": "hand"}, progress=False)
    # 3 -> 4; 5, 8 -> 8; 9, 16 -> 16; 17 and 40 are longer than 16: rejected
    assert [(b["max_len"], b["num_examples"], b["num_tokens"], b["num_loss_tokens"]) for b in manifest["buckets"]] == \
        [(4, 1, 3, 2), (8, 2, 13, 4), (16, 2, 25, 4)]
    assert manifest["num_rejected"] == 2
    assert manifest["rejected"] == [{"id": "ex5", "num_tokens": 17}, {"id": "ex6", "num_tokens": 40}]
    real = 3 + 5 + 8 + 9 + 16
    assert manifest["padding"] == {"real_tokens": real, "bucketed_tokens": 4 + 8 + 8 + 16 + 16,
                                   "bucketed_efficiency": real / 52, "longest": 16,
                                   "pad_to_longest_tokens": 5 * 16, "pad_to_longest_efficiency": real / 80}
    assert manifest["metadata"] == {"note": "hand"}
    assert json.loads((tmp_path / "s" / "manifest.json").read_text()) == manifest

    shards = open_shards(tmp_path / "s")
    by_id = {ex.id: ex for ex in hand_made}
    assert [b.max_len for b in shards.buckets] == [4, 8, 16]
    for bucket in shards.buckets:
        assert len(bucket.source) == bucket.num_examples
        for i in range(len(bucket.source)):
            rec = bucket.source[i]
            want = by_id[rec["id"]]
            assert rec["input_ids"].dtype == np.int32 and rec["loss_mask"].dtype == bool
            np.testing.assert_array_equal(rec["input_ids"], want.input_ids)
            np.testing.assert_array_equal(rec["loss_mask"], want.loss_mask)
            assert len(rec["input_ids"]) <= bucket.max_len


def test_truncate_from_the_left(tmp_path, hand_made):
    manifest = write_shards(hand_made, tmp_path, buckets=BUCKETS, overflow="truncate", progress=False)
    assert manifest["num_rejected"] == 0 and [t["id"] for t in manifest["truncated"]] == ["ex5", "ex6"]
    big = open_shards(tmp_path).buckets[-1].source
    records = {big[i]["id"]: big[i] for i in range(len(big))}
    rec = records["ex6"]  # 40 tokens: BOS, 100..136, 500, EOS -> BOS + the last 15 tokens
    assert rec["input_ids"].tolist() == [BOS_ID, *range(124, 137), 500, EOS_ID]
    assert rec["loss_mask"].tolist() == [False] * 14 + [True, True]


def test_answer_longer_than_largest_bucket_is_rejected_even_when_truncating(tmp_path):
    manifest = write_shards([_example(0, 12, answer=10)], tmp_path, buckets=(4, 8), overflow="truncate",
                            progress=False)
    assert manifest["num_examples"] == 0 and manifest["rejected"] == [{"id": "ex0", "num_tokens": 12}]


def test_many_files_checksums_and_grain(tmp_path):
    examples = [_example(i, 5 + i % 3) for i in range(10)]
    manifest = write_shards(examples, tmp_path, buckets=BUCKETS, records_per_shard=3, progress=False)
    (bucket,) = manifest["buckets"]
    assert [s["num_records"] for s in bucket["shards"]] == [3, 3, 3, 1]
    assert [s["file"] for s in bucket["shards"]] == [f"bucket_00008/shard_{i:05d}.array_record" for i in range(4)]
    for s in bucket["shards"]:
        assert s["sha256"] == hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest()
    source = open_shards(tmp_path).buckets[0].source
    assert [source[i]["id"] for i in range(10)] == [f"ex{i}" for i in range(10)]  # order kept across files
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    dataset = grain.MapDataset.source(source).shuffle(seed=0)
    assert sorted(dataset[i]["id"] for i in range(len(dataset))) == sorted(f"ex{i}" for i in range(10))
    assert pickle.loads(pickle.dumps(source))[9]["id"] == "ex9"  # grain worker processes pickle sources
    again = write_shards(examples, tmp_path / "again", buckets=BUCKETS, records_per_shard=3, progress=False)
    assert [s["sha256"] for s in again["buckets"][0]["shards"]] == [s["sha256"] for s in bucket["shards"]]


def test_corrupted_shard_is_a_clear_error(tmp_path):
    write_shards([_example(i, 6) for i in range(5)], tmp_path, buckets=BUCKETS, records_per_shard=2, progress=False)
    victim = tmp_path / "bucket_00008" / "shard_00001.array_record"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard_00001\.array_record: sha256 .* does not match"):
        open_shards(tmp_path)
    victim.unlink()
    with pytest.raises(ShardError, match=r"shard_00001\.array_record: listed in .* but missing"):
        open_shards(tmp_path, verify=False)


def test_manifest_disagreement_is_a_clear_error(tmp_path):
    write_shards([_example(i, 6) for i in range(5)], tmp_path, buckets=BUCKETS, records_per_shard=2, progress=False)
    path = tmp_path / "manifest.json"
    good = json.loads(path.read_text())

    bad = json.loads(path.read_text())
    bad["buckets"][0]["shards"][0]["num_records"] = 3
    bad["buckets"][0]["shards"][1]["num_records"] = 1
    path.write_text(json.dumps(bad))
    with pytest.raises(ShardError, match=r"shard_00000\.array_record: holds 2 records but the manifest says 3"):
        open_shards(tmp_path)

    bad = json.loads(json.dumps(good))
    bad["tokenizer"]["sha256"] = "0" * 64
    path.write_text(json.dumps(bad))
    with pytest.raises(ShardError, match="tokenizer of sha256 0000"):
        open_shards(tmp_path)

    path.write_text(json.dumps(good))
    (tmp_path / "bucket_00008" / "shard_00099.array_record").write_bytes(b"stray")
    with pytest.raises(ShardError, match=r"shard_00099\.array_record: shard file not listed"):
        open_shards(tmp_path)
    with pytest.raises(ShardError, match="already holds shards"):
        write_shards([_example(0, 6)], tmp_path, progress=False)


def test_bad_examples_are_refused(tmp_path):
    with pytest.raises(ShardError, match="'ex1' occurs twice"):
        write_shards([_example(1, 5), _example(1, 6)], tmp_path / "a", buckets=BUCKETS, progress=False)
    no_loss = TokenizedExample("x", np.array([1, 2, 3]), np.zeros(3, bool))
    with pytest.raises(ShardError, match="'x': loss_mask is all False"):
        write_shards([no_loss], tmp_path / "b", progress=False)
    out_of_vocab = TokenizedExample("y", np.array([1, 32000]), np.ones(2, bool))
    with pytest.raises(ShardError, match=r"'y': token ids must lie in \[0, 32000\)"):
        write_shards([out_of_vocab], tmp_path / "c", progress=False)


def _chat(i):
    return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
            "meta": {"id": f"q{i}"}}


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(_chat(0)), "", json.dumps(_chat(1)), '{"messages": [1, 2', json.dumps(_chat(3))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=rf"{path}:4: not valid JSON"):
        list(examples_from_jsonl(path))
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=rf"{path}:4: messages\[1\]\.role must be 'assistant'"):
        list(examples_from_jsonl(path))
    lines[3] = json.dumps({"meta": {}})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=rf"error: {path}:4: expected an object with a 'messages' list"):
        main(["shards", "--input", str(path), "--out", str(tmp_path / "out"), "--no-progress"])


def test_shards_command_on_chat_jsonl(tmp_path, capsys):
    data = tmp_path / "gen" / "train.jsonl"
    data.parent.mkdir()
    records = [_chat(i) for i in range(6)] + [{"messages": [{"role": "user", "content": "long " * 300},
                                                             {"role": "assistant", "content": "x"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (data.parent / "generation.json").write_text(json.dumps({"seed": 3}))
    main(["shards", "--input", str(data), "--out", str(tmp_path / "s"), "--buckets", "16", "32", "--no-progress"])
    printed = capsys.readouterr().out
    assert "rejected 1 examples longer than 32 tokens (e.g. train.jsonl:7)" in printed
    assert "padding efficiency" in printed
    shards = open_shards(tmp_path / "s")
    inputs = shards.manifest["metadata"]["inputs"]
    assert inputs[0]["generation"] == {"seed": 3} and inputs[0]["num_lines"] == 7
    assert inputs[0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    got = {b.source[i]["id"]: b.source[i] for b in shards.buckets for i in range(len(b.source))}
    assert sorted(got) == [f"q{i}" for i in range(6)]
    want = encode_chat(_chat(2)["messages"])
    np.testing.assert_array_equal(got["q2"]["input_ids"], want.input_ids)
    np.testing.assert_array_equal(got["q2"]["loss_mask"], want.loss_mask)


# ---------------------------------------------------------------- shards in a gs:// bucket

BUCKET_URL = "gs://fake-bucket"


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
    """gs://fake-bucket/... served from a local folder, offline: etils.epath's test mock answers the Python
    side (manifest, checksums, listing), and the native ArrayRecord reader, which opens gs:// objects itself
    (array_record >= 0.8.3), is wrapped to map the URL the same way. Yields the folder and the paths the
    native reader was given."""
    from array_record.python import array_record_module
    from etils.epath import testing as epath_testing

    import data_gen.shards

    folder = tmp_path / "bucket"
    folder.mkdir()

    def to_local(path) -> str:
        text = os.fspath(path)
        return str(folder) + text[len(BUCKET_URL):] if text.startswith(BUCKET_URL + "/") else text

    def mapped(original, path, *args, **kwargs):
        return original(to_local(path), *args, **kwargs)

    def glob(original, pattern):
        found = original(to_local(pattern))
        if not os.fspath(pattern).startswith(BUCKET_URL):
            return found
        return [BUCKET_URL + os.fspath(p)[len(str(folder)):] for p in found]

    opened = []
    native = array_record_module.ArrayRecordReader

    def reader(path, *args, **kwargs):
        opened.append(path)
        return native(to_local(path), *args, **kwargs)

    monkeypatch.setattr(array_record_module, "ArrayRecordReader", reader)
    monkeypatch.setattr(data_gen.shards, "ArrayRecordReader", reader)
    with epath_testing.mock_epath(open=mapped, exists=mapped, isdir=mapped, glob=glob, stat=mapped):
        yield folder, opened


def test_shards_in_a_gs_bucket_read_like_local_ones(fake_bucket):
    """--data gs://bucket/shards: the manifest and checksums are read through etils.epath, the record files by
    the ArrayRecord reader given the gs:// URL intact, and training batches equal those of a local copy."""
    from jaxtrain.batches import BatchConfig, BucketedBatches

    folder, opened = fake_bucket
    write_shards([_example(i, 5 + i % 9) for i in range(12)], folder / "shards", buckets=BUCKETS,
                 records_per_shard=3, progress=False)
    url = f"{BUCKET_URL}/shards"
    remote = open_shards(url)
    files = [f"{url}/{s['file']}" for b in remote.manifest["buckets"] for s in b["shards"]]
    assert sorted(set(opened)) == sorted(files)  # every record file, opened by its gs:// URL
    local = open_shards(folder / "shards")
    assert str(remote.path) == url and remote.manifest == local.manifest
    for r, l in zip(remote.buckets, local.buckets, strict=True):
        assert [r.source[i]["id"] for i in range(len(r.source))] == [l.source[i]["id"] for i in range(len(l.source))]
    assert repr(remote.buckets[0].source).startswith(f"ShardSource({url}/bucket_00008")

    config = BatchConfig(global_batch=4, seed=3, prefetch=0)
    got = list(BucketedBatches(url, config, process_index=0, process_count=1, num_epochs=1))
    want = list(BucketedBatches(local, config, process_index=0, process_count=1, num_epochs=1))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g["example_ids"].tolist() == w["example_ids"].tolist()
        np.testing.assert_array_equal(g["input_ids"], w["input_ids"])

    victim = folder / "shards" / remote.manifest["buckets"][0]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"{url}/bucket_00008/shard_00000\.array_record: sha256 .* does not match"):
        open_shards(url)


def test_gs_shards_that_cannot_be_read_are_a_clear_error(tmp_path):
    """What cannot work is named with the path and what to do, never a deep traceback: epath without its gs://
    backend (gcsfs), a bucket it may not read, a gs:// URL mangled by pathlib.Path, another kind of URL, and
    writing shards to a bucket (the ArrayRecord writer writes local files)."""
    from etils.epath import testing as epath_testing

    def no_gcsfs(original, path):
        raise ImportError("Install gcsfs to access Google Storage")

    def forbidden(original, path):
        raise PermissionError("403 caller does not have storage.objects.get access")

    url = f"{BUCKET_URL}/shards"
    with epath_testing.mock_epath(exists=no_gcsfs), pytest.raises(ShardError) as info:
        open_shards(url)
    assert str(info.value).startswith(f"{url}: reading gs:// needs gcsfs")
    assert "pip install 'etils[epath-gcs]'" in str(info.value) and f"gcloud storage cp -r {url} DIR" in str(info.value)
    with epath_testing.mock_epath(exists=forbidden), pytest.raises(ShardError) as info:
        open_shards(url)
    assert str(info.value).startswith(f"{url}: cannot read manifest.json (PermissionError: 403")
    assert "gcloud auth application-default login" in str(info.value)

    with pytest.raises(ShardError, match=r"gs:/fake-bucket/shards: a URL that lost a slash .* pass gs://\.\.\. as a"):
        open_shards(pathlib.Path(url))
    with pytest.raises(ShardError, match=r"s3://b/shards: shards are read from a local folder or gs:// only"):
        open_shards("s3://b/shards")
    with pytest.raises(ShardError, match=rf"{url}: shards are written to a local folder .* gcloud storage cp -r DIR"):
        write_shards([_example(0, 5)], url, progress=False)
    # the command line: tyro's pathlib.Path drops a slash, the refusal still says what to do
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(_chat(0)) + "\n")
    with pytest.raises(SystemExit, match=r"error: gs:/fake-bucket/shards: shards are written to a local folder"):
        main(["shards", "--input", str(data), "--out", url, "--no-progress"])
    assert not (pathlib.Path.cwd() / "gs:").exists()


def test_manifests_record_the_tokenizer_and_old_ones_still_open(tmp_path):
    """New manifests name the tokenizer (name, sha256 of mistral_common's file, vocabulary size); manifests
    written before other tokenizers existed ({"file", "sha256"}: Mistral's) open as Mistral's; a tokenizer
    given to open_shards must be the one the manifest names."""
    import importlib.resources

    from data_gen.tokenizer import TokenizerIdentity, get_tokenizer

    v1 = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    v1_sha256 = hashlib.sha256(v1.read_bytes()).hexdigest()
    write_shards([_example(i, 6) for i in range(3)], tmp_path, buckets=BUCKETS, progress=False)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["tokenizer"] == {"name": "mistral", "sha256": v1_sha256, "vocab_size": 32000}
    other = TokenizerIdentity("smollm2", "f" * 64, 49152)
    for entry in (manifest["tokenizer"], {"file": "tokenizer.model.v1", "sha256": v1_sha256}):
        path.write_text(json.dumps({**manifest, "tokenizer": entry}))
        assert open_shards(tmp_path).buckets[0].num_examples == 3
        assert open_shards(tmp_path, tokenizer=get_tokenizer("mistral")).buckets[0].num_examples == 3
        with pytest.raises(ShardError, match=rf"sha256 {v1_sha256} \(name 'mistral'\), but the tokenizer 'smollm2' "
                                             rf"has sha256 f{{64}}"):
            open_shards(tmp_path, tokenizer=other)
    path.write_text(json.dumps({**manifest, "tokenizer": {"file": "tokenizer.model.v1", "sha256": "0" * 64}}))
    with pytest.raises(ShardError, match="tokenizer of sha256 0{64} .* but the tokenizer 'mistral' has sha256"):
        open_shards(tmp_path)
    path.write_text(json.dumps({**manifest, "tokenizer": {"sha256": v1_sha256}}))
    with pytest.raises(ShardError, match=r"manifest\.json: tokenizer entry must have name, sha256 and vocab_size"):
        open_shards(tmp_path)


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(_chat(0)).encode() + b"\n" + json.dumps(_chat(1)).encode()[:-2] + b"\xff\"}\n")
    with pytest.raises(ShardError, match=rf"^{path}:2: not UTF-8 text \(byte 0xff at column \d+\)$"):
        list(examples_from_jsonl(path))
    with pytest.raises(SystemExit, match=rf"^error: {path}:2: not UTF-8 text"):
        main(["shards", "--input", str(path), "--out", str(tmp_path / "out"), "--no-progress"])


def test_whitespace_only_answers_are_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    blank = {"messages": [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": " \n\t"}]}
    path.write_text(json.dumps(_chat(0)) + "\n" + json.dumps(blank) + "\n")
    with pytest.raises(ShardError, match=rf"{path}:2: messages\[1\]\.content must be a non-empty string"):
        list(examples_from_jsonl(path))


def test_shards_command_that_writes_no_example_fails(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(3)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: .*no example was written: all 3 were longer than 4 tokens") as exit_:
        main(["shards", "--input", str(path), "--out", str(out), "--buckets", "4", "--no-progress"])
    assert exit_.value.code not in (0, None)
    assert not (out / "manifest.json").exists()  # the same --out can be used again
    main(["shards", "--input", str(path), "--out", str(out), "--buckets", "64", "--no-progress"])
    assert open_shards(out).manifest["num_examples"] == 3
