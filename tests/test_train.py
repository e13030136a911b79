"""Training: answer-only loss against a hand computation, meshes agree, exact resume, NaN and SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_gen.shards import TokenizedExample, write_shards
from hf_reference import tiny_config
from jaxtrain import model
from jaxtrain.__main__ import main
from jaxtrain.checkpoint import Checkpointer, load_params_from_run
from jaxtrain.config import ModelConfig
from jaxtrain.train import _accumulate, _wrap_loss_sums, loss_sums

ROOT = Path(__file__).resolve().parents[1]


def write_random_shards(out, token_seed=0):
    """24 examples of 30-120 tokens with a 6-12 token answer at the end, in two buckets; the lengths are always
    the same, the tokens depend on `token_seed` (another data set of the same shape)."""
    rng, tokens = np.random.default_rng(0), np.random.default_rng(1000 + token_seed)
    examples = []
    for i in range(24):
        n = int(rng.integers(30, 121))
        ids = rng.integers(3, 32000, size=n).astype(np.int32)
        if token_seed:
            ids = tokens.integers(3, 32000, size=n).astype(np.int32)
        ids[0] = 1
        mask = np.zeros(n, bool)
        mask[n - int(rng.integers(6, 13)):] = True
        examples.append(TokenizedExample(id=f"ex{i}", input_ids=ids, loss_mask=mask))
    write_shards(examples, out, buckets=(64, 128), progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_random_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory):
    """Same bucket shapes and example counts as `shards`, other tokens."""
    return write_random_shards(tmp_path_factory.mktemp("other_shards"), token_seed=1)


def run_train(out, shards, *extra, devices=1, wait=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "jaxtrain", "train", "--model", "tiny", "--data", str(shards), "--out", str(out),
           "--global-batch", "8", "--lr", "3e-3", "--warmup-ratio", "0.2", "--no-progress", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_answer_only_loss_matches_hand_computation_and_accumulation():
    config = tiny_config(vocab_size=300)
    params = model.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 300, size=(4, 20)).astype(np.int32)
    mask = np.zeros((4, 20), bool)
    mask[0, 15:] = mask[1, 3:9] = mask[2, 19:] = True
    segments = np.ones((4, 20), np.int32)
    segments[3, 10:] = 0  # a padded row; its mask lies in the padding and must not count
    mask[3, 12:16] = True
    batch = {"input_ids": ids, "loss_mask": mask, "segment_ids": segments,
             "positions": np.tile(np.arange(20, dtype=np.int32), (4, 1))}
    logits = np.asarray(model.forward(config, params, jnp.asarray(ids)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected, count, correct = 0.0, 0, 0
    for b in range(3):
        for t in np.nonzero(mask[b])[0]:
            expected -= logp[b, t - 1, ids[b, t]]
            count += 1
            correct += int(np.argmax(logits[b, t - 1]) == ids[b, t])
    for k in (None, 8):
        loss, n, right = loss_sums(config, params, batch, k)
        assert float(n) == count and float(right) == correct
        assert float(loss) == pytest.approx(expected, rel=1e-5)

    grad_fn = jax.value_and_grad(lambda p, b: _wrap_loss_sums(config, p, b, 8), has_aux=True)
    (_, _), full = grad_fn(params, batch)
    accumulated, *_ = _accumulate(grad_fn, params, batch, 2)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(accumulated)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * (np.abs(np.asarray(a)).max() + 1e-12)


def test_one_device_and_sharded_meshes_give_the_same_losses(tmp_path, shards):
    runs = {"1 device": (1, []), "fsdp 8": (8, ["--mesh.fsdp", "8"]),
            "fsdp 4 x tensor 2": (8, ["--mesh.fsdp", "4", "--mesh.tensor", "2"])}
    losses = {}
    for name, (devices, flags) in runs.items():
        out = tmp_path / name.replace(" ", "_")
        result = run_train(out, shards, "--epochs", "1", *flags, devices=devices)
        assert result.returncode == 0, name + result.stderr[-3000:]
        losses[name] = [m["loss"] for m in metrics(out)]
    assert len(losses["1 device"]) == 4
    for name in runs:
        np.testing.assert_allclose(losses[name], losses["1 device"], atol=1e-5, rtol=0, err_msg=name)
    assert losses["1 device"][-1] < losses["1 device"][0]


def _wait_for(condition, process, timeout=240):
    start = time.time()
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError("timed out waiting for training progress")
        time.sleep(0.2)


def _complete_steps(run):
    return Checkpointer(run, read_only=True).steps() if (Path(run) / "checkpoints").exists() else []


def _same_params(a, b):
    (_, pa), (_, pb) = load_params_from_run(a), load_params_from_run(b)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_sigkill_then_resume_is_bit_identical_and_sigterm_saves(tmp_path, shards):
    flags = ("--epochs", "3", "--checkpoint.save-every", "2", "--checkpoint.no-async-save")
    reference = tmp_path / "uninterrupted"
    assert run_train(reference, shards, *flags).returncode == 0
    assert len(metrics(reference)) == 12

    killed = tmp_path / "killed"
    proc = run_train(killed, shards, *flags, wait=False)
    _wait_for(lambda: any(s >= 4 for s in _complete_steps(killed)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_complete_steps(killed)) < 12
    resumed = run_train(killed, shards, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_params(reference, killed)

    preempted = tmp_path / "preempted"
    proc = run_train(preempted, shards, *flags, wait=False)
    _wait_for(lambda: (preempted / "metrics.jsonl").exists() and len(metrics(preempted)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]  # EX_TEMPFAIL: `train && export` must not go on
    assert "preemption: saved step" in out
    saved = max(_complete_steps(preempted))
    assert saved == metrics(preempted)[-1]["step"] < 12
    resumed = run_train(preempted, shards, *flags, "--resume")
    assert resumed.returncode == 0
    assert f"resumed from {preempted / 'checkpoints' / str(saved)} (step {saved} of 12)" in resumed.stdout
    _same_params(reference, preempted)
    assert [m["step"] for m in metrics(preempted)] == list(range(1, 13))


@pytest.mark.parametrize("lr, stop, discarded", [
    ("1e15", "non-finite loss (nan) or gradient norm (nan) at step 3", ["2-nonfinite"]),
    ("1e30", "the update of step 2 made the weights non-finite (parameter norm inf", None),
])
def test_a_run_that_diverges_keeps_its_last_good_checkpoint(tmp_path, shards, lr, stop, discarded):
    """Step 1 runs at lr 0 (warm-up) and leaves the weights as initialised; step 2's update explodes them. At lr
    1e15 they stay finite (~4e14, parameter norm 4e17), step 2 is saved, and step 3's loss is NaN: the checkpoint
    of step 2 holds the weights that gave it. At lr 1e30 the weights' norm overflows at step 2, which is never
    saved. Either way the last good checkpoint is step 1's, which keep=1 rotation must not have deleted."""
    out = tmp_path / "nan"
    result = run_train(out, shards, "--lr", lr, "--warmup-ratio", "0.5", "--max-steps", "6",
                       "--checkpoint.save-every", "1", "--checkpoint.keep", "1", "--checkpoint.no-async-save")
    assert result.returncode == 1
    assert f"error: {stop}" in result.stderr and "batch of examples ['ex" in result.stderr
    assert "the last good checkpoint is step 1" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert _complete_steps(out) == [1]
    (_, params) = load_params_from_run(out)
    # lr 0 at step 1: the weights as `train` initialises them (jitted, like init_state)
    initial = jax.jit(lambda key: model.init_params(ModelConfig.preset("tiny"), key))(jax.random.key(0))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(initial)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert (sorted(os.listdir(out / "discarded")) if (out / "discarded").exists() else None) == discarded


