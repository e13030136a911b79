"""MMLU scored by the log-likelihood of " A" / " B" / " C" / " D" (lm-evaluation-harness `mmlu`): 0-shot by
default as the harness's `mmlu` task, `--num-fewshot 5` for the original 5-shot protocol.

Prompt per subject: "The following are multiple choice questions (with answers) about <subject>.\\n\\n",
then the first k dev questions with their answers (the harness's `first_n` sampler), then the test question:
    <question>\\nA. <c0>\\nB. <c1>\\nC. <c2>\\nD. <c3>\\nAnswer: <letter>\\n\\n ... <question>\\n...\\nAnswer:
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError
from eval.readers import LETTERS, MmluQuestion, SUBJECT_FILE, find_subject_files, read_mmlu_csv
from eval.results import file_source, prompt_sha256
from jaxtrain.generate import FewShotPrompt, encode_pair

def format_question(q: MmluQuestion) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices, strict=True))
    return f"{q.question.strip()}{options}\nAnswer:"


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def fewshot_prompt(q: MmluQuestion, shots: list[MmluQuestion]) -> FewShotPrompt:
    """`q` with `shots` as answered examples; the choices are the letters."""
    return FewShotPrompt(format_question(q), tuple((format_question(s), LETTERS[s.answer]) for s in shots),
                         description(q.subject))


def build_context(q: MmluQuestion, shots: list[MmluQuestion]) -> str:
    """The full plain-text prompt for `q` with `shots` as answered examples; the choices are " A" ... " D"."""
    return fewshot_prompt(q, shots).text()


@dataclasses.dataclass(kw_only=True)
class MmluArgs(CommonArgs):
    """MMLU accuracy (log-likelihood of the answer letter). --data-dir holds dev/ and test/ CSV folders;
    --data-file is one <subject>_test.csv whose few-shot rows come from ../dev/<subject>_dev.csv."""

    num_fewshot: int = 0
    """Answered dev questions before each test question (0-5). Default 0, as the harness's `mmlu` task unless
    it is given `--num_fewshot 5`."""
    subjects: tuple[str, ...] | None = None
    """Evaluate only these subjects (default: every subject with a test file)."""
    chat_template: bool = False
    """The model's chat template as lm-evaluation-harness's `--apply_chat_template --fewshot_as_multiturn`: the
    description as the system message, each dev example a user and an assistant turn, the letter scored after
    the generation prompt."""


@dataclasses.dataclass
class MmluData:
    test: dict[str, list[MmluQuestion]]
    dev: dict[str, list[MmluQuestion]]


def _read_dir_pair(test_files: dict[str, Path], dev_dir: Path, sources: list[dict]) -> MmluData:
    dev_files = find_subject_files(dev_dir, "dev")
    data = MmluData({}, {})
    for subject, path in test_files.items():
        if subject not in dev_files:
            raise DataError(f"{dev_dir}: no {subject}_dev.csv for the few-shot examples of {path}")
        data.test[subject] = read_mmlu_csv(path, subject)
        data.dev[subject] = read_mmlu_csv(dev_files[subject], subject)
        sources += [file_source(path), file_source(dev_files[subject])]
    return data


def _group(records: list[dict]) -> dict[str, list[MmluQuestion]]:
    out: dict[str, list[MmluQuestion]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r["subject"], r["row"])):
        out[r["subject"]].append(MmluQuestion(r["subject"], r["row"], r["question"], tuple(r["choices"]), r["answer"]))
    return dict(out)


def load(args: MmluArgs) -> LoadedData:
    check_source_args(args)
    sources: list[dict] = []
    if args.data_file is not None:
        m = SUBJECT_FILE.match(args.data_file.name)
        if not m or m.group("split") != "test":
            raise DataError(f"{args.data_file}: expected a file named <subject>_test.csv")
        dev_dir = args.data_file.resolve().parent.parent / "dev"
        data = _read_dir_pair({m.group("subject"): args.data_file}, dev_dir, sources)
    elif args.data_dir is not None:
        data = _read_dir_pair(find_subject_files(args.data_dir / "test", "test"), args.data_dir / "dev", sources)
    else:
        from eval import tfds_builders

        builder = tfds_builders.prepared_builder("needles_mmlu", data_dir=args.tfds_data_dir,
                                                 download=args.tfds_download, manual_dir=args.tfds_manual_dir)
        test, test_source = tfds_builders.read_split(builder, "test")
        dev, dev_source = tfds_builders.read_split(builder, "dev")
        data = MmluData(_group(test), _group(dev))
        sources += [test_source, dev_source]
    if args.subjects is not None:
        unknown = sorted(set(args.subjects) - set(data.test))
        if unknown:
            raise DataError(f"--subjects {' '.join(unknown)}: no test data (available: {', '.join(sorted(data.test))})")
        data.test = {s: data.test[s] for s in args.subjects}
    for subject in data.test:
        if len(data.dev.get(subject, [])) < args.num_fewshot:
            raise DataError(f"{subject}: --num-fewshot {args.num_fewshot} but only "
                            f"{len(data.dev.get(subject, []))} dev questions")
    data.test = {s: limited(qs, args.limit) for s, qs in data.test.items()}
    return LoadedData(data, sources, sum(len(qs) for qs in data.test.values()))


def evaluate(args: MmluArgs, data: LoadedData, generator) -> Evaluation:
    chat, tokenizer = args.chat_template, generator.tokenizer
    mmlu: MmluData = data.examples
    questions = [q for qs in mmlu.test.values() for q in qs]
    requests, contexts = [], []
    for q in questions:
        prompt = fewshot_prompt(q, mmlu.dev[q.subject][: args.num_fewshot])
        contexts.append(prompt.render(tokenizer, chat=chat))
        requests += [encode_pair(tokenizer, contexts[-1], prompt.continuation(letter, chat=chat)) for letter in LETTERS]
    lls = generator.loglikelihood(requests, progress=args.progress)
    per_subject: dict[str, list[float]] = defaultdict(list)
    predictions = []
    for i, q in enumerate(questions):
        scores = [ll for ll, _ in lls[4 * i: 4 * i + 4]]
        pred = max(range(4), key=lambda j: scores[j])
        correct = float(pred == q.answer)
        per_subject[q.subject].append(correct)
        predictions.append({"subject": q.subject, "row": q.row, "question": q.question, "choices": list(q.choices),
                            "prompt_sha256": prompt_sha256(contexts[i]),
                            "answer": LETTERS[q.answer], "prediction": LETTERS[pred], "loglikelihoods": scores,
                            "acc": correct})
    all_scores = [x for v in per_subject.values() for x in v]
    by_subject = {s: {**M.summarize("acc", v), "n": len(v)} for s, v in per_subject.items()}
    metrics = {**M.summarize("acc", all_scores),
               "acc_macro": sum(v["acc"] for v in by_subject.values()) / len(by_subject),
               "by_subject": by_subject}
    settings = {"num_fewshot": args.num_fewshot, "chat_template": args.chat_template,
                "fewshot": "first k rows of the subject's dev file",
                "choices": [x if args.chat_template else f" {x}" for x in LETTERS]}
    return Evaluation(metrics, predictions, settings, len(questions))


TASK = Task("mmlu", MmluArgs, load, evaluate)
