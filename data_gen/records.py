"""Chat JSONL, the one format every data_gen source writes and `python -m data_gen shards` reads: a line per
example, `{"messages": [{"role", "content"}, ...], "meta": {"id", "num_tokens", ...}}`.

Shared by the synthetic tasks (`generate`), the needle-in-a-haystack baseline (`niah`) and the readers of other
training sets (`convert`), so that their files are written alike (reproducible bytes, the same token statistics
in generation.json) and their inputs are read alike (a bad line is named by file and line).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pathlib
import statistics
from collections.abc import Iterable, Iterator

GENERATION = "generation.json"


def dumps_record(record: dict) -> str:
    """One JSONL line; fixed separators and insertion-ordered keys keep the bytes reproducible."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in blocks (inputs can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_split(out_dir: str | os.PathLike, split: str, records: Iterable[dict]) -> dict:
    """Write `records` to out_dir/<split>.jsonl; returns its entry of generation.json's "splits": file, number
    of examples and the min / max / mean of their meta `num_tokens`."""
    tokens = []
    with open(pathlib.Path(out_dir) / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            tokens.append(record["meta"]["num_tokens"])
            f.write(dumps_record(record) + "\n")
    return {"file": f"{split}.jsonl", "num_samples": len(tokens),
            "min_tokens": min(tokens, default=0), "max_tokens": max(tokens, default=0),
            "mean_tokens": round(statistics.fmean(tokens), 1) if tokens else 0}


def write_generation(out_dir: str | os.PathLike, info: dict) -> dict:
    """out_dir/generation.json: how the files beside it were made (shard manifests copy it)."""
    (pathlib.Path(out_dir) / GENERATION).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def existing_outputs(out_dir: str | os.PathLike, splits: Iterable[str]) -> list[pathlib.Path]:
    """The split files a command would overwrite."""
    return [p for p in (pathlib.Path(out_dir) / f"{s}.jsonl" for s in splits) if p.exists()]


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line of a .jsonl or .jsonl.gz file; a line that is not
    UTF-8 or not JSON raises `error` naming file and line (never skipped)."""
    path = pathlib.Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise error(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                                ) from None
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (OSError, EOFError) as e:  # a missing file, a truncated or non-gzip .gz
        raise error(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
