"""Multi-document QA by gold position ("Lost in the Middle", Liu et al. 2023): the paper's key evaluation.

Each question comes with N Wikipedia passages, one of which (the gold one) contains the answer; the release
has one file per gold position k (0-based in the file name, reported 1-based here). Prompt: the standard QA
instruction, the documents as `Document [i](Title: <title>) <text>`, then `Question: ...` / `Answer:`,
as one Mistral-Instruct user turn. Greedy decoding; score = best-subspan exact match of the first line of
the stripped output.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import tyro

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, get_str, iter_jsonl
from eval.flenqa import token_stats
from eval.plots import plot_mdqa
from eval.readers import (ORACLE_FILES, Document, MdqaExample, expected_files, find_oracle_file, find_position_files,
                          parse_passages, parse_position_file_name, read_mdqa_file, release_positions)
from eval.results import file_source, prompt_sha256
from jaxtrain.generate import encode_generation_prompt

INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
               "(some of which might be irrelevant).")
ORACLE = "oracle"
CLOSED_BOOK = "closedbook"


def format_document(number: int, doc: Document) -> str:
    """`Document [number](Title: title) text`, number 1-based."""
    return f"Document [{number}](Title: {doc.title}) {doc.text}"


def prompt_text(question: str, documents: tuple[Document, ...] | list[Document]) -> str:
    """The user message: instruction, documents (one per line), question, "Answer:"."""
    search_results = "\n".join(format_document(i, d) for i, d in enumerate(documents, start=1))
    return f"{INSTRUCTION}\n\n{search_results}\n\nQuestion: {question}\nAnswer:"


@dataclasses.dataclass(kw_only=True)
class MdqaArgs(CommonArgs):
    """Multi-document QA accuracy by gold-document position (writes results.json and mdqa_positions.png).

    Release files are used as they are when they hold the requested document count and positions;
    otherwise every question is rebuilt from one release file as the Lost-in-the-Middle data script does:
    the gold passage moved to each requested position, the distractors kept in order (see --num-docs)."""

    num_documents: Annotated[int | None, tyro.conf.arg(aliases=("--num-docs",))] = None
    """Documents per question (2 ... 120; default: as in the data, 20 for the release files). A count the
    data has no files for is built from the file with the most documents: its distractors in order, then
    the top-ranked passages of --retrieval-file that do not contain an answer, or without one passages of
    other questions drawn deterministically (the random-distractor variant). Fewer: the top N-1 distractors."""
    positions: tuple[int, ...] | None = None
    """1-based gold positions, chosen among the release files (default: every position of the release
    files, or for a built document count N: 1, 5, 10, 15, ..., N)."""
    gold_positions: tuple[str, ...] | None = None
    """Any 0-based gold positions, as in the release file names and the data script's --gold-index, e.g.
    `--gold-positions 0,1,4,9,14,19` (commas or spaces); those without a release file are built."""
    retrieval_file: Path | None = None
    """Retrieval results in the Lost-in-the-Middle format (nq-open-contriever-msmarco-retrieved-documents.jsonl.gz):
    with it, a built question's distractors are the top N-1 retrieved passages with hasanswer=false."""
    distractor_seed: int = 0
    """Seed of the random-distractor variant (used only without --retrieval-file, when N is larger than the data's)."""
    oracle: bool = True
    """Also score the oracle setting (gold document only) when nq-open-oracle.jsonl.gz is present."""
    closed_book: bool = False
    """Also score the closed-book setting (no documents; the prompt is `Question: <q>\nAnswer:`)."""
    max_new_tokens: int = 100
    """Generation budget; decoding also stops at the first newline after the answer's leading whitespace
    (only the first line of the stripped output is scored)."""
    chat_template: bool = True
    """Wrap the prompt as a user turn of the model's chat template (the paper's setting)."""


def _parse_gold_positions(values: tuple[str, ...]) -> list[int]:
    out = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise DataError(f"--gold-positions: {part!r} is not an integer (0-based positions, e.g. 0,4,9)") from None
    if not out:
        raise DataError("--gold-positions: give at least one 0-based position")
    return out


