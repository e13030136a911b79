"""Orbax checkpoints: bit-identical round trip, restore onto another mesh, keep-last-K, half-written steps."""

import logging
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxtrain.checkpoint import (  # noqa: E402
    CheckpointConfig, Checkpointer, abstract_state, latest_step, load_params_from_run, restore)
from jaxtrain.config import ModelConfig  # noqa: E402
from jaxtrain.sharding import MeshConfig, make_mesh  # noqa: E402

TINY = ModelConfig.preset("tiny")
AXES = {"embed": P("fsdp", None), "layers": {"w": P(None, "fsdp", "tensor"), "norm": P()}}


@pytest.fixture(scope="module")
def cpus():
    devices = jax.devices("cpu")
    assert len(devices) == 8, "needs XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX initialises"
    return devices


def shardings_on(mesh):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), AXES, is_leaf=lambda x: isinstance(x, P))


def trained_state(mesh):
    """Params (fp32 and bf16 leaves) and an AdamW state after two real updates, sharded on ``mesh``."""
    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(16, 8)).astype(np.float32),
              "layers": {"w": rng.normal(size=(2, 8, 4)).astype(jnp.bfloat16),
                         "norm": rng.normal(size=(8,)).astype(np.float32)}}
    params = jax.device_put(params, shardings_on(mesh))
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = tx.init(params)

    @jax.jit
    def update(params, opt_state):
        grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(p)))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for _ in range(2):
        params, opt_state = update(params, opt_state)
    return params, opt_state


def abstract_on(tree, device=None):
    """Abstract target: on ``device`` if given, else on the shardings the arrays already have."""
    return abstract_state(tree, jax.tree.map(lambda x: SingleDeviceSharding(device) if device else x.sharding, tree))


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_is_bit_identical_and_restores_onto_other_meshes(tmp_path, cpus):
    mesh8 = make_mesh(MeshConfig(fsdp=8), cpus)
    params, opt_state = trained_state(mesh8)
    data_state = {"epoch": 1, "index": 3, "seed": 0}
    with Checkpointer(tmp_path, CheckpointConfig(save_every=5), model_config=TINY,
                      metadata={"lr": 5e-6, "note": "x"}) as ckpt:
        assert ckpt.save(5, params=params, opt_state=opt_state, data_state=data_state)
    assert latest_step(tmp_path) == 5

    got = restore(tmp_path, {"params": abstract_on(params), "opt_state": opt_state})  # arrays: their shardings
    assert got.step == 5 and got.data_state == data_state and got.model_config == TINY
    assert got.metadata == {"lr": 5e-6, "note": "x"}
    assert_bit_identical(got.params, params)
    assert_bit_identical(got.opt_state, opt_state)

    # A different mesh: fsdp=4 x tensor=2, with the model's own layout on that mesh.
    mesh42 = make_mesh(MeshConfig(fsdp=4, tensor=2), cpus)
    target = abstract_state(params, shardings_on(mesh42))
    got = restore(tmp_path, {"params": target})
    assert got.opt_state is None
    assert_bit_identical(got.params, params)
    assert got.params["layers"]["w"].sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in got.params["layers"]["w"].addressable_shards} == {(2, 2, 2)}

    # One device, optimizer state included.
    got = restore(tmp_path, {"params": abstract_on(params, cpus[3]), "opt_state": abstract_on(opt_state, cpus[3])})
    assert_bit_identical(got.opt_state, opt_state)
    assert got.params["embed"].sharding == SingleDeviceSharding(cpus[3])

    config, only_params = load_params_from_run(tmp_path)
    assert config == TINY
    assert_bit_identical(only_params, params)


def test_keep_last_k_and_save_interval(tmp_path, cpus):
    params, opt_state = trained_state(make_mesh(MeshConfig(fsdp=8), cpus))
    with Checkpointer(tmp_path, CheckpointConfig(save_every=2, keep=2), model_config=TINY) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, params=params, opt_state=opt_state, data_state={"i": s})]
        assert ckpt.save(7, params=params, opt_state=opt_state, data_state={"i": 7}, force=True)  # end of run
        assert not ckpt.save(7, params=params, opt_state=opt_state, force=True)  # already saved
        ckpt.wait()
        assert saved == [2, 4, 6]
        assert ckpt.steps() == [6, 7]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]


def test_a_relative_run_dir_saves(tmp_path, cpus, monkeypatch):
    """`make demo` writes to `--out demo_out`: orbax's OCDBT store refuses relative paths on its own."""
    params, opt_state = trained_state(make_mesh(MeshConfig(fsdp=8), cpus))
    monkeypatch.chdir(tmp_path)
    with Checkpointer("run", CheckpointConfig(save_every=1, keep=1), model_config=TINY) as ckpt:
        assert ckpt.save(1, params=params, opt_state=opt_state, data_state={"i": 1}, force=True)
        ckpt.wait()
        assert ckpt.steps() == [1]
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["1"]


