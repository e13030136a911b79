"""The tensorflow-datasets path, without TensorFlow: our builders prepared for real from the shared files (manual
dir), the standard gsm8k builder prepared offline from the shared file, the other standard builders through
`tfds.testing.mock_data`. Data read through tfds must equal data read from the files."""

from pathlib import Path
from unittest import mock

import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from eval import gsm8k, hellaswag, mdqa, mmlu, openqa  # noqa: E402
from eval import tfds_builders as tb  # noqa: E402


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


def test_mdqa_builder_matches_files(shared_data, tfds_dir):
    common = dict(model="m", out="o", limit=4)
    via_tfds = mdqa.load(mdqa.MdqaArgs(**common, tfds_data_dir=tfds_dir, tfds_manual_dir=shared_data / "mdqa"))
    via_files = mdqa.load(mdqa.MdqaArgs(**common, data_dir=shared_data / "mdqa"))
    assert via_tfds.examples == via_files.examples
    assert list(via_tfds.examples) == ["1", "5", "10", "15", "20", "oracle"]
    assert {s["kind"] for s in via_tfds.sources} == {"tfds"}
    # Prepared once: a second load reads it without the manual dir and without preparing.
    again = mdqa.load(mdqa.MdqaArgs(**common, tfds_data_dir=tfds_dir, tfds_download=False))
    assert again.examples == via_files.examples


def test_mmlu_builder_matches_files(shared_data, tfds_dir):
    common = dict(model="m", out="o", subjects=("abstract_algebra", "medical_genetics"))
    via_tfds = mmlu.load(mmlu.MmluArgs(**common, tfds_data_dir=tfds_dir, tfds_manual_dir=shared_data / "mmlu"))
    via_files = mmlu.load(mmlu.MmluArgs(**common, data_dir=shared_data / "mmlu"))
    assert via_tfds.examples.test == via_files.examples.test
    assert via_tfds.examples.dev["abstract_algebra"] == via_files.examples.dev["abstract_algebra"]


def test_unprepared_dataset_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(tb.DataError, match="needles_mmlu is not prepared"):
        mmlu.load(mmlu.MmluArgs(model="m", out="o", tfds_data_dir=tmp_path, tfds_download=False))


def test_standard_gsm8k_builder_prepared_offline(shared_data, tmp_path):
    """The real `gsm8k` builder, its download replaced by the shared test file (every split gets it)."""
    local = str(shared_data / "gsm8k" / "gsm8k_test.jsonl")
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           lambda self, urls: {k: local for k in urls}):
        data = gsm8k.load(gsm8k.Gsm8kArgs(model="m", out="o", tfds_data_dir=tmp_path, num_fewshot=3))
    from_file = {ex.question: ex.answer for ex in gsm8k.read_gsm8k(shared_data / "gsm8k" / "gsm8k_test.jsonl")}
    assert data.num_examples == 200
    assert {ex.question: ex.answer for ex in data.examples.test} == from_file  # same rows, TFDS's order
    shots = data.examples.shots
    assert len(shots) == 200 and all(len(q) == 3 and all(s.question in from_file for s in q) for q in shots)


@pytest.mark.parametrize("task, args_type", [
    (openqa.TRIVIAQA_TASK, openqa.TriviaqaArgs),
    (openqa.NQ_OPEN_TASK, openqa.NqOpenArgs),
    (gsm8k.TASK, gsm8k.Gsm8kArgs),
])
def test_standard_builders_with_random_mock_data(task, args_type):
    """Random records with the real builders' feature specs: our field names and decoding fit them."""
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        data = task.load(args_type(model="m", out="o", limit=3))
    assert data.num_examples == 3 and data.sources[0]["kind"] == "tfds"
    examples = data.examples.test if task is gsm8k.TASK else data.examples
    for ex in examples:
        assert isinstance(ex.question, str) and ex.question
        if task is not gsm8k.TASK:
            assert ex.answers and all(isinstance(a, str) for a in ex.answers)


def test_hellaswag_through_tfds_data_source():
    """HellaSwag labels and ending counts are constrained, so the mocked source serves a hand-written record in
    TFDS's numpy form (bytes, arrays) with exactly the real builder's features."""
    import numpy as np

    record = {"activity_label": b"Roof shingle removal", "context": b"A man is sitting on a roof. he",
              "endings": np.array([b"is [title] using wrap.", b"b", b"c", b"d"], dtype=object),
              "label": np.int32(3), "split_type": b"indomain", "source_id": b"activitynet~v_-JhWjGDPHMY"}
    import tensorflow_datasets.text.hellaswag  # noqa: F401  (registers the builder)

    assert set(tfds.builder_cls("hellaswag")(file_format="array_record").info.features) == set(record)

    def source(self, split, **kwargs):
        assert (self.name, split) == ("hellaswag", "validation")
        return [record, record]

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=source):
        data = hellaswag.load(hellaswag.HellaswagArgs(model="m", out="o"))
    assert data.num_examples == 2
    ex = data.examples[0]
    assert ex.query == "Roof shingle removal: A man is sitting on a roof. He"
    assert ex.choices == ("is. using wrap.", "b", "c", "d") and ex.label == 3


def test_to_python_decodes_tfds_values():
    import numpy as np

    value = {"a": b"caf\xc3\xa9", "b": np.array([b"x", b"y"]), "c": np.int32(3), "d": [np.bool_(True)]}
    assert tb.to_python(value) == {"a": "café", "b": ["x", "y"], "c": 3, "d": [True]}
