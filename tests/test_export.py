"""`python -m jaxtrain export` under hostile use: an existing export is replaced whole (no stale shard or index
left for a loader to read), a folder that holds no model is never replaced, files get ordinary modes, and a
damaged newest checkpoint is not exported."""

import os
import shutil
import stat

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from jaxtrain import runs
from jaxtrain.checkpoint import CheckpointConfig, Checkpointer
from jaxtrain.config import ModelConfig
from jaxtrain.hf_io import INDEX_FILE, load_pretrained
from jaxtrain.model import init_params

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A full-finetune run with checkpoints 1 and 2 of different weights; returns (run, params 1, params 2)."""
    folder = tmp_path_factory.mktemp("export") / "run"
    first = jax.device_put(init_params(TINY, jax.random.key(0)), jax.devices()[0])
    second = jax.tree.map(lambda x: x + 0.5, first)
    with Checkpointer(folder, CheckpointConfig(save_every=1), model_config=TINY) as ckpt:
        for step, params in ((1, first), (2, second)):
            ckpt.save(step, params=params, opt_state={"count": jax.numpy.zeros(())}, data_state={})
    return folder, first, second


def _embedding(params):
    return np.asarray(params["embed"]).astype(np.float32)


def test_export_replaces_a_sharded_export_whole_and_writes_ordinary_modes(tmp_path, run):
    folder, first, second = run
    out, fresh = tmp_path / "hf", tmp_path / "fresh"
    old_umask = os.umask(0o022)
    try:
        runs.export_run(folder, out, step=1, max_shard_size="2MB")
        assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
        runs.export_run(folder, out, dtype="float32")
        runs.export_run(folder, fresh, dtype="float32")
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))  # no stale shard or index
    assert not (out / INDEX_FILE).exists()
    for path in [out, *out.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    assert not [p for p in tmp_path.iterdir() if p.name not in ("hf", "fresh")]  # no temporary folder left
    # Both loaders read step 2's weights: ours, transformers, and the file itself.
    expected = _embedding(second)
    np.testing.assert_array_equal(load_file(out / "model.safetensors")["model.embed_tokens.weight"], expected)
    np.testing.assert_array_equal(_embedding(load_pretrained(out)[1]), expected)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().numpy(), expected)


def test_export_never_replaces_a_folder_that_holds_no_model(tmp_path, run):
    folder, _, _ = run
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=rf"^{notes}: .*no exported model"):
        runs.export_run(folder, notes)
    assert os.listdir(notes) == ["todo.txt"] and (notes / "todo.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="no exported model"):
        runs.export_run(folder, notes / "todo.txt")


def test_export_and_eval_skip_a_damaged_newest_checkpoint(tmp_path, run, capsys):
    folder, first, _ = run
    damaged = tmp_path / "run"
    shutil.copytree(folder, damaged)
    data = [p for p in (damaged / "checkpoints" / "2" / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(data, key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    runs.export_run(damaged, tmp_path / "hf", dtype="float32")
    assert f"{damaged / 'checkpoints' / '2'} is damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(load_file(tmp_path / "hf" / "model.safetensors")["model.embed_tokens.weight"],
                                  _embedding(first))
    loaded = runs.load_run(damaged)  # what `python -m eval --model RUN` decodes with
    assert loaded.step == 1
    np.testing.assert_array_equal(_embedding(loaded.params), _embedding(first))