def test_half_written_checkpoints_are_never_picked_up(tmp_path, cpus):
    params, opt_state = trained_state(make_mesh(MeshConfig(fsdp=8), cpus))
    with Checkpointer(tmp_path, CheckpointConfig(save_every=1), model_config=TINY) as ckpt:
        ckpt.save(3, params=params, opt_state=opt_state)
    root = tmp_path / "checkpoints"
    # An interrupted orbax save (still under its temporary name) and a step directory that never got its
    # completion marker (e.g. a crash on a file system without atomic rename).
    (root / "9.orbax-checkpoint-tmp").mkdir()
    (root / "9.orbax-checkpoint-tmp" / "params").mkdir()
    (root / "11" / "params").mkdir(parents=True)
    assert latest_step(tmp_path) == 3
    config, got = load_params_from_run(tmp_path)
    assert_bit_identical(got, params)
    # Resuming training removes the broken step so it cannot block or shadow new saves.
    with Checkpointer(tmp_path, CheckpointConfig(save_every=1), model_config=TINY) as ckpt:
        assert ckpt.save(4, params=params, opt_state=opt_state)
        ckpt.wait()
        assert ckpt.latest_step() == 4
    assert not (root / "11").exists() and not (root / "9.orbax-checkpoint-tmp").exists()


def test_clear_errors(tmp_path, cpus):
    assert latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoints here"):
        load_params_from_run(tmp_path)
    params, opt_state = trained_state(make_mesh(MeshConfig(fsdp=8), cpus))
    with Checkpointer(tmp_path, model_config=TINY) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, force=True)
    other = dict(params, embed=jnp.zeros((32, 8)))
    with pytest.raises(ValueError, match=r"(?s)parameters do not match the model.*\n  embed: checkpoint \(16, 8\) "
                                         r"vs model \(32, 8\)"):
        restore(tmp_path, {"params": abstract_on(other, cpus[0])})
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 2 \(available: \[1\]\)"):
        load_params_from_run(tmp_path, step=2)


# --- damaged checkpoints: checksums, fallback to the previous intact one ------------------------------------

def _two_steps(run, cpus, *, async_save=True):
    """Checkpoints 1 and 2 of a run whose params differ; returns the params saved at each step."""
    params, opt_state = trained_state(make_mesh(MeshConfig(fsdp=8), cpus))
    later = jax.tree.map(lambda x: x * 2, params)
    with Checkpointer(run, CheckpointConfig(save_every=1, async_save=async_save), model_config=TINY) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, data_state={"i": 1})
        ckpt.save(2, params=later, opt_state=opt_state, data_state={"i": 2})
    return params, later


def _damage(run, step, how):
    """Flip one bit in, cut in half, or delete the largest data file of a checkpoint's params (OCDBT keeps the
    array bytes in files under a `d/` folder); returns its path."""
    files = [p for p in (run / "checkpoints" / str(step) / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(bytes(data))
    elif how == "truncate":
        victim.write_bytes(bytes(data[:len(data) // 2]))
    else:
        victim.unlink()
    return victim


@pytest.mark.parametrize("how, async_save", [("flip", True), ("flip", False), ("truncate", True), ("delete", False)])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_intact_one_used(tmp_path, cpus, capsys, how,
                                                                               async_save):
    first, _ = _two_steps(tmp_path, cpus, async_save=async_save)
    victim = _damage(tmp_path, 2, how)
    config, got = load_params_from_run(tmp_path)
    assert config == TINY
    assert_bit_identical(got, first)  # the arrays saved at step 1, not a corrupted step 2
    err = capsys.readouterr().err
    assert f"warning: {tmp_path / 'checkpoints' / '2'} is damaged ({victim.relative_to(tmp_path / 'checkpoints' / '2')}" in err
    assert f"using {tmp_path / 'checkpoints' / '1'}" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'checkpoints' / '2'} is damaged \("):  # asked for by number
        load_params_from_run(tmp_path, step=2)


def test_no_intact_checkpoint_is_a_one_line_error(tmp_path, cpus):
    _two_steps(tmp_path, cpus)
    _damage(tmp_path, 2, "truncate")
    _damage(tmp_path, 1, "flip")
    with pytest.raises(ValueError) as error:
        load_params_from_run(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'checkpoints'}: no intact checkpoint")
    assert "\n" not in message and "different optimizer" not in message
    assert "2: params/" in message and "1: params/" in message


def test_resume_moves_a_damaged_checkpoint_aside_so_training_can_save_that_step_again(tmp_path, cpus, capsys):
    first, later = _two_steps(tmp_path, cpus)
    _damage(tmp_path, 2, "flip")
    params, opt_state = trained_state(make_mesh(MeshConfig(fsdp=8), cpus))
    with Checkpointer(tmp_path, CheckpointConfig(save_every=1), model_config=TINY) as ckpt:
        got = ckpt.restore({"params": abstract_on(params), "opt_state": opt_state})
        assert got.step == 1 and got.data_state == {"i": 1}
        assert_bit_identical(got.params, first)
        assert ckpt.steps() == [1]
        assert ckpt.save(2, params=later, opt_state=opt_state, data_state={"i": 2})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert os.listdir(tmp_path / "discarded") == ["2-damaged"]
    assert f"moved it to {tmp_path / 'discarded' / '2-damaged'}" in capsys.readouterr().err
    assert_bit_identical(load_params_from_run(tmp_path)[1], later)


def test_reading_a_run_logs_no_read_only_warning(tmp_path, cpus, caplog):
    _two_steps(tmp_path, cpus)
    with caplog.at_level(logging.INFO):
        load_params_from_run(tmp_path)
        latest_step(tmp_path)
    assert not [r for r in caplog.records if "read only" in r.getMessage()]