def test_bad_mesh_is_a_clear_error(tmp_path, shards):
    result = run_train(tmp_path / "bad", shards, "--mesh.fsdp", "3", devices=8)
    assert result.returncode == 1
    assert "bad mesh" in result.stderr and "Traceback" not in result.stderr


# --- run folders are never silently overwritten --------------------------------------------------------------

FOUR_STEPS = ("--max-steps", "4", "--checkpoint.save-every", "2", "--checkpoint.no-async-save")


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, shards):
    """A finished run of 4 steps with checkpoints 2 and 4; tests work on copies."""
    run = tmp_path_factory.mktemp("four") / "run"
    result = run_train(run, shards, *FOUR_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    (run.parent / "stdout.txt").write_text(result.stdout)  # for test_train_says_what_it_does_and_what_comes_next
    return run


def _files(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(Path(run).rglob("*")) if p.is_file()}


def _cli(capsys, *args):
    """`python -m jaxtrain ARGS` in this process: (exit status, stderr)."""
    status = main(list(map(str, args)))
    return status, capsys.readouterr().err


def test_a_run_folder_needs_resume_or_overwrite_and_resume_needs_the_same_shards(tmp_path, shards, other_shards,
                                                                                  four_steps, capsys):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    before = _files(run)
    base = ["train", "--model", "tiny", "--out", run, "--global-batch", "8", "--no-progress", "--max-steps", "2"]

    status, err = _cli(capsys, *base, "--data", shards, "--seed", "7")
    assert status == 1 and err.count("\n") == 1
    assert f"error: {run} holds a training run" in err and "--resume" in err and "--overwrite" in err
    status, err = _cli(capsys, *base, "--data", other_shards, "--resume")
    assert status == 1 and err.count("\n") == 1
    assert str(shards) in err and str(other_shards) in err
    status, err = _cli(capsys, *base, "--data", shards, "--resume", "--overwrite")
    assert status == 1 and "exclude each other" in err
    assert _files(run) == before  # nothing touched

    new = run_train(run, other_shards, "--max-steps", "2", "--seed", "7", "--overwrite",
                    "--checkpoint.save-every", "2", "--checkpoint.no-async-save")
    assert new.returncode == 0, new.stderr[-3000:]
    assert os.listdir(run / "checkpoints") == ["2"]
    assert [m["step"] for m in metrics(run)] == [1, 2]  # the old run's checkpoints 2 and 4 are gone


def test_resume_replaces_the_metrics_of_redone_steps(tmp_path, shards, four_steps):
    run = tmp_path / "run"
    shutil.copytree(four_steps, run)
    original = metrics(run)
    shutil.rmtree(run / "checkpoints" / "4")  # as if killed after logging step 4, before its checkpoint
    resumed = run_train(run, shards, *FOUR_STEPS, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / '2'} (step 2 of 4)" in resumed.stdout
    again = metrics(run)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    exact = ("loss", "grad_norm", "accuracy", "lr")  # bit-identical resume: the redone steps log the same values
    assert [{k: m[k] for k in exact} for m in again] == [{k: m[k] for k in exact} for m in original]


@pytest.mark.parametrize("flags, message", [
    (("--lr", "-1e-5"), "--lr must be positive"),
    (("--epochs", "0"), "--epochs must be at least 1"),
    (("--max-steps", "0"), "--max-steps must be at least 1"),
])
def test_impossible_settings_are_refused_before_anything_is_written(tmp_path, shards, capsys, flags, message):
    out = tmp_path / "run"
    status, err = _cli(capsys, "train", "--model", "tiny", "--data", shards, "--out", out, "--global-batch", "8",
                       "--no-progress", *flags)
    assert status == 1 and message in err and err.count("\n") == 1
    assert not out.exists()


# --- what the commands print ---------------------------------------------------------------------------------

def test_train_says_what_it_does_and_what_comes_next(four_steps, shards):
    """The start and end summaries of the 4-step run, line for line, against what is known independently: the
    tiny preset's parameters counted by hand, the data's 24 examples in 4 batches of 8 an epoch (the existing
    mesh test runs an epoch in 4 steps), the last loss in metrics.jsonl and the checkpoint on disk."""
    vocab, d, layers, heads, kv, head_dim, mlp = 32000, 64, 2, 4, 2, 16, 192
    params = 2 * vocab * d + layers * (d * head_dim * (2 * heads + 2 * kv) + 3 * d * mlp + 2 * d) + d
    assert params == 4_194_624
    lines = (four_steps.parent / "stdout.txt").read_text().splitlines()
    assert lines[:4] == [
        "train: tiny: full finetune of 4.2M parameters (float32 weights, float32 compute, remat none)",
        f"  data: {shards}: 24 examples; 4 steps an epoch x 2 epochs, stopping at --max-steps 4; 8 rows a step",
        "  optimizer: AdamW, lr 0.003 (linear, 1 warm-up steps), seed 0",  # round(0.2 * 4)
        "  mesh: data 1 x fsdp 1 x tensor 1 over 1 cpu device; from random weights (seed 0)"]
    last = metrics(four_steps)[-1]
    assert last["step"] == 4 and (four_steps / "checkpoints" / "4").is_dir()
    head, checkpoint, nxt = lines[-3:]
    assert head.startswith("done: 4 steps in ") and head.endswith(
        f" s; last step: loss {last['loss']:.4f}, answer-token accuracy {last['accuracy']:.3f}")
    assert checkpoint == f"  checkpoint: {four_steps / 'checkpoints' / '4'}"
    assert nxt == f"  next: python -m jaxtrain export --checkpoint {four_steps} --out HF_DIR"


def test_usage_names_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m jaxtrain [-h]")


def test_model_beside_init_from_must_be_its_architecture(tmp_path, shards, tiny_model, capsys):
    """With --init-from the folder's config.json is what trains: a --model preset of another shape is refused
    naming both (before anything is written), the matching preset is accepted, and the run records the folder."""
    out = tmp_path / "run"
    base = ["train", "--data", shards, "--out", out, "--global-batch", "8", "--no-progress", "--max-steps", "1",
            "--init-from", tiny_model]
    status, err = _cli(capsys, *base, "--model", "mistral-7b-v0.1")
    assert status == 1 and err.count("\n") == 1 and not out.exists()
    assert err.startswith(f"error: --model mistral-7b-v0.1 and --init-from {tiny_model} are different architectures")
    assert "hidden_size 4096 vs 64" in err and "num_layers 32 vs 2" in err and "drop --model" in err
    assert "vocab_size" not in err  # both have 32000 tokens: only what differs is listed

    assert main([str(a) for a in (*base, "--model", "tiny")]) == 0
    printed = capsys.readouterr().out
    with Checkpointer(out, read_only=True) as ckpt:
        _, _, metadata = ckpt.read_json()
    assert metadata["train_config"]["model"] == str(tiny_model)
    assert f"train: {tiny_model}: full finetune of 4.2M parameters" in printed
    assert f"; from {tiny_model}\n" in printed
