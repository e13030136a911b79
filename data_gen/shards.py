"""Pre-tokenized, length-bucketed ArrayRecord shards with a checksummed manifest.

Layout of a shard directory:

    OUT/manifest.json
    OUT/bucket_<max_len:05d>/shard_<i:05d>.array_record

Each record is msgpack of {"id": str, "input_ids": int32 little-endian bytes, "loss_mask": uint8 bytes}.
Every example lands in the smallest bucket that holds it, so a trainer pads each batch only up to its
bucket's length. The manifest records the identity of the tokenizer that encoded the examples (name,
sha256, vocabulary size). `open_shards` refuses files whose sha256 or record count disagrees with the manifest,
and shards of another tokenizer than the one it is given: silently training on stale, corrupted or foreign
data is worse than stopping.

Shards are written to a local folder and read from a local folder or a `gs://` one: every read of the
manifest and the files goes through `etils.epath` (gs:// through gcsfs, `pip install 'etils[epath-gcs]'`,
part of the `tpu` extra), and the ArrayRecord reader (array_record >= 0.8.3) opens `gs://` objects itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import msgpack
import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath

from data_gen.records import read_jsonl
from data_gen.tokenizer import MISTRAL, ChatFormatError, Tokenizer, TokenizerIdentity, get_tokenizer

DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
MANIFEST = "manifest.json"
FORMAT = "needles-shards"
FORMAT_VERSION = 1
# group_size:1 keeps every record independently addressable: training reads in random order.
_WRITER_OPTIONS = "group_size:1"


class ShardError(ValueError):
    """Shards or their input that cannot be trusted; the message names the file (and line/record)."""


# "gs://bucket/x", and "gs:/bucket/x", what pathlib.Path makes of it.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(/{1,2})")
_READ_SCHEMES = ("gs",)


def _url_scheme(path: str | os.PathLike) -> tuple[str, bool] | None:
    """(scheme, whether the path lost a slash) for a URL like gs://bucket/x; None for a local path."""
    match = _URL.match(os.fspath(path))
    return (match.group(1).lower(), match.group(2) == "/") if match else None


def _remote_hint(root: str | os.PathLike) -> str:
    if not _url_scheme(root):
        return ""
    return ("; for gs:// check the credentials (`gcloud auth application-default login`, or the TPU VM's service "
            "account needs read access to the bucket), or copy the shards to a local folder and pass that")


@dataclasses.dataclass
class TokenizedExample:
    """One training sequence: `input_ids` int32 [n], `loss_mask` bool [n] (True where the loss applies)."""

    id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray


# ---------------------------------------------------------------------------------------------- records


def encode_record(example: TokenizedExample) -> bytes:
    return msgpack.packb(
        {
            "id": example.id,
            "input_ids": np.asarray(example.input_ids).astype("<i4", copy=False).tobytes(),
            "loss_mask": np.asarray(example.loss_mask).astype(np.uint8, copy=False).tobytes(),
        },
        use_bin_type=True,
    )


def decode_record(data: bytes) -> dict:
    rec = msgpack.unpackb(data, raw=False)
    ids = np.frombuffer(rec["input_ids"], dtype="<i4").astype(np.int32, copy=False)
    mask = np.frombuffer(rec["loss_mask"], dtype=np.uint8).astype(bool)
    if ids.shape != mask.shape:
        raise ValueError(f"input_ids has {ids.size} tokens but loss_mask has {mask.size}")
    return {"id": rec["id"], "input_ids": ids, "loss_mask": mask}


# ---------------------------------------------------------------------------------------------- writing


