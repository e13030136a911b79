"""Multi-document QA by gold position ("Lost in the Middle", Liu et al. 2023): the paper's key evaluation.

Each question comes with N Wikipedia passages, one of which (the gold one) contains the answer; the release
has one file per gold position k (0-based in the file name, reported 1-based here). Prompt: the standard QA
instruction, the documents as `Document [i](Title: <title>) <text>`, then `Question: ...` / `Answer:`,
as one Mistral-Instruct user turn. Greedy decoding; score = best-subspan exact match of the first line.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, get_str, get_str_list, iter_jsonl
from eval.results import file_source

INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
               "(some of which might be irrelevant).")
_POSITION_FILE = re.compile(r"^nq-open-(\d+)_total_documents_gold_at_(\d+)\.jsonl(\.gz)?$")
_ORACLE_FILES = ("nq-open-oracle.jsonl.gz", "nq-open-oracle.jsonl")
ORACLE = "oracle"


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


def format_document(number: int, doc: Document) -> str:
    """`Document [number](Title: title) text`, number 1-based."""
    return f"Document [{number}](Title: {doc.title}) {doc.text}"


def prompt_text(question: str, documents: tuple[Document, ...] | list[Document]) -> str:
    """The user message: instruction, documents (one per line), question, "Answer:"."""
    search_results = "\n".join(format_document(i, d) for i, d in enumerate(documents, start=1))
    return f"{INSTRUCTION}\n\n{search_results}\n\nQuestion: {question}\nAnswer:"


def _parse_documents(ctxs, where: str) -> tuple[Document, ...]:
    if not isinstance(ctxs, list) or not ctxs:
        raise DataError(f"{where}: field 'ctxs' must be a non-empty list of documents")
    docs = []
    for i, ctx in enumerate(ctxs):
        w = f"{where}: ctxs[{i}]"
        if not isinstance(ctx, dict):
            raise DataError(f"{w} must be an object with 'title' and 'text'")
        isgold = ctx.get("isgold", False)
        if not isinstance(isgold, bool):
            raise DataError(f"{w}: field 'isgold' must be true or false, got {isgold!r}")
        docs.append(Document(get_str(ctx, "title", w, allow_empty=True), get_str(ctx, "text", w), isgold))
    return tuple(docs)


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
        raise DataError(f"{data_dir}: no nq-open-{num_documents}_total_documents_gold_at_<k>.jsonl[.gz] files")
    return dict(sorted(files.items()))


def find_oracle_file(data_dir: Path) -> Path | None:
    for name in _ORACLE_FILES:
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    return None


@dataclasses.dataclass(kw_only=True)
class MdqaArgs(CommonArgs):
    """Multi-document QA accuracy by gold-document position (writes results.json and mdqa_positions.png)."""

    num_documents: int = 20
    """Documents per question: selects nq-open-<N>_total_documents_gold_at_*.jsonl.gz (10, 20 or 30)."""
    positions: tuple[int, ...] | None = None
    """1-based gold positions to evaluate (default: every position present)."""
    oracle: bool = True
    """Also score the oracle setting (gold document only) when nq-open-oracle.jsonl.gz is present."""
    max_new_tokens: int = 100
    """Generation budget; decoding also stops at the first newline (only the first line is scored)."""
    chat_template: bool = True
    """Wrap the prompt as a Mistral-Instruct user turn (the paper's setting)."""


def _select(groups: dict[str, list[MdqaExample]], args: MdqaArgs) -> dict[str, list[MdqaExample]]:
    """Apply --positions, --oracle and --limit to {setting: examples} (setting = "1", "5", ..., "oracle")."""
    if args.positions is not None:
        missing = sorted(set(map(str, args.positions)) - set(groups))
        if missing:
            raise DataError(f"--positions {' '.join(missing)} not in the data (available: {', '.join(groups)})")
    out = {}
    for setting, examples in groups.items():
        if setting == ORACLE and not args.oracle:
            continue
        if setting != ORACLE and args.positions is not None and int(setting) not in args.positions:
            continue
        out[setting] = limited(sorted(examples, key=lambda e: e.index), args.limit)
    return out


def _from_tfds_record(r: dict) -> MdqaExample:
    ctxs = r["ctxs"]
    docs = tuple(Document(t, x, bool(g)) for t, x, g in zip(ctxs["title"], ctxs["text"], ctxs["isgold"], strict=True))
    return MdqaExample(int(r["example_index"]), r["question"], tuple(r["answers"]), docs, int(r["gold_index"]))


def _group_by_position(examples: list[MdqaExample], groups: dict[str, list[MdqaExample]]) -> None:
    for ex in examples:
        groups.setdefault(str(ex.gold_index + 1), []).append(ex)


def load(args: MdqaArgs) -> LoadedData:
    check_source_args(args)
    groups: dict[str, list[MdqaExample]] = {}
    sources = []
    if args.data_file is not None:
        examples = read_mdqa_file(args.data_file)
        oracle_file = args.data_file.name in _ORACLE_FILES
        if oracle_file:
            groups[ORACLE] = examples
        else:
            _group_by_position(examples, groups)
        sources.append(file_source(args.data_file))
    elif args.data_dir is not None:
        files = find_position_files(args.data_dir, args.num_documents)
        wanted = set(files) if args.positions is None else {p - 1 for p in args.positions}
        missing = sorted(p + 1 for p in wanted - set(files))
        if missing:
            raise DataError(f"--positions {' '.join(map(str, missing))}: no such gold position in {args.data_dir} "
                            f"(available: {', '.join(str(k + 1) for k in files)})")
        for position in sorted(wanted):
            _group_by_position(read_mdqa_file(files[position]), groups)
            sources.append(file_source(files[position]))
        oracle = find_oracle_file(args.data_dir)
        if oracle is not None and args.oracle:
            groups[ORACLE] = read_mdqa_file(oracle)
            sources.append(file_source(oracle))
    else:
        from eval import tfds_builders

        builder = tfds_builders.prepared_builder(f"needles_mdqa/{args.num_documents}_documents",
                                                 data_dir=args.tfds_data_dir, download=args.tfds_download,
                                                 manual_dir=args.tfds_manual_dir)
        splits = ["test"] + ([ORACLE] if args.oracle and ORACLE in builder.info.splits else [])
        for split in splits:
            records, source = tfds_builders.read_split(builder, split)
            examples = [_from_tfds_record(r) for r in records]
            if split == ORACLE:
                groups[ORACLE] = examples
            else:
                _group_by_position(examples, groups)
            sources.append(source)
    positions = sorted((k for k in groups if k != ORACLE), key=int)
    groups = {k: groups[k] for k in [*positions, *([ORACLE] if ORACLE in groups else [])]}
    selected = _select(groups, args)
    return LoadedData(selected, sources, sum(len(v) for v in selected.values()))


def evaluate(args: MdqaArgs, data: LoadedData, generator) -> Evaluation:
    from eval.tokens import encode_generation_prompt

    items = [(setting, ex) for setting, examples in data.examples.items() for ex in examples]
    prompts = [encode_generation_prompt(prompt_text(ex.question, ex.documents), chat=args.chat_template)
               for _, ex in items]
    # Only the first line is scored, so decoding can stop at the first newline.
    generations = generator.generate(prompts, max_new_tokens=args.max_new_tokens, stop_strings=("\n",),
                                     progress=args.progress)
    scores: dict[str, list[float]] = {setting: [] for setting in data.examples}
    predictions = []
    for (setting, ex), prompt, gen in zip(items, prompts, generations, strict=True):
        answer = M.first_line(gen.text)
        score = M.best_subspan_em(answer, ex.answers)
        scores[setting].append(score)
        predictions.append({"setting": setting, "gold_position": None if setting == ORACLE else ex.gold_index + 1,
                            "index": ex.index, "question": ex.question, "answers": list(ex.answers),
                            "output": gen.text, "answer": answer, "best_subspan_em": score,
                            "prompt_tokens": len(prompt)})
    by_position = {s: {**M.summarize("best_subspan_em", v), "n": len(v)} for s, v in scores.items() if s != ORACLE}
    position_scores = [x for s, v in scores.items() if s != ORACLE for x in v]
    metrics = {**M.summarize("best_subspan_em", position_scores), "by_gold_position": by_position}
    if ORACLE in scores:
        metrics[ORACLE] = {**M.summarize("best_subspan_em", scores[ORACLE]), "n": len(scores[ORACLE])}
    doc_counts = sorted({len(ex.documents) for setting, ex in items if setting != ORACLE})
    settings = {"num_documents": doc_counts[0] if len(doc_counts) == 1 else doc_counts,
                "chat_template": args.chat_template,
                "max_new_tokens": args.max_new_tokens, "stop_strings": ["\n"], "instruction": INSTRUCTION,
                "scored": "first line of the output, best-subspan exact match (SQuAD normalisation)"}
    return Evaluation(metrics, predictions, settings, len(items))


def write_plot(results: dict, out: Path) -> None:
    from eval.plots import plot_mdqa

    plot_mdqa([results], Path(out) / "mdqa_positions.png")


TASK = Task("mdqa", MdqaArgs, load, evaluate, after_write=write_plot)