def requested_positions(args: MdqaArgs) -> list[int] | None:
    """The requested 0-based gold positions (None: the default), checked against --num-docs."""
    if args.positions is not None and args.gold_positions is not None:
        raise DataError("give either --positions (1-based) or --gold-positions (0-based), not both")
    if args.num_documents is not None and not 2 <= args.num_documents:
        raise DataError(f"--num-docs must be at least 2, got {args.num_documents}")
    if args.positions is not None:
        wanted, flag, shift = list(args.positions), "--positions", 1
    elif args.gold_positions is not None:
        wanted, flag, shift = _parse_gold_positions(args.gold_positions), "--gold-positions", 0
    else:
        return None
    zero_based = sorted({p - shift for p in wanted})
    if zero_based[0] < 0:
        raise DataError(f"{flag}: positions start at {shift}, got {min(wanted)}")
    if args.num_documents is not None and zero_based[-1] >= args.num_documents:
        raise DataError(f"{flag}: position {zero_based[-1] + shift} does not exist with --num-docs "
                        f"{args.num_documents}")
    return zero_based


# --- building prompts of any document count and gold position -------------------------------------------

def read_retrieval_file(path: Path, questions: set[str]) -> dict[str, list[Document]]:
    """{question: its retrieved passages without an answer (hasanswer=false), in rank order} for the
    given questions, from a Lost-in-the-Middle retrieval-results file (other questions are skipped)."""
    found: dict[str, list[Document]] = {}
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        question = get_str(obj, "question", where)
        if question not in questions or question in found:
            continue
        found[question] = [doc for doc, hasanswer in parse_passages(obj.get("ctxs"), where, "hasanswer")
                           if not hasanswer]
    missing = sorted(questions - set(found))
    if missing:
        raise DataError(f"{path}: no retrieval results for {len(missing)} question(s), e.g. {missing[0]!r}")
    return found


class _RandomDistractors:
    """The random-distractor variant: passages of the other questions of the data, drawn per question from
    `random.Random("needles/mdqa-distractors/seed=<seed>/<question>")` (so the choice does not depend on
    --limit, on the order of questions or on other runs), never one that contains any of the question's
    answers (SQuAD-normalised substring, the score's own test) and never one already in the prompt."""

    def __init__(self, examples: list[MdqaExample], seed: int):
        self.seed = seed
        self.pool: list[tuple[int, Document, str]] = []
        seen = set()
        for ex in examples:
            for d in ex.documents:
                if (d.title, d.text) not in seen:
                    seen.add((d.title, d.text))
                    self.pool.append((ex.index, Document(d.title, d.text), M.normalize_answer(d.text)))

    def draw(self, ex: MdqaExample, present: list[Document], count: int) -> list[Document]:
        """`count` passages in the order drawn: random pool indices, skipping repeats and passages that
        do not qualify (cheap on a 50K-passage pool, unlike filtering the whole pool per question)."""
        answers = [M.normalize_answer(a) for a in ex.answers]
        taken = {(d.title, d.text) for d in present} | {(d.title, d.text) for d in ex.documents}
        rng = random.Random(f"needles/mdqa-distractors/seed={self.seed}/{ex.question}")
        chosen: list[Document] = []
        tried: set[int] = set()
        while len(chosen) < count:
            if len(tried) == len(self.pool):
                raise DataError(f"random distractors: only {len(chosen)} passages of other questions qualify for "
                                f"question {ex.index} ({ex.question!r}), {count} needed; give --retrieval-file")
            i = rng.randrange(len(self.pool))
            if i in tried:
                continue
            tried.add(i)
            owner, doc, norm = self.pool[i]
            if owner != ex.index and (doc.title, doc.text) not in taken and not any(a in norm for a in answers):
                chosen.append(doc)
        return chosen


