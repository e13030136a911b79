"""`python -m eval` on a LoRA training run, a PEFT adapter folder and int8 bases: unmerged adapters answer
exactly like the run's merged export (`python -m jaxtrain export`, read back as a plain Hugging Face folder),
an int8 base decodes end to end, and wrong combinations of options stop with a clear error."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest
from tiny_runs import save_decisive_tiny, write_lora_run

from data_gen import tasks as data_tasks
from eval.__main__ import main
from jaxtrain import lora, model, peft_io, runs
from jaxtrain.__main__ import main as jaxtrain_main
from jaxtrain.checkpoint import CheckpointConfig, Checkpointer
from jaxtrain.config import ModelConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base model (HF folder, decisive greedy choices: no coin flips between runs), a LoRA run on it
    holding random non-zero adapters, and four held-out synthetic samples."""
    root = tmp_path_factory.mktemp("eval_lora")
    save_decisive_tiny(root / "base")
    write_lora_run(root / "run", root / "base")
    data_tasks.generate(data_tasks.PRESETS["demo-simple"].replace(num_train=0, num_eval=4), 0, root / "data",
                        progress=False)
    return root


def evaluate(root, model, out, *flags):
    results = main(["synthetic", "--model", str(model), "--out", str(out), "--data-dir", str(root / "data"),
                    "--max-new-tokens", "6", "--batch-size", "4", "--compute-dtype", "float32", "--no-progress",
                    *flags])
    outputs = [json.loads(line)["output"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(outputs) == 4
    return results["model"], outputs


def test_lora_run_answers_like_its_merged_export(setup, tmp_path):
    root = setup
    assert jaxtrain_main(["export", "--checkpoint", str(root / "run"), "--out", str(tmp_path / "merged"),
                          "--dtype", "float32", "--merged"]) == 0
    assert jaxtrain_main(["export", "--checkpoint", str(root / "run"), "--out", str(tmp_path / "peft"), "--peft"]) == 0

    exported, reference = evaluate(root, tmp_path / "merged", tmp_path / "e")
    assert exported["kind"] == "hf_folder" and exported["adapters"] is None
    _, base_outputs = evaluate(root, root / "base", tmp_path / "b")
    assert base_outputs != reference  # the adapters change the answers, so applying them is tested

    unmerged, outputs = evaluate(root, root / "run", tmp_path / "u", "--base-dtype", "float32")
    assert outputs == reference
    assert unmerged["kind"] == "lora_run" and unmerged["base"]["path"] == str((root / "base").resolve())
    assert len(unmerged["base"]["sha256"]) == 64 and unmerged["base"]["dtype"] == "float32"
    assert unmerged["adapters"] | {"source": None} == {"source": None, "rank": 4, "alpha": 8.0,
                                                       "targets": ["q", "v", "o", "down"], "merged": False}
    merged, outputs = evaluate(root, root / "run", tmp_path / "m", "--merge-adapters")
    assert outputs == reference and merged["adapters"]["merged"] and merged["base"]["dtype"] == "float32"
    peft, outputs = evaluate(root, tmp_path / "peft", tmp_path / "p", "--base", str(root / "base"))
    assert outputs == reference and peft["kind"] == "peft_adapters" and not peft["adapters"]["merged"]


def test_int8_base_end_to_end(setup, tmp_path):
    """int8 base + unmerged adapters, the base read from a moved copy (--base, checked by sha256)."""
    root = setup
    moved = tmp_path / "moved-base"
    shutil.copytree(root / "base", moved)
    info, outputs = evaluate(root, root / "run", tmp_path / "q", "--base-dtype", "int8", "--base", str(moved))
    assert info["base"] | {"sha256": None} == {"path": str(moved.resolve()), "sha256": None, "dtype": "int8"}
    assert info["adapters"]["merged"] is False and all(isinstance(o, str) for o in outputs)
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["settings"]["base_dtype"] == "int8"
    info, _ = evaluate(root, root / "base", tmp_path / "h", "--base-dtype", "int8")
    assert info["kind"] == "hf_folder" and info["base"]["dtype"] == "int8"


def test_step_picks_the_checkpoint_of_a_run(setup, tmp_path):
    """--step N evaluates that checkpoint: the run gets a newer step 5 with zero adapters (the base model's
    answers); without --step that one is used, with --step 3 the original adapters (the answers of the run as
    written, which holds step 3 only); a step that is not there is named with the ones that are."""
    root = setup
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    config = ModelConfig.from_pretrained(root / "base")
    with Checkpointer(run, read_only=True) as ckpt:
        _, _, metadata = ckpt.read_json()
    cfg = runs.run_settings(metadata)[0]
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model.adapter_shapes(config, cfg))
    with Checkpointer(run, CheckpointConfig(save_every=1, keep=5, async_save=False), model_config=config,
                      metadata=metadata) as ckpt:
        ckpt.save(5, params=zeros, opt_state=optax.adamw(1e-3).init(zeros), force=True)

    _, base_outputs = evaluate(root, root / "base", tmp_path / "b", "--base-dtype", "float32")
    _, step3_outputs = evaluate(root, root / "run", tmp_path / "r", "--base-dtype", "float32")
    assert step3_outputs != base_outputs
    newest, outputs = evaluate(root, run, tmp_path / "n", "--base-dtype", "float32")
    assert newest["step"] == 5 and outputs == base_outputs
    chosen, outputs = evaluate(root, run, tmp_path / "s", "--base-dtype", "float32", "--step", "3")
    assert chosen["step"] == 3 and outputs == step3_outputs
    assert chosen["adapters"]["source"] == f"{run.resolve()} (step 3)"


@pytest.mark.parametrize("flags, message", [
    (["--model", "{peft}"], "give --base HF_DIR"),
    (["--model", "{run}", "--base-dtype", "int8", "--merge-adapters"], "merging dequantises"),
    (["--model", "{base}", "--merge-adapters"], "no adapters to merge"),
    (["--model", "{base}", "--base", "{base}"], "--base is for a LoRA run or a PEFT adapter folder"),
    (["--model", "{run}", "--dtype", "bfloat16", "--base-dtype", "int8"], "not both"),
    (["--model", "{run}", "--base", "{other}"], "is not the one this run was trained on"),
    (["--model", "{peft}", "--base", "{run}"], "not a Hugging Face model folder"),
    (["--model", "{base}", "--step", "3"], "--step 3: --model {base} is a Hugging Face folder, which has no "
                                           "checkpoints"),
    (["--model", "{run}", "--step", "4"], "--step 4: "),
])
def test_bad_combinations_are_refused(setup, tmp_path, capsys, flags, message):
    root = setup
    tiny = ModelConfig.from_pretrained(root / "base")
    paths = {"peft": tmp_path / "peft", "run": root / "run", "base": root / "base", "other": tmp_path / "other"}
    if "{peft}" in flags:
        cfg = lora.LoraConfig(rank=2)
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), model.adapter_shapes(tiny, cfg))
        peft_io.save_peft(paths["peft"], tiny, lora.Adapters(zeros, cfg))
    if "{other}" in flags:  # another model: same weights, different config.json (so a different sha256)
        shutil.copytree(root / "base", paths["other"])
        config = json.loads((paths["other"] / "config.json").read_text())
        (paths["other"] / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    argv = ["synthetic", "--out", str(tmp_path / "out"), "--data-dir", str(root / "data"), "--no-progress",
            *(f.format(**paths) for f in flags)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message.format(**paths) in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
