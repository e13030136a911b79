"""Readers of the released files that our own tensorflow-datasets builders also prepare: Lost in the
Middle's MDQA files and Hendrycks' MMLU CSVs. Here, apart from both the tasks and the builders, so that
either can use them (`eval.mdqa`, `eval.mmlu`, `eval.tfds_builders`)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from eval.datafiles import DataError, get_str, get_str_list, iter_jsonl, read_csv_rows

# --- MDQA ("Lost in the Middle") --------------------------------------------------------------------------

_POSITION_FILE = re.compile(r"^nq-open-(\d+)_total_documents_gold_at_(\d+)\.jsonl(\.gz)?$")
ORACLE_FILES = ("nq-open-oracle.jsonl.gz", "nq-open-oracle.jsonl")
RETRIEVAL_FILE = "nq-open-contriever-msmarco-retrieved-documents.jsonl.gz"
RELEASE_COUNTS = (10, 20, 30)
"""Document counts of the Lost in the Middle release (qa_data/<N>_total_documents/)."""


def release_positions(num_documents: int) -> list[int]:
    """0-based gold positions 0, 4, 9, 14, ..., N-1: the release's files for N documents (10, 20, 30)."""
    return sorted({0, num_documents - 1, *range(4, num_documents, 5)})


def position_file_name(num_documents: int, position: int) -> str:
    return f"nq-open-{num_documents}_total_documents_gold_at_{position}.jsonl.gz"


def expected_files(num_documents: int) -> str:
    """The release's file names for N documents, and where they go, for error messages."""
    names = ", ".join(position_file_name(num_documents, k) for k in release_positions(num_documents))
    return (f"expected the Lost in the Middle files {names} (and optionally {ORACLE_FILES[0]}) directly in this "
            "folder; `python -m eval mdqa-layout --source <lost-in-the-middle checkout or its qa_data> --out "
            "<folder>` copies them there from the release's layout")


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    text: str
    isgold: bool = False


@dataclasses.dataclass(frozen=True)
class MdqaExample:
    index: int
    """0-based position of the question in its file (the same question has the same index in every file)."""
    question: str
    answers: tuple[str, ...]
    documents: tuple[Document, ...]
    gold_index: int
    """0-based position of the gold document in `documents`."""


def parse_passages(ctxs, where: str, flag: str, default: bool | None = None) -> list[tuple[Document, bool]]:
    """(passage, its boolean field `flag`) for each entry of a 'ctxs' list; `default`: the flag's value
    when the field is absent (None: required)."""
    if not isinstance(ctxs, list):
        raise DataError(f"{where}: field 'ctxs' must be a list of passages")
    passages = []
    for i, ctx in enumerate(ctxs):
        w = f"{where}: ctxs[{i}]"
        if not isinstance(ctx, dict):
            raise DataError(f"{w} must be an object with 'title', 'text' and '{flag}'")
        value = ctx.get(flag, default)
        if not isinstance(value, bool):
            raise DataError(f"{w}: field '{flag}' must be true or false, got {value!r}")
        passages.append((Document(get_str(ctx, "title", w, allow_empty=True), get_str(ctx, "text", w)), value))
    return passages


def _parse_documents(ctxs, where: str) -> tuple[Document, ...]:
    if not ctxs:
        raise DataError(f"{where}: field 'ctxs' must be a non-empty list of documents")
    passages = parse_passages(ctxs, where, "isgold", False)
    return tuple(dataclasses.replace(doc, isgold=isgold) for doc, isgold in passages)


def parse_position_file_name(path: Path) -> tuple[int, int] | None:
    """(total documents, 0-based gold position) from a release file name, or None for other names."""
    m = _POSITION_FILE.match(Path(path).name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def read_mdqa_file(path: Path) -> list[MdqaExample]:
    """Every question of one release file. Exactly one document must be gold; for position files its
    position and the document count must match the file name."""
    path = Path(path)
    expected = parse_position_file_name(path)
    examples = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        question = get_str(obj, "question", where)
        answers = tuple(get_str_list(obj, "answers", where))
        if "ctxs" not in obj:
            raise DataError(f"{where}: missing field 'ctxs' (fields present: {sorted(obj)})")
        docs = _parse_documents(obj["ctxs"], where)
        gold = [i for i, d in enumerate(docs) if d.isgold]
        if len(gold) != 1:
            raise DataError(f"{where}: expected exactly one document with isgold=true, found {len(gold)}")
        if expected is not None:
            total, position = expected
            if len(docs) != total:
                raise DataError(f"{where}: {len(docs)} documents, but the file name says {total}")
            if gold[0] != position:
                raise DataError(f"{where}: gold document at 0-based position {gold[0]}, "
                                f"but the file name says {position}")
        examples.append(MdqaExample(len(examples), question, answers, docs, gold[0]))
    return examples


def find_position_files(data_dir: Path, num_documents: int) -> dict[int, Path]:
    """{0-based gold position: file} for all `nq-open-<num_documents>_total_documents_gold_at_*` files."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    files = {}
    for path in sorted(data_dir.iterdir()):
        parsed = parse_position_file_name(path)
        if parsed is not None and parsed[0] == num_documents:
            if parsed[1] in files:
                raise DataError(f"{data_dir}: two files for gold position {parsed[1]}: "
                                f"{files[parsed[1]].name}, {path.name}")
            files[parsed[1]] = path
    if not files:
        raise DataError(f"{data_dir}: no nq-open-{num_documents}_total_documents_gold_at_<k>.jsonl[.gz] files; "
                        + expected_files(num_documents))
    return dict(sorted(files.items()))


def find_oracle_file(data_dir: Path) -> Path | None:
    for name in ORACLE_FILES:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    return None


# --- MMLU -------------------------------------------------------------------------------------------------

LETTERS = ("A", "B", "C", "D")
HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
SUBJECT_FILE = re.compile(r"^(?P<subject>.+)_(?P<split>dev|val|test)\.csv$")


@dataclasses.dataclass(frozen=True)
class MmluQuestion:
    subject: str
    row: int
    """0-based data row in its file (few-shot examples are the first rows of dev)."""
    question: str
    choices: tuple[str, str, str, str]
    answer: int


def read_mmlu_csv(path: Path, subject: str) -> list[MmluQuestion]:
    """Rows `question,c0,c1,c2,c3,answer`, answer 0-3 or A-D; an optional header row is skipped (the
    original release has none, our shared slices have one)."""
    questions = []
    for lineno, fields in read_csv_rows(path):
        if not questions and [f.strip().lower() for f in fields] == HEADER:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 6:
            raise DataError(f"{where}: expected 6 fields (question, 4 choices, answer), got {len(fields)}")
        answer = fields[5].strip()
        if answer in LETTERS:
            index = LETTERS.index(answer)
        elif answer in ("0", "1", "2", "3"):
            index = int(answer)
        else:
            raise DataError(f"{where}: field 'answer' must be 0-3 or A-D, got {answer!r}")
        if not fields[0].strip():
            raise DataError(f"{where}: field 'question' is empty")
        questions.append(MmluQuestion(subject, len(questions), fields[0], tuple(fields[1:5]), index))
    return questions


def find_subject_files(folder: Path, split: str) -> dict[str, Path]:
    """{subject: file} for the `<subject>_<split>.csv` files of a folder, sorted by subject."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    files = {}
    for path in sorted(folder.iterdir()):
        m = SUBJECT_FILE.match(path.name)
        if m and m.group("split") == split:
            files[m.group("subject")] = path
    if not files:
        raise DataError(f"{folder}: no <subject>_{split}.csv files")
    return files