def build_examples(base: list[MdqaExample], num_documents: int, positions: list[int], *,
                   retrieval: dict[str, list[Document]] | None = None,
                   random_distractors: _RandomDistractors | None = None) -> dict[int, list[MdqaExample]]:
    """{0-based position: examples with `num_documents` documents, the gold one at that position}.

    As `make_qa_data_from_retrieval_results.py` of Lost in the Middle: the distractors are the top N-1
    passages without an answer, in rank order (from `retrieval` when given, else the base file's own
    distractors, which are exactly those, then random ones), and the gold passage is inserted at the
    position."""
    out: dict[int, list[MdqaExample]] = {k: [] for k in positions}
    need = num_documents - 1
    for ex in base:
        gold = ex.documents[ex.gold_index]
        if retrieval is not None:
            distractors = retrieval[ex.question][:need]
            if len(distractors) < need:
                raise DataError(f"retrieval results hold only {len(distractors)} passages without an answer for "
                                f"{ex.question!r}; --num-docs {num_documents} needs {need}")
        else:
            distractors = [d for i, d in enumerate(ex.documents) if i != ex.gold_index][:need]
            if len(distractors) < need:
                if random_distractors is None:
                    raise DataError(f"{num_documents} documents need more distractors than the data has")
                distractors += random_distractors.draw(ex, distractors, need - len(distractors))
        distractors = [Document(d.title, d.text) for d in distractors]
        for k in positions:
            docs = [*distractors]
            docs.insert(k, Document(gold.title, gold.text, isgold=True))
            out[k].append(MdqaExample(ex.index, ex.question, ex.answers, tuple(docs), k))
    return out


# --- loading -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Release:
    """Release examples that a data source offers: {0-based position: loader} with one document count."""

    num_documents: int
    positions: dict[int, Callable[[], tuple[list[MdqaExample], dict]]]
    oracle: Callable[[], tuple[list[MdqaExample], dict]] | None = None


def _file_loader(path: Path):
    return lambda: (read_mdqa_file(path), file_source(path))


def _counts_in_dir(data_dir: Path) -> list[int]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    return sorted({parsed[0] for p in data_dir.iterdir() if (parsed := parse_position_file_name(p)) is not None})


def _release_from_dir(args: MdqaArgs) -> _Release:
    counts = _counts_in_dir(args.data_dir)
    if not counts:
        raise DataError(f"{args.data_dir}: no nq-open-<N>_total_documents_gold_at_<k>.jsonl[.gz] files; "
                        + expected_files(args.num_documents or 20))
    n = args.num_documents if args.num_documents in counts else max(counts)
    files = find_position_files(args.data_dir, n)
    oracle = find_oracle_file(args.data_dir)
    return _Release(n, {k: _file_loader(p) for k, p in files.items()},
                    None if oracle is None else _file_loader(oracle))


def _release_from_file(args: MdqaArgs) -> _Release:
    path = args.data_file
    if path.name in ORACLE_FILES:
        if args.num_documents not in (None, 1) or args.positions or args.gold_positions or args.closed_book:
            raise DataError(f"{path}: the oracle file holds the gold passage alone; give a position file "
                            "to build other document counts or positions")
        return _Release(1, {}, _file_loader(path))
    examples = read_mdqa_file(path)
    if not examples:
        raise DataError(f"{path}: no questions")
    counts = {len(ex.documents) for ex in examples}
    golds = {ex.gold_index for ex in examples}
    if len(counts) > 1 or len(golds) > 1:
        raise DataError(f"{path}: questions with different document counts or gold positions; expected one "
                        "Lost-in-the-Middle file (one count, one gold position)")
    return _Release(counts.pop(), {golds.pop(): lambda: (examples, file_source(path))})


