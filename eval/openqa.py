"""Closed-book open-domain QA, 0-shot greedy: TriviaQA and NaturalQuestions-Open (lm-evaluation-harness
`triviaqa` v3 and `nq_open` v4).

Prompts: TriviaQA "Question: <q>?\\nAnswer:"; NQ-Open "Answer these questions:\\n\\nQ: <q>?\\nA:". Decoding
stops at a newline, "." or ",". The output is stripped and compared with every alias by the harness's
exact match (case and punctuation ignored; NQ-Open also ignores articles). The SQuAD-normalised alias
match is reported beside it as `exact_match_squad`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, find_file, get_str, get_str_list, iter_jsonl
from eval.results import file_source, prompt_sha256
from jaxtrain.generate import FewShotPrompt, harness_ids

STOP_STRINGS = ("\n", ".", ",")


@dataclasses.dataclass(frozen=True)
class QAExample:
    index: int
    question: str
    answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OpenQASpec:
    """What differs between the two tasks."""

    name: str
    tfds_name: str
    file_names: tuple[str, ...]
    description: str
    question_prefix: str
    answer_prefix: str
    em_regexes: tuple[str, ...]

    def fewshot_prompt(self, question: str) -> FewShotPrompt:
        return FewShotPrompt(f"{self.question_prefix}{question}?\n{self.answer_prefix}", description=self.description)

    def prompt(self, question: str) -> str:
        """The plain-text prompt."""
        return self.fewshot_prompt(question).text()


TRIVIAQA = OpenQASpec("triviaqa", "trivia_qa/rc.nocontext", ("triviaqa_sm_sub.jsonl", "triviaqa.jsonl"),
                      "", "Question: ", "Answer:", ())
NQ_OPEN = OpenQASpec("nq_open", "natural_questions_open", ("nq_open_dev.jsonl", "NQ-open.dev.jsonl"),
                     "Answer these questions:\n\n", "Q: ", "A:", (r"\b(?:The |the |An |A |The |a |an )",))


def _triviaqa_question(obj: dict, where: str) -> str:
    """`question`, or the question inside an llm-foundry `context` ("Question: <q>\\nAnswer:")."""
    if "question" in obj:
        return get_str(obj, "question", where)
    context = get_str(obj, "context", where)
    if not (context.startswith("Question: ") and context.endswith("\nAnswer:")):
        raise DataError(f"{where}: field 'context' must look like 'Question: ...\\nAnswer:', got {context!r:.80}")
    return context.removeprefix("Question: ").removesuffix("\nAnswer:")


def read_triviaqa(path: Path) -> list[QAExample]:
    """JSONL with `question` (or llm-foundry's `context`) and `aliases` (or `answer.aliases`, HF form)."""
    examples = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        question = _triviaqa_question(obj, where)
        if "aliases" not in obj and isinstance(obj.get("answer"), dict):
            aliases = get_str_list(obj["answer"], "aliases", f"{where}: answer")
        else:
            aliases = get_str_list(obj, "aliases", where)
        examples.append(QAExample(len(examples), question, tuple(aliases)))
    return examples


def read_nq_open(path: Path) -> list[QAExample]:
    """google-research-datasets/natural-questions NQ-open JSONL: `question`, `answer` (list of strings)."""
    examples = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        examples.append(QAExample(len(examples), get_str(obj, "question", where),
                                  tuple(get_str_list(obj, "answer", where))))
    return examples


READERS = {"triviaqa": read_triviaqa, "nq_open": read_nq_open}


def _from_tfds(spec: OpenQASpec, index: int, r: dict) -> QAExample:
    answers = r["answer"]["aliases"] if spec is TRIVIAQA else r["answer"]
    return QAExample(index, r["question"], tuple(answers))


@dataclasses.dataclass(kw_only=True)
class OpenQAArgs(CommonArgs):
    """Options shared by the closed-book QA tasks."""

    max_new_tokens: int = 256
    """Generation budget (the harness's default, 256); answers end earlier at the first newline, "." or ","."""
    chat_template: bool = False
    """The model's chat template as lm-evaluation-harness's `--apply_chat_template`: the description (NQ-Open's
    "Answer these questions:") as the system message, the question as the user turn, then the generation prompt."""


@dataclasses.dataclass(kw_only=True)
class TriviaqaArgs(OpenQAArgs):
    """TriviaQA (rc.nocontext validation) exact match against the aliases, 0-shot greedy. --data-file: JSONL
    with question (or llm-foundry's context) and aliases."""


@dataclasses.dataclass(kw_only=True)
class NqOpenArgs(OpenQAArgs):
    """NaturalQuestions-Open (dev) exact match against the answers, 0-shot greedy. --data-file: NQ-open JSONL
    with question and answer (a list)."""


def make_task(spec: OpenQASpec, args_type: type) -> Task:
    def load(args: OpenQAArgs) -> LoadedData:
        check_source_args(args)
        if args.data_file is not None or args.data_dir is not None:
            path = args.data_file or find_file(args.data_dir, list(spec.file_names), spec.name)
            examples, sources = READERS[spec.name](path), [file_source(path)]
        else:
            from eval import tfds_builders

            records, source = tfds_builders.load_records(spec.tfds_name, "validation", data_dir=args.tfds_data_dir,
                                                         download=args.tfds_download)
            examples, sources = [_from_tfds(spec, i, r) for i, r in enumerate(records)], [source]
        examples = limited(examples, args.limit)
        return LoadedData(examples, sources, len(examples))

    def evaluate(args: OpenQAArgs, data: LoadedData, generator) -> Evaluation:
        texts = [spec.fewshot_prompt(ex.question).render(generator.tokenizer, chat=args.chat_template)
                 for ex in data.examples]
        prompts = [harness_ids(generator.tokenizer, text) for text in texts]
        generations = generator.generate(prompts, max_new_tokens=args.max_new_tokens, stop_strings=STOP_STRINGS,
                                         progress=args.progress)
        em, em_squad, predictions = [], [], []
        for ex, text, gen in zip(data.examples, texts, generations, strict=True):
            answer = gen.text.strip()
            em.append(M.harness_exact_match(answer, ex.answers, ignore_case=True, ignore_punctuation=True,
                                            regexes_to_ignore=spec.em_regexes))
            em_squad.append(M.squad_exact_match(answer, ex.answers))
            predictions.append({"index": ex.index, "question": ex.question, "answers": list(ex.answers),
                                "prompt_sha256": prompt_sha256(text), "output": gen.text, "answer": answer,
                                "exact_match": em[-1], "exact_match_squad": em_squad[-1]})
        settings = {"num_fewshot": 0, "prompt": spec.prompt("{question}"), "chat_template": args.chat_template,
                    "max_new_tokens": args.max_new_tokens, "stop_strings": list(STOP_STRINGS)}
        metrics = {**M.summarize("exact_match", em), **M.summarize("exact_match_squad", em_squad)}
        return Evaluation(metrics, predictions, settings, len(data.examples))

    return Task(spec.name, args_type, load, evaluate)


TRIVIAQA_TASK = make_task(TRIVIAQA, TriviaqaArgs)
NQ_OPEN_TASK = make_task(NQ_OPEN, NqOpenArgs)
