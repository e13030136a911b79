"""Reading the standard evaluation files: JSONL (optionally gzipped), CSV, with errors that name file and line.

Every reader in `eval` goes through these helpers so that a malformed line always fails the same way:
`DataError("path:line: what is wrong")`, never a KeyError deep inside a task or a silently skipped row.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input (a data file or a command-line option); the message starts with `file:line` (or the
    file, or the option) and names the field. The CLI prints it without a traceback."""


def open_text(path: Path) -> io.TextIOBase:
    """Text handle for `path`, transparently gunzipping `*.gz` (the MDQA release ships .jsonl.gz) and
    reading the single file inside a `*.zip` (FLenQA ships as FLenQA.zip)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    if path.suffix == ".zip":
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: not a zip archive ({e})") from None
        members = [m for m in archive.namelist() if not m.endswith("/") and not m.startswith("__MACOSX/")]
        if len(members) != 1:
            raise DataError(f"{path}: expected exactly one file in the archive, found {members}")
        return io.TextIOWrapper(archive.open(members[0]), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; a line that is not a JSON object raises."""
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
        except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
            raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None


def read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number of the row's start, fields) for every row of a CSV file (quoted newlines allowed)."""
    rows = []
    with open_text(path) as f:
        reader = csv.reader(f)
        try:
            lineno = 1
            for row in reader:
                if row:
                    rows.append((lineno, row))
                lineno = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return rows


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def get_str(obj: dict, field: str, where: str, *, allow_empty: bool = False) -> str:
    """`obj[field]` as a string; `where` is the "file:line" prefix of the error message."""
    if field not in obj:
        raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def get_str_list(obj: dict, field: str, where: str) -> list[str]:
    """`obj[field]` as a non-empty list of strings."""
    if field not in obj:
        raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {field!r} must be a non-empty list of strings, got {value!r:.80}")
    return value


def get_int(obj: dict, field: str, where: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """`obj[field]` as an int in [lo, hi]; bools are rejected (JSON true is not 1 here)."""
    if field not in obj:
        raise DataError(f"{where}: missing field {field!r} (fields present: {sorted(obj)})")
    value = obj[field]
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{where}: field {field!r} must be an integer, got {_type_name(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DataError(f"{where}: field {field!r} = {value} is outside [{lo}, {hi}]")
    return value


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_file(data_dir: Path, names: list[str], what: str) -> Path:
    """The first of `names` that exists in `data_dir` (tasks accept the upstream and our shared file names)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"{data_dir}: no {what} file found (looked for {', '.join(names)})")