def _release_from_tfds(args: MdqaArgs) -> _Release:
    from eval import tfds_builders

    n = args.num_documents if args.num_documents in (10, 20, 30) else 20
    builder = tfds_builders.prepared_builder(f"needles_mdqa/{n}_documents", data_dir=args.tfds_data_dir,
                                             download=args.tfds_download, manual_dir=args.tfds_manual_dir)
    records, source = tfds_builders.read_split(builder, "test")
    by_position: dict[int, list[MdqaExample]] = {}
    for ex in map(_from_tfds_record, records):
        by_position.setdefault(ex.gold_index, []).append(ex)
    oracle = None
    if ORACLE in builder.info.splits:
        def oracle():
            records, oracle_source = tfds_builders.read_split(builder, ORACLE)
            return [_from_tfds_record(r) for r in records], oracle_source
    return _Release(n, {k: (lambda v=v: (v, source)) for k, v in sorted(by_position.items())}, oracle)


def _sorted_limited(examples: list[MdqaExample], limit: int | None) -> list[MdqaExample]:
    return limited(sorted(examples, key=lambda e: e.index), limit)


def load(args: MdqaArgs) -> LoadedData:
    check_source_args(args)
    wanted = requested_positions(args)
    if args.data_file is not None:
        release = _release_from_file(args)
    elif args.data_dir is not None:
        release = _release_from_dir(args)
    else:
        release = _release_from_tfds(args)
    n = args.num_documents or release.num_documents
    sources: list[dict] = []
    sources_seen: set[str] = set()

    def use(loader) -> list[MdqaExample]:
        examples, source = loader()
        key = json.dumps(source, sort_keys=True)
        if key not in sources_seen:
            sources_seen.add(key)
            sources.append(source)
        return examples

    groups: dict[str, list[MdqaExample]] = {}
    base: list[MdqaExample] | None = None
    built = None
    if release.positions:
        if wanted is None:
            wanted = sorted(release.positions) if n == release.num_documents else release_positions(n)
        from_release = n == release.num_documents and set(wanted) <= set(release.positions)
        if args.positions is not None and not from_release:
            missing = [k + 1 for k in wanted if k not in release.positions or n != release.num_documents]
            raise DataError(f"--positions {' '.join(map(str, missing))}: no such gold position in the "
                            f"{release.num_documents}-document release files (available: "
                            f"{', '.join(str(k + 1) for k in release.positions)}); --gold-positions (0-based) "
                            "builds any position")
        if from_release:
            for k in wanted:
                groups[str(k + 1)] = _sorted_limited(use(release.positions[k]), args.limit)
            base = groups[str(wanted[0] + 1)]
        else:
            base = _sorted_limited(use(release.positions[min(release.positions)]), args.limit)
            retrieval = None
            if args.retrieval_file is not None:
                retrieval = read_retrieval_file(args.retrieval_file, {ex.question for ex in base})
                sources.append(file_source(args.retrieval_file))
            randoms = None
            if retrieval is None and n > release.num_documents:
                # The pool is the whole base file, whatever --limit, so the draw does not depend on it.
                everything = use(release.positions[min(release.positions)])
                randoms = _RandomDistractors(everything, args.distractor_seed)
            for k, examples in build_examples(base, n, wanted, retrieval=retrieval,
                                              random_distractors=randoms).items():
                groups[str(k + 1)] = examples
            built = {"from_documents": release.num_documents, "from_gold_position": min(release.positions) + 1,
                     "distractors": ("retrieval" if retrieval is not None else
                                     "random" if randoms is not None else "release"),
                     **({"distractor_seed": args.distractor_seed} if randoms is not None else {})}
    elif wanted is not None:
        raise DataError("--positions/--gold-positions need a Lost-in-the-Middle position file")
    if args.oracle and release.oracle is not None:
        groups[ORACLE] = _sorted_limited(use(release.oracle), args.limit)
        base = base if base is not None else groups[ORACLE]
    if args.closed_book:
        if base is None:
            raise DataError("--closed-book needs questions: give MDQA data")
        groups[CLOSED_BOOK] = [dataclasses.replace(ex, documents=(), gold_index=-1) for ex in base]
    if not groups:
        raise DataError("nothing to evaluate: no gold positions, and no oracle file (or --no-oracle)")
    info = {"num_documents": n, "gold_positions": [int(k) for k in groups if k not in (ORACLE, CLOSED_BOOK)],
            "built": built}
    return LoadedData(groups, sources, sum(len(v) for v in groups.values()), info)


