"""tensorflow-datasets access without TensorFlow: our builders for MDQA and MMLU, and a loader for all tasks.

TFDS 4.9 can prepare and read datasets in the `array_record` file format with numpy only (TensorFlow is
needed only for the default tfrecord format and `tf.data`). So every dataset here is prepared with
`file_format="array_record"` and read through `as_data_source` (random access, numpy/bytes values).
A dataset prepared earlier in tfrecord format cannot be read without TensorFlow; prepare it again into
another `--tfds-data-dir`.

Our builders read the standard files from a manual directory (nothing to download):
- `needles_mdqa/<N>_documents`: the "Lost in the Middle" `nq-open-<N>_total_documents_gold_at_<k>.jsonl.gz`
  files (split "test": every gold position) and `nq-open-oracle.jsonl.gz` (split "oracle"), if present;
- `needles_mmlu`: Hendrycks' MMLU CSVs in `dev/`, `test/` (and `val/`), split by folder.
Records are stored in TFDS's hashed order, so each carries its position in the source file
(`example_index` / `row`) and the readers sort on it.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import numpy as np

from eval import readers
from eval.datafiles import DataError

try:
    import tensorflow_datasets as tfds
except ImportError as e:
    raise DataError("reading data through tensorflow-datasets needs it installed (pip install 'needles[eval]'); "
                    "or pass the standard file with --data-file/--data-dir") from e

# Standard builders live in modules that TFDS imports lazily (through TensorFlow-dependent code paths);
# importing the module itself registers the builder without TensorFlow.
STANDARD_BUILDER_MODULES = {
    "gsm8k": "tensorflow_datasets.text.gsm8k",
    "hellaswag": "tensorflow_datasets.text.hellaswag",
    "natural_questions_open": "tensorflow_datasets.question_answering.natural_questions_open",
    "trivia_qa": "tensorflow_datasets.question_answering.trivia_qa",
}


@dataclasses.dataclass
class MdqaConfig(tfds.core.BuilderConfig):
    num_documents: int = 20


class NeedlesMdqa(tfds.core.GeneratorBasedBuilder):
    """Multi-document QA ("Lost in the Middle", NaturalQuestions-Open) from the released files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [MdqaConfig(name=f"{n}_documents", num_documents=n) for n in (10, 20, 30)]
    DEFAULT_CONFIG_NAME = "20_documents"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the qa_data files of https://github.com/nelson-liu/lost-in-the-middle directly in manual_dir, flat: "
        "nq-open-<N>_total_documents_gold_at_<k>.jsonl.gz for the configuration's N (10: k = 0, 4, 9; 20: 0, 4, 9, "
        "14, 19; 30: 0, 4, 9, 14, 19, 24, 29) and optionally nq-open-oracle.jsonl.gz. The release keeps them in "
        "qa_data/<N>_total_documents/; `python -m eval mdqa-layout --source <checkout> --out <manual_dir>` copies "
        "them into one folder."
    )

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(),
                "answers": tfds.features.Sequence(tfds.features.Text()),
                "ctxs": tfds.features.Sequence({
                    "title": tfds.features.Text(),
                    "text": tfds.features.Text(),
                    "isgold": np.bool_,
                }),
                "gold_index": np.int32,
                "example_index": np.int32,
            }),
            homepage="https://github.com/nelson-liu/lost-in-the-middle",
        )

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        files = readers.find_position_files(manual, self.builder_config.num_documents)
        splits = {"test": self._generate_examples(list(files.values()))}
        oracle = readers.find_oracle_file(manual)
        if oracle is not None:
            splits["oracle"] = self._generate_examples([oracle])
        return splits

    def _generate_examples(self, paths):
        for path in paths:
            for ex in readers.read_mdqa_file(path):
                yield f"{path.name}:{ex.index}", {
                    "question": ex.question,
                    "answers": list(ex.answers),
                    "ctxs": [{"title": d.title, "text": d.text, "isgold": d.isgold} for d in ex.documents],
                    "gold_index": ex.gold_index,
                    "example_index": ex.index,
                }


class NeedlesMmlu(tfds.core.GeneratorBasedBuilder):
    """MMLU (Hendrycks et al.) from the released CSV files, one split per folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract https://people.eecs.berkeley.edu/~hendrycks/data.tar so that manual_dir holds dev/ and test/ "
        "(and optionally val/) with <subject>_<split>.csv files."
    )

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "subject": tfds.features.Text(),
                "question": tfds.features.Text(),
                "choices": tfds.features.Sequence(tfds.features.Text(), length=4),
                "answer": np.int32,
                "row": np.int32,
            }),
            homepage="https://github.com/hendrycks/test",
        )

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        splits = {}
        for split, folder in (("test", "test"), ("dev", "dev"), ("validation", "val")):
            if (manual / folder).is_dir():
                splits[split] = self._generate_examples(manual / folder, folder)
        if "test" not in splits or "dev" not in splits:
            raise DataError(f"{manual}: expected dev/ and test/ folders of MMLU CSV files")
        return splits

    def _generate_examples(self, folder: Path, split: str):
        for subject, path in readers.find_subject_files(folder, split).items():
            for q in readers.read_mmlu_csv(path, subject):
                yield f"{subject}:{q.row}", {"subject": subject, "question": q.question, "choices": list(q.choices),
                                              "answer": q.answer, "row": q.row}


def to_python(value: Any) -> Any:
    """TFDS numpy values as plain Python: bytes -> str, arrays -> lists, numpy scalars -> int/float/bool."""
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()] if value.ndim else to_python(value.item())
    if isinstance(value, list | tuple):
        return [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def prepared_builder(name: str, *, data_dir: Path | None, download: bool, manual_dir: Path | None = None):
    """The TFDS builder of `name` (e.g. "trivia_qa/rc.nocontext"), prepared in array_record format if it is
    not yet and `download` allows it."""
    base = name.split("/")[0]
    if base in STANDARD_BUILDER_MODULES:
        importlib.import_module(STANDARD_BUILDER_MODULES[base])
    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir), file_format="array_record")
    if not builder.is_prepared():
        if not download:
            raise DataError(f"tfds dataset {name} is not prepared in {builder.data_dir}; allow preparing it "
                            "(--tfds-download) or pass the standard file with --data-file/--data-dir")
        config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir))
        try:
            builder.download_and_prepare(download_config=config)
        except ModuleNotFoundError as e:
            if e.name != "importlib_resources":
                raise
            # TFDS imports it to locate a builder's code but does not declare it (newer etils dropped it).
            raise DataError("tensorflow-datasets needs the importlib_resources package to prepare datasets: "
                            "pip install importlib_resources") from None
    return builder


def read_split(builder, split: str) -> tuple[list[dict], dict]:
    """All records of `split` as Python dicts, and the results.json source entry."""
    source = builder.as_data_source(split=split)
    records = [to_python(source[i]) for i in range(len(source))]
    return records, {"kind": "tfds", "name": builder.info.full_name, "split": split,
                     "version": str(builder.version), "data_dir": str(builder.data_dir)}


def load_records(name: str, split: str, *, data_dir: Path | None, download: bool,
                 manual_dir: Path | None = None) -> tuple[list[dict], dict]:
    """`read_split` of a `prepared_builder`."""
    builder = prepared_builder(name, data_dir=data_dir, download=download, manual_dir=manual_dir)
    return read_split(builder, split)
