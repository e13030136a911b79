"""`python -m eval mdqa-layout --source DIR --out DIR`: the Lost in the Middle release laid out as `eval mdqa
--data-dir` and the `needles_mdqa` tfds builder (`--tfds-manual-dir`) read it.

The release (github.com/nelson-liu/lost-in-the-middle, `qa_data/`) keeps one folder per document count
(`qa_data/20_total_documents/nq-open-20_total_documents_gold_at_4.jsonl.gz`, ...) and the oracle file and the
retrieval results in `qa_data/` itself; the readers take one flat folder. This finds every release file under
`--source` (a checkout, its `qa_data/`, or any folder the files were downloaded into), copies it into `--out`
under its own name, and says what each document count has and lacks. The files are read (and checked line by
line) only when evaluated.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from eval.datafiles import DataError
from eval.readers import (ORACLE_FILES, RELEASE_COUNTS, RETRIEVAL_FILE, parse_position_file_name, position_file_name,
                          release_positions)


@dataclasses.dataclass(kw_only=True)
class MdqaLayoutArgs:
    """Copy the Lost in the Middle release files (qa_data/<N>_total_documents/...) into one folder for `eval mdqa`."""

    source: Path
    """A lost-in-the-middle checkout, its qa_data/, or any folder holding the release files (searched recursively)."""
    out: Path
    """The flat folder to write: pass it to `python -m eval mdqa --data-dir` (or as --tfds-manual-dir)."""
    symlink: bool = False
    """Link to the files instead of copying them (saves the disk space of a second copy)."""


def release_files(source: Path) -> dict[str, Path]:
    """{file name: path} of every release file under `source`; one name found twice is refused (which to take?)."""
    if not Path(source).is_dir():
        raise DataError(f"--source {source}: not a directory")
    found: dict[str, Path] = {}
    for path in sorted(Path(source).rglob("nq-open-*")):
        name = path.name
        if path.is_file() and (parse_position_file_name(path) or name in ORACLE_FILES or name == RETRIEVAL_FILE):
            if name in found:
                raise DataError(f"--source {source}: {name} twice ({found[name]}, {path}); give the folder of one copy")
            found[name] = path
    if not any(parse_position_file_name(Path(n)) for n in found):
        wanted = "; ".join(", ".join(position_file_name(n, k) for k in release_positions(n)) for n in RELEASE_COUNTS)
        raise DataError(f"--source {source}: no Lost in the Middle position file in it or below; expected, in any "
                        f"sub-folder (the repository keeps them in qa_data/<N>_total_documents/): {wanted}; and "
                        f"optionally {ORACLE_FILES[0]} and {RETRIEVAL_FILE}")
    return found


def layout(args: MdqaLayoutArgs) -> list[str]:
    """Copy (or link) the release files into `args.out`; returns the report, one line per document count."""
    files = release_files(args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        target = out / name
        if target.is_symlink() or target.exists():
            target.unlink()
        if args.symlink:
            target.symlink_to(path.resolve())
        else:
            shutil.copyfile(path, target)
    positions: dict[int, set[int]] = {}
    for name in files:
        if parsed := parse_position_file_name(Path(name)):
            positions.setdefault(parsed[0], set()).add(parsed[1])
    lines = []
    for n, have in sorted(positions.items()):
        line = f"{n} documents: gold at {', '.join(map(str, sorted(have)))} (0-based)"
        expected = release_positions(n) if n in RELEASE_COUNTS else []
        missing = [position_file_name(n, k) for k in expected if k not in have]
        lines.append(line + (f"; missing from the release's set: {', '.join(missing)}" if missing else ""))
    extras = {"oracle": any(n in files for n in ORACLE_FILES),
              "retrieval results (--retrieval-file)": RETRIEVAL_FILE in files}
    lines.append("; ".join(f"{what}: {'yes' if present else 'no'}" for what, present in extras.items()))
    lines.append(f"{'linked' if args.symlink else 'copied'} {len(files)} files into {out}; next: python -m eval mdqa "
                 f"--model HF_DIR_OR_RUN --data-dir {out} --out RESULTS_DIR")
    return lines