def _from_tfds_record(r: dict) -> MdqaExample:
    ctxs = r["ctxs"]
    docs = tuple(Document(t, x, bool(g)) for t, x, g in zip(ctxs["title"], ctxs["text"], ctxs["isgold"], strict=True))
    return MdqaExample(int(r["example_index"]), r["question"], tuple(r["answers"]), docs, int(r["gold_index"]))


def setting_prompt(setting: str, ex: MdqaExample) -> str:
    """The prompt of one question in one setting (closed book: Lost in the Middle's closedbook_qa.prompt)."""
    if setting == CLOSED_BOOK:
        return closed_book_prompt_text(ex.question)
    return prompt_text(ex.question, ex.documents)


def closed_book_prompt_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def evaluate(args: MdqaArgs, data: LoadedData, generator) -> Evaluation:
    items = [(setting, ex) for setting, examples in data.examples.items() for ex in examples]
    texts = [setting_prompt(setting, ex) for setting, ex in items]
    prompts = [encode_generation_prompt(generator.tokenizer, t, chat=args.chat_template) for t in texts]
    # Only the first line of the stripped output is scored, so decoding can stop at the first newline
    # after the answer's first non-blank character.
    generations = generator.generate(prompts, max_new_tokens=args.max_new_tokens, stop_strings=("\n",),
                                     skip_leading_whitespace=True, progress=args.progress)
    scores: dict[str, list[float]] = {setting: [] for setting in data.examples}
    lengths: dict[str, list[int]] = {setting: [] for setting in data.examples}
    predictions = []
    for (setting, ex), text, prompt, gen in zip(items, texts, prompts, generations, strict=True):
        answer = M.first_line(gen.text)
        score = M.best_subspan_em(answer, ex.answers)
        scores[setting].append(score)
        lengths[setting].append(len(prompt))
        predictions.append({"setting": setting, "gold_position": ex.gold_index + 1 if setting.isdigit() else None,
                            "num_documents": len(ex.documents), "index": ex.index, "question": ex.question,
                            "answers": list(ex.answers), "output": gen.text, "answer": answer,
                            "best_subspan_em": score, "prompt_tokens": len(prompt),
                            "prompt_sha256": prompt_sha256(text)})
    special = (ORACLE, CLOSED_BOOK)
    by_position = {s: {**M.summarize("best_subspan_em", v), "n": len(v), "prompt_tokens": token_stats(lengths[s])}
                   for s, v in scores.items() if s not in special}
    position_scores = [x for s, v in scores.items() if s not in special for x in v]
    metrics = {**(M.summarize("best_subspan_em", position_scores) if position_scores else {}),
               "by_gold_position": by_position}
    for s in special:
        if s in scores:
            metrics[s] = {**M.summarize("best_subspan_em", scores[s]), "n": len(scores[s]),
                          "prompt_tokens": token_stats(lengths[s])}
    document_lengths = [x for s, v in lengths.items() if s not in special for x in v]
    info = data.info or {}
    settings = {"num_documents": info.get("num_documents"), "gold_positions": info.get("gold_positions"),
                "built": info.get("built"), "oracle": ORACLE in scores, "closed_book": CLOSED_BOOK in scores,
                "prompt_tokens": token_stats(document_lengths) if document_lengths else None,
                "chat_template": args.chat_template,
                "max_new_tokens": args.max_new_tokens, "stop_strings": ["\n"], "stop_after_leading_whitespace": True,
                "instruction": INSTRUCTION,
                "scored": "first line of the stripped output, best-subspan exact match (SQuAD normalisation)"}
    return Evaluation(metrics, predictions, settings, len(items))


def write_plot(results: dict, out: Path) -> None:
    plot_mdqa([results], Path(out) / "mdqa_positions.png")


TASK = Task("mdqa", MdqaArgs, load, evaluate, after_write=write_plot)
