"""GSM8K, few-shot chain of thought (lm-evaluation-harness `gsm8k`, version 3).

Prompt: k training rows as "Question: <q>\\nAnswer: <full worked answer ending in #### n>\\n\\n", then
"Question: <q>\\nAnswer:". The rows are drawn per question as lm-evaluation-harness 0.4.13 draws them (its
default sampler: one `random.Random(1234)`, and for the i-th test question in file order the i-th
`sample(train, k)`), so given the same training file the prompts are the harness's; `--fewshot-sampler
first` gives every question the first k rows instead. Greedy until "Question:" (or </s>). Scored twice:
strict (the number after "#### ") and flexible (the last number in the output), each compared with the
reference number.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Literal

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, find_file, get_str, iter_jsonl
from eval.results import file_source, prompt_sha256
from jaxtrain.generate import FewShotPrompt, harness_ids

STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")
TEST_FILES = ["test.jsonl", "gsm8k_test.jsonl"]
TRAIN_FILES = ["train.jsonl", "gsm8k_train_fewshot.jsonl"]


@dataclasses.dataclass(frozen=True)
class Gsm8kExample:
    index: int
    question: str
    answer: str
    """The full reference solution, ending in "#### <number>"."""


def read_gsm8k(path: Path) -> list[Gsm8kExample]:
    """openai/grade-school-math JSONL: `question`, `answer` (worked solution, then `#### <number>`)."""
    examples = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        question, answer = get_str(obj, "question", where), get_str(obj, "answer", where)
        if "#### " not in answer:
            raise DataError(f"{where}: field 'answer' has no final '#### <number>'")
        examples.append(Gsm8kExample(len(examples), question, answer))
    return examples


def format_question(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def fewshot_prompt(question: str, shots: list[Gsm8kExample]) -> FewShotPrompt:
    return FewShotPrompt(format_question(question), tuple((format_question(s.question), s.answer) for s in shots))


def build_prompt(question: str, shots: list[Gsm8kExample]) -> str:
    """The plain-text prompt."""
    return fewshot_prompt(question, shots).text()


@dataclasses.dataclass(kw_only=True)
class Gsm8kArgs(CommonArgs):
    """GSM8K test accuracy with few-shot chain of thought. --data-file: the test JSONL (few-shot rows from
    --fewshot-file or train.jsonl / gsm8k_train_fewshot.jsonl beside it); --data-dir: a folder with both."""

    num_fewshot: int = 5
    """Worked training examples before each question."""
    fewshot_file: Path | None = None
    """JSONL of worked examples to draw from (default: the training file beside the data)."""
    fewshot_sampler: Literal["seeded", "first"] = "seeded"
    """seeded: per question, as lm-evaluation-harness 0.4.13 (`random.Random(--fewshot-seed)`, the i-th
    question gets the i-th `sample(rows, k)`, whatever --limit); first: the first k rows for every question."""
    fewshot_seed: int = 1234
    """Seed of the seeded sampler (the harness's default `fewshot_random_seed`)."""
    max_new_tokens: int = 256
    """Generation budget (the harness's default); decoding stops earlier at "Question:"."""
    chat_template: bool = False
    """The model's chat template as lm-evaluation-harness's `--apply_chat_template --fewshot_as_multiturn`: each
    worked example a user and an assistant turn, the question the last user turn, then the generation prompt."""


@dataclasses.dataclass
class Gsm8kData:
    test: list[Gsm8kExample]
    shots: list[list[Gsm8kExample]]
    """The worked examples of each test question, in prompt order."""


def draw_fewshot(pool: list[Gsm8kExample], num_questions: int, k: int, sampler: str,
                 seed: int) -> list[list[Gsm8kExample]]:
    """The few-shot rows of the first `num_questions` test questions. "seeded" is lm-evaluation-harness
    0.4.13's default `ContextSampler` when the few-shot split is not the test split: one `random.Random(seed)`
    shared by the task, advanced once per test document in order (`rnd.sample(fewshot_docs, k)`), so question
    i's rows depend on i only and a --limit run gets the first rows of the full run's draws."""
    if k == 0:
        return [[] for _ in range(num_questions)]
    if sampler == "first":
        return [pool[:k] for _ in range(num_questions)]
    rnd = random.Random(seed)
    return [rnd.sample(pool, k) for _ in range(num_questions)]


def load(args: Gsm8kArgs) -> LoadedData:
    check_source_args(args)
    sources = []
    if args.data_file is not None or args.data_dir is not None:
        test_path = args.data_file or find_file(args.data_dir, TEST_FILES, "GSM8K test")
        test = read_gsm8k(test_path)
        sources.append(file_source(test_path))
    else:
        from eval import tfds_builders

        records, source = tfds_builders.load_records("gsm8k", "test", data_dir=args.tfds_data_dir,
                                                     download=args.tfds_download)
        test = [Gsm8kExample(i, r["question"], r["answer"]) for i, r in enumerate(records)]
        sources.append(source)
    if args.num_fewshot == 0:
        shots = []
    elif args.fewshot_file is not None or args.data_file is not None or args.data_dir is not None:
        shot_path = args.fewshot_file or find_file(args.data_dir or args.data_file.parent, TRAIN_FILES, "GSM8K train")
        shots = read_gsm8k(shot_path)
        sources.append(file_source(shot_path))
    else:
        from eval import tfds_builders

        records, source = tfds_builders.load_records("gsm8k", "train", data_dir=args.tfds_data_dir,
                                                     download=args.tfds_download)
        shots = [Gsm8kExample(i, r["question"], r["answer"]) for i, r in enumerate(records)]
        sources.append(source)
    if len(shots) < args.num_fewshot:
        raise DataError(f"--num-fewshot {args.num_fewshot} but the few-shot file has only {len(shots)} rows")
    test = limited(test, args.limit)
    per_question = draw_fewshot(shots, len(test), args.num_fewshot, args.fewshot_sampler, args.fewshot_seed)
    return LoadedData(Gsm8kData(test, per_question), sources, len(test))


def evaluate(args: Gsm8kArgs, data: LoadedData, generator) -> Evaluation:
    gsm: Gsm8kData = data.examples
    texts = [fewshot_prompt(ex.question, shots).render(generator.tokenizer, chat=args.chat_template)
             for ex, shots in zip(gsm.test, gsm.shots, strict=True)]
    prompts = [harness_ids(generator.tokenizer, text) for text in texts]
    generations = generator.generate(prompts, max_new_tokens=args.max_new_tokens, stop_strings=STOP_STRINGS,
                                     progress=args.progress)
    strict, flexible, predictions = [], [], []
    for ex, shots, text, gen in zip(gsm.test, gsm.shots, texts, generations, strict=True):
        s, f = M.gsm8k_extract_strict(gen.text), M.gsm8k_extract_flexible(gen.text)
        strict.append(M.gsm8k_exact_match(s, ex.answer))
        flexible.append(M.gsm8k_exact_match(f, ex.answer))
        predictions.append({"index": ex.index, "question": ex.question, "target": M.gsm8k_gold_number(ex.answer),
                            "fewshot_rows": [shot.index for shot in shots],
                            "prompt_sha256": prompt_sha256(text),
                            "output": gen.text, "strict": s, "flexible": f,
                            "exact_match_strict": strict[-1], "exact_match_flexible": flexible[-1]})
    fewshot = ("first k rows of the training file" if args.fewshot_sampler == "first" else
               f"per question, random.Random({args.fewshot_seed}).sample(training rows, k) in question order "
               "(lm-evaluation-harness 0.4.13)")
    settings = {"num_fewshot": args.num_fewshot, "fewshot": fewshot, "fewshot_sampler": args.fewshot_sampler,
                "fewshot_seed": args.fewshot_seed, "chat_template": args.chat_template,
                "max_new_tokens": args.max_new_tokens, "stop_strings": list(STOP_STRINGS)}
    metrics = {**M.summarize("exact_match_strict", strict), **M.summarize("exact_match_flexible", flexible)}
    return Evaluation(metrics, predictions, settings, len(gsm.test))


TASK = Task("gsm8k", Gsm8kArgs, load, evaluate)