def _sha256(path: pathlib.Path | epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_example(ex: TokenizedExample, vocab_size: int) -> TokenizedExample:
    ids, mask = np.asarray(ex.input_ids), np.asarray(ex.loss_mask)
    where = f"example {ex.id!r}"
    if not isinstance(ex.id, str) or not ex.id:
        raise ShardError(f"{where}: id must be a non-empty string")
    if ids.ndim != 1 or mask.shape != ids.shape:
        raise ShardError(f"{where}: input_ids {ids.shape} and loss_mask {mask.shape} must be 1-D of equal length")
    if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ShardError(f"{where}: input_ids must be a non-empty integer array, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ShardError(f"{where}: token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    if not mask.any():
        raise ShardError(f"{where}: loss_mask is all False, so the example teaches nothing")
    return TokenizedExample(ex.id, ids.astype(np.int32), mask.astype(bool))


def _truncate_left(ex: TokenizedExample, max_len: int, start: Sequence[int]) -> TokenizedExample | None:
    """Drop prompt tokens from the left so the example fits, keeping the tokens every sequence starts with
    (`start`, e.g. BOS) when it does; None if even the final assistant answer does not fit."""
    mask = ex.loss_mask
    not_loss = np.flatnonzero(~mask)
    answer_start = int(not_loss[-1]) + 1 if not_loss.size else 0
    keep = len(start) if ex.input_ids[:len(start)].tolist() == list(start) else 0
    if ex.input_ids.size - answer_start + keep > max_len:
        return None
    tail = slice(ex.input_ids.size - (max_len - keep), None)
    head = slice(0, keep)
    return TokenizedExample(
        ex.id,
        np.concatenate([ex.input_ids[head], ex.input_ids[tail]]),
        np.concatenate([mask[head], mask[tail]]),
    )


def padding_report(lengths: Sequence[int], buckets: Sequence[int]) -> dict:
    """Real tokens / padded tokens when every example is padded to its bucket, versus to the longest one."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return {"real_tokens": 0, "bucketed_tokens": 0, "bucketed_efficiency": None,
                "longest": 0, "pad_to_longest_tokens": 0, "pad_to_longest_efficiency": None}
    bounds = np.asarray(sorted(buckets), dtype=np.int64)
    padded = bounds[np.searchsorted(bounds, lengths, side="left")]
    real, longest = int(lengths.sum()), int(lengths.max())
    return {
        "real_tokens": real,
        "bucketed_tokens": int(padded.sum()),
        "bucketed_efficiency": real / int(padded.sum()),
        "longest": longest,
        "pad_to_longest_tokens": longest * int(lengths.size),
        "pad_to_longest_efficiency": real / (longest * int(lengths.size)),
    }


def format_padding_report(manifest: dict) -> str:
    p = manifest["padding"]
    if p["bucketed_efficiency"] is None:
        return "padding efficiency: no examples"
    return (
        f"padding efficiency: {p['bucketed_efficiency']:.1%} with buckets "
        f"({p['real_tokens']} real / {p['bucketed_tokens']} padded tokens) vs "
        f"{p['pad_to_longest_efficiency']:.1%} padding all to the longest example "
        f"({p['longest']} tokens: {p['pad_to_longest_tokens']} padded tokens)"
    )


class _BucketWriter:
    """Streams one bucket's records into shard files of `records_per_shard` records each."""

    def __init__(self, out: pathlib.Path, max_len: int, records_per_shard: int):
        self.out, self.max_len, self.records_per_shard = out, max_len, records_per_shard
        self.dir = out / f"bucket_{max_len:05d}"
        self.shards: list[dict] = []
        self.num_examples = self.num_tokens = self.num_loss_tokens = 0
        self._writer: ArrayRecordWriter | None = None
        self._count = 0

    def add(self, ex: TokenizedExample) -> None:
        if self._writer is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._path = self.dir / f"shard_{len(self.shards):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self._path), _WRITER_OPTIONS)
        self._writer.write(encode_record(ex))
        self._count += 1
        self.num_examples += 1
        self.num_tokens += int(ex.input_ids.size)
        self.num_loss_tokens += int(ex.loss_mask.sum())
        if self._count == self.records_per_shard:
            self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.shards.append({"file": self._path.relative_to(self.out).as_posix(), "num_records": self._count,
                            "sha256": _sha256(self._path)})
        self._writer, self._count = None, 0

    def manifest_entry(self) -> dict:
        return {"max_len": self.max_len, "num_examples": self.num_examples, "num_tokens": self.num_tokens,
                "num_loss_tokens": self.num_loss_tokens, "padded_tokens": self.num_examples * self.max_len,
                "shards": self.shards}


def write_shards(
    examples: Iterable[TokenizedExample],
    out_dir: str | os.PathLike,
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    overflow: Literal["reject", "truncate"] = "reject",
    records_per_shard: int = 1000,
    metadata: dict | None = None,
    progress: bool = True,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """Write `examples` (in order, streamed) into length buckets under `out_dir`; returns the manifest.

    `tokenizer` (default Mistral's) is the one that encoded the examples: their ids are checked against its
    vocabulary and its identity goes into the manifest. Examples longer than the largest bucket are rejected
    (default) or, with overflow="truncate", lose prompt tokens from the left (the tokenizer's start tokens,
    e.g. BOS, kept) down to the largest bucket; either way they are listed in the manifest.
    `metadata` (e.g. the generator config and seed) is stored verbatim in the manifest.
    """
    bounds = sorted({int(b) for b in buckets})
    if not bounds or bounds[0] < 2:
        raise ShardError(f"buckets must be a non-empty list of lengths >= 2, got {list(buckets)}")
    if overflow not in ("reject", "truncate"):
        raise ShardError(f"overflow must be 'reject' or 'truncate', got {overflow!r}")
    if records_per_shard < 1:
        raise ShardError(f"records_per_shard must be >= 1, got {records_per_shard}")
    if scheme := _url_scheme(out_dir):
        raise ShardError(f"{os.fspath(out_dir)}: shards are written to a local folder (the ArrayRecord writer "
                         f"writes local files only); write them here, then copy the folder: "
                         f"gcloud storage cp -r DIR {scheme[0]}://BUCKET/PATH (training reads gs:// shards)")
    out = pathlib.Path(out_dir)
    if (out / MANIFEST).exists() or any(out.glob("bucket_*")):
        raise ShardError(f"{out} already holds shards; choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = get_tokenizer(tokenizer)
    start = tokenizer.encode_text("")  # what the tokenizer puts before any text (BOS or nothing)
    writers = {b: _BucketWriter(out, b, records_per_shard) for b in bounds}
    lengths, rejected, truncated, seen = [], [], [], set()
    for ex in tqdm.tqdm(examples, desc=f"writing shards to {out}", unit="ex", disable=not progress):
        ex = _check_example(ex, tokenizer.vocab_size)
        if ex.id in seen:
            raise ShardError(f"example id {ex.id!r} occurs twice; ids must be unique")
        seen.add(ex.id)
        n = int(ex.input_ids.size)
        if n > bounds[-1]:
            cut = _truncate_left(ex, bounds[-1], start) if overflow == "truncate" else None
            if cut is None:
                rejected.append({"id": ex.id, "num_tokens": n})
                continue
            truncated.append({"id": ex.id, "num_tokens": n})
            ex, n = cut, bounds[-1]
        writers[bounds[int(np.searchsorted(bounds, n))]].add(ex)
        lengths.append(n)
    for w in writers.values():
        w.close()

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "record_format": {"encoding": "msgpack", "input_ids": "int32 little-endian bytes",
                          "loss_mask": "uint8 bytes (1 = loss on this token)"},
        "tokenizer": tokenizer.identity().to_json(),
        "metadata": metadata or {},
        "bucket_boundaries": bounds,
        "overflow": overflow,
        "num_examples": len(lengths),
        "num_tokens": int(sum(lengths)),
        "num_rejected": len(rejected),
        "rejected": rejected,
        "num_truncated": len(truncated),
        "truncated": truncated,
        "padding": padding_report(lengths, bounds),
        "buckets": [w.manifest_entry() for w in writers.values() if w.num_examples],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------- JSONL input


def examples_from_jsonl(path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Iterator[TokenizedExample]:
    """Tokenize a chat JSONL file: one `{"messages": [...], "meta": {...}}` object a line, in the chat format of
    `tokenizer` (default Mistral's) with its answer-only loss mask.

    The example id is `meta["id"]` when present, else `<file name>:<line>`. Any malformed line raises a
    `ShardError` naming the file and line number (never silently skipped).
    """
    path = pathlib.Path(path)
    tokenizer = get_tokenizer(tokenizer)
    for lineno, obj in read_jsonl(path, ShardError):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict) or "messages" not in obj:
            raise ShardError(f"{where}: expected an object with a 'messages' list (and optional 'meta')")
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise ShardError(f"{where}: 'meta' must be an object, got {type(meta).__name__}")
        ex_id = meta.get("id", f"{path.name}:{lineno}")
        if not isinstance(ex_id, str) or not ex_id:
            raise ShardError(f"{where}: meta.id must be a non-empty string, got {ex_id!r}")
        try:
            enc = tokenizer.encode_chat(obj["messages"])
        except ChatFormatError as e:
            raise ShardError(f"{where}: {e}") from None
        yield TokenizedExample(ex_id, enc.input_ids, enc.loss_mask)


# ---------------------------------------------------------------------------------------------- reading


class ShardSource:
    """A grain `RandomAccessDataSource` (len/getitem, picklable for worker processes) over one bucket's files:
    item i is {"id": str, "input_ids": int32[n], "loss_mask": bool[n]}."""

    def __init__(self, root: epath.Path, shards: list[dict], max_len: int):
        self._files = [root / s["file"] for s in shards]
        self._ends = np.cumsum([s["num_records"] for s in shards])
        self._max_len = max_len
        from grain.sources import ArrayRecordDataSource  # imported here: grain takes seconds to import

        try:
            self._source = ArrayRecordDataSource([str(f) for f in self._files])
        except Exception as e:  # noqa: BLE001 - the C++ reader reports corruption as various errors
            raise ShardError(f"{root}: cannot open the shard files of bucket {max_len} ({e}); "
                             f"open_shards(verify=True) names the bad file{_remote_hint(root)}") from e

    def __len__(self) -> int:
        return len(self._source)

    def _where(self, index: int) -> str:
        shard = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[shard - 1]) if shard else 0
        return f"{self._files[shard]}: record {index - start}"

    def _decode(self, index: int, data: bytes) -> dict:
        try:
            rec = decode_record(data)
            if rec["input_ids"].size > self._max_len:
                raise ValueError(f"{rec['input_ids'].size} tokens exceed the bucket length {self._max_len}")
        except Exception as e:  # noqa: BLE001 - any decoding failure means a bad file
            raise ShardError(f"{self._where(index)} is unreadable: {e}") from e
        return rec

    def _read(self, read, index):
        try:
            return read()
        except Exception as e:  # noqa: BLE001
            raise ShardError(f"{self._where(index)} cannot be read: {e}") from e

    def __getitem__(self, index) -> dict:
        index = int(index)
        return self._decode(index, self._read(lambda: self._source[index], index))

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [int(i) for i in indices]
        data = self._read(lambda: self._source.__getitems__(indices), indices[0] if indices else 0)
        return [self._decode(i, d) for i, d in zip(indices, data, strict=True)]

    def __repr__(self) -> str:
        return f"ShardSource({self._files[0].parent}, {len(self._files)} files, {len(self)} records)"


@dataclasses.dataclass
class Bucket:
    max_len: int
    num_examples: int
    source: ShardSource


@dataclasses.dataclass
class ShardSet:
    path: epath.Path
    manifest: dict
    buckets: list[Bucket]


def content_sha256(manifest: dict) -> str:
    """sha256 of what a shard set holds: every bucket's length and its files' names, record counts and sha256s
    as the manifest lists them (the same examples written again give the same hash; other tokens do not)."""
    content = [[b["max_len"], [[s["file"], s["num_records"], s["sha256"]] for s in b["shards"]]]
               for b in manifest["buckets"]]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _read_manifest(root: epath.Path, tokenizer: TokenizerIdentity | None) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {root} is not a shard directory (create one with `python -m data_gen shards`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    try:
        used = TokenizerIdentity.from_json(manifest.get("tokenizer"))
    except ValueError as e:
        raise ShardError(f"{path}: {e}") from None
    # The name of the built-in tokenizer vouches for its hash even when no tokenizer is given to compare with.
    expected = tokenizer or (get_tokenizer(MISTRAL).identity() if used.name == MISTRAL else used)
    if used.sha256 != expected.sha256:
        raise ShardError(f"{path}: shards were tokenized with a tokenizer of sha256 {used.sha256} (name {used.name!r}), "
                         f"but the tokenizer {expected.name!r} has sha256 {expected.sha256}; re-run "
                         f"`python -m data_gen shards --tokenizer ...` with the model's tokenizer")
    return manifest


def _verify_bucket(root: epath.Path, bucket: dict) -> None:
    listed = {s["file"] for s in bucket["shards"]}
    folder = f"bucket_{bucket['max_len']:05d}"
    on_disk = {f"{folder}/{p.name}" for p in (root / folder).glob("*.array_record")}
    if extra := sorted(on_disk - listed):
        raise ShardError(f"{root / extra[0]}: shard file not listed in {root / MANIFEST}")
    if sum(s["num_records"] for s in bucket["shards"]) != bucket["num_examples"]:
        raise ShardError(f"{root / MANIFEST}: bucket {bucket['max_len']} record counts do not add up to num_examples")
    for shard in tqdm.tqdm(bucket["shards"], desc=f"verifying bucket {bucket['max_len']}", unit="file",
                           disable=len(bucket["shards"]) < 20):
        path = root / shard["file"]
        digest = _sha256(path)
        if digest != shard["sha256"]:
            raise ShardError(f"{path}: sha256 {digest} does not match the manifest's {shard['sha256']} "
                             "(file corrupted or replaced); regenerate the shards")
        try:
            reader = ArrayRecordReader(str(path))
        except Exception as e:  # noqa: BLE001 - the C++ reader reports a bad or unreachable file as various errors
            raise ShardError(f"{path}: the ArrayRecord reader cannot open it ({e}){_remote_hint(root)}") from e
        try:
            count = reader.num_records()
        finally:
            reader.close()
        if count != shard["num_records"]:
            raise ShardError(f"{path}: holds {count} records but the manifest says {shard['num_records']}")


def shard_root(path: str | os.PathLike) -> epath.Path:
    """The shard folder `path` (local, or gs://bucket/...) as an `etils.epath.Path`; other URLs, and a gs://
    URL that went through pathlib.Path (which turns it into gs:/bucket/...), are refused naming the path."""
    text = os.fspath(path)
    if scheme := _url_scheme(text):
        name, lost_slash = scheme
        if lost_slash:
            raise ShardError(f"{text}: a URL that lost a slash (pathlib.Path turns {name}://bucket/x into "
                             f"{name}:/bucket/x); pass {name}://... as a string or an etils.epath.Path")
        if name not in _READ_SCHEMES:
            raise ShardError(f"{text}: shards are read from a local folder or gs:// only (the ArrayRecord reader "
                             "opens local files and gs:// objects); copy them to a local folder first")
    return epath.Path(text)


def open_shards(path: str | os.PathLike, *, verify: bool = True,
                tokenizer: Tokenizer | TokenizerIdentity | None = None) -> ShardSet:
    """Open a shard directory, a local folder or gs://bucket/path. With verify=True (default) every file's
    sha256 and record count is checked against the manifest first (reads every byte once); any mismatch
    raises `ShardError` naming the file. Given a `tokenizer` (the model's, or its identity), shards tokenized
    with another one (a different sha256) are refused naming both; None does not compare tokenizers."""
    root = shard_root(path)
    if isinstance(tokenizer, Tokenizer):
        tokenizer = tokenizer.identity()
    try:
        manifest = _read_manifest(root, tokenizer)
    except ShardError:
        raise
    except Exception as e:  # noqa: BLE001 - GCS reports a missing backend, credentials or access in many ways
        if not _url_scheme(root):
            raise
        if isinstance(e, ImportError):  # epath reads gs:// through gcsfs (or TensorFlow's gfile)
            raise ShardError(f"{root}: reading gs:// needs gcsfs ({e}): pip install 'etils[epath-gcs]' (part of "
                             f"the project's tpu extra), or copy the shards to a local folder (gcloud storage cp "
                             f"-r {root} DIR) and pass that") from e
        raise ShardError(f"{root}: cannot read {MANIFEST} ({type(e).__name__}: {e}){_remote_hint(root)}") from e
    buckets = []
    for b in manifest["buckets"]:
        for shard in b["shards"]:
            if not (root / shard["file"]).is_file():
                raise ShardError(f"{root / shard['file']}: listed in {root / MANIFEST} but missing")
        if verify:
            _verify_bucket(root, b)
        buckets.append(Bucket(b["max_len"], b["num_examples"], ShardSource(root, b["shards"], b["max_len"])))
    return ShardSet(root, manifest, buckets)
