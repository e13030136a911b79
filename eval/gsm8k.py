"""GSM8K, few-shot chain of thought (lm-evaluation-harness `gsm8k`, version 3).

Prompt: the first k training rows as "Question: <q>\\nAnswer: <full worked answer ending in #### n>\\n\\n",
then "Question: <q>\\nAnswer:". Greedy until "Question:" (or </s>). Scored twice: strict (the number after
"#### ") and flexible (the last number in the output), each compared with the reference number.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eval import metrics as M
from eval.common import CommonArgs, Evaluation, LoadedData, Task, check_source_args, limited
from eval.datafiles import DataError, find_file, get_str, iter_jsonl
from eval.results import file_source
from jaxtrain.generate import encode_generation_prompt

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


def build_prompt(question: str, shots: list[Gsm8kExample]) -> str:
    examples = "".join(f"{format_question(s.question)} {s.answer}\n\n" for s in shots)
    return examples + format_question(question)


@dataclasses.dataclass(kw_only=True)
class Gsm8kArgs(CommonArgs):
    """GSM8K test accuracy with few-shot chain of thought. --data-file: the test JSONL (few-shot rows from
    --fewshot-file or train.jsonl / gsm8k_train_fewshot.jsonl beside it); --data-dir: a folder with both."""

    num_fewshot: int = 5
    """Worked training examples before each question."""
    fewshot_file: Path | None = None
    """JSONL whose first --num-fewshot rows are the examples (default: the training file beside the data)."""
    max_new_tokens: int = 256
    """Generation budget (the harness's default); decoding stops earlier at "Question:"."""
    chat_template: bool = False
    """Send the whole few-shot prompt as one user turn of the model's chat template."""


@dataclasses.dataclass
class Gsm8kData:
    test: list[Gsm8kExample]
    shots: list[Gsm8kExample]


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
        shots = [Gsm8kExample(i, r["question"], r["answer"]) for i, r in enumerate(records[: args.num_fewshot])]
        sources.append(source)
    if len(shots) < args.num_fewshot:
        raise DataError(f"--num-fewshot {args.num_fewshot} but the few-shot file has only {len(shots)} rows")
    test = limited(test, args.limit)
    return LoadedData(Gsm8kData(test, shots[: args.num_fewshot]), sources, len(test))


def evaluate(args: Gsm8kArgs, data: LoadedData, generator) -> Evaluation:
    gsm: Gsm8kData = data.examples
    prompts = [encode_generation_prompt(generator.tokenizer, build_prompt(ex.question, gsm.shots),
                                        chat=args.chat_template) for ex in gsm.test]
    generations = generator.generate(prompts, max_new_tokens=args.max_new_tokens, stop_strings=STOP_STRINGS,
                                     progress=args.progress)
    strict, flexible, predictions = [], [], []
    for ex, gen in zip(gsm.test, generations, strict=True):
        s, f = M.gsm8k_extract_strict(gen.text), M.gsm8k_extract_flexible(gen.text)
        strict.append(M.gsm8k_exact_match(s, ex.answer))
        flexible.append(M.gsm8k_exact_match(f, ex.answer))
        predictions.append({"index": ex.index, "question": ex.question, "target": M.gsm8k_gold_number(ex.answer),
                            "output": gen.text, "strict": s, "flexible": f,
                            "exact_match_strict": strict[-1], "exact_match_flexible": flexible[-1]})
    settings = {"num_fewshot": args.num_fewshot, "fewshot": "first k rows of the training file",
                "chat_template": args.chat_template, "max_new_tokens": args.max_new_tokens,
                "stop_strings": list(STOP_STRINGS)}
    metrics = {**M.summarize("exact_match_strict", strict), **M.summarize("exact_match_flexible", flexible)}
    return Evaluation(metrics, predictions, settings, len(gsm.test))


TASK = Task("gsm8k", Gsm8kArgs, load, evaluate)
