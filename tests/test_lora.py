"""LoRA: step 0 is the base model, parity with `transformers` + `peft` both ways, merged = unmerged,
frozen base (gradients and optimizer state for the adapters only)."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from hf_reference import hf_model, tiny_config
from jaxtrain import lora, model, peft_io, runs
from jaxtrain.hf_io import load_pretrained, save_pretrained

TOL = 1e-4


def _ids(vocab, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)


def _torch_logits(module, ids):
    with torch.no_grad():
        return module(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _answer_batch(vocab, rows=2, length=16):
    """A training batch whose loss falls on the last six tokens of each row."""
    ids = _ids(vocab, (rows, length))
    mask = np.zeros_like(ids, bool)
    mask[:, 10:] = True
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": np.ones_like(ids),
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


def _randomise_b(adapters: lora.Adapters, seed=1) -> lora.Adapters:
    """Non-zero B everywhere (fresh adapters have B = 0, which would make every parity test trivial)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.05 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x, adapters.params)
    return lora.Adapters(params, adapters.config)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    config = tiny_config()
    reference = hf_model(config, seed=5)
    folder = tmp_path_factory.mktemp("base")
    reference.save_pretrained(folder)
    ours, params = load_pretrained(folder, config_overrides=dict(dtype="float32"))
    return folder, reference, ours, params


def test_zero_init_is_exactly_the_base_model(base):
    _, _, config, params = base
    cfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.5)
    adapters = lora.Adapters(model.init_adapters(config, cfg, jax.random.key(0)), cfg)
    assert all(float(jnp.abs(ab["b"]).max()) == 0 and float(jnp.abs(ab["a"]).max()) > 0
               for sub in adapters.params["layers"].values() for ab in sub.values())
    ids = _ids(config.vocab_size)
    plain = np.asarray(model.forward(config, params, ids))
    adapted = np.asarray(model.forward(config, params, ids, adapters=adapters))
    assert np.array_equal(plain, adapted)
    # Dropout is on only with a dropout rng (training): the hidden states then differ, not before.
    hidden = model.hidden_states(config, params, ids, adapters=_randomise_b(adapters), dropout_rng=jax.random.key(1))
    assert not np.allclose(np.asarray(hidden), np.asarray(model.hidden_states(config, params, ids, adapters=_randomise_b(adapters))))


def test_peft_export_matches_peft_and_merged_matches_transformers(base, tmp_path):
    folder, reference, config, params = base
    cfg = lora.LoraConfig(rank=4, alpha=12)
    adapters = _randomise_b(lora.Adapters(model.init_adapters(config, cfg, jax.random.key(2)), cfg))
    ids = _ids(config.vocab_size)
    ours = np.asarray(model.forward(config, params, ids, adapters=adapters))

    peft_io.save_peft(tmp_path / "adapter", config, adapters, base_model=str(folder))
    with_peft = peft.PeftModel.from_pretrained(hf_model(config, seed=5), tmp_path / "adapter").eval()
    theirs = _torch_logits(with_peft, ids)
    assert np.abs(theirs - _torch_logits(reference, ids)).max() > 100 * TOL  # the adapters matter
    assert np.abs(ours - theirs).max() <= TOL

    merged = lora.merge(params, adapters)
    save_pretrained(tmp_path / "merged", config, merged, dtype="float32", tokenizer=None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(_torch_logits(loaded, ids) - ours).max() <= TOL
    assert np.abs(np.asarray(model.forward(config, merged, ids)) - ours).max() <= TOL

    back = peft_io.load_peft(tmp_path / "adapter", config)
    assert back.config == cfg
    for x, y in zip(jax.tree.leaves(back.params), jax.tree.leaves(adapters.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_import_of_a_folder_trained_with_peft(base, tmp_path):
    """The reverse direction, from a folder `peft` itself wrote (its own init, non-zero B)."""
    _, _, config, params = base
    torch.manual_seed(7)
    peft_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                                  init_lora_weights=False, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf_model(config, seed=5), peft_config).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    adapters = peft_io.load_peft(tmp_path / "theirs", config)
    assert adapters.config.targets == ("k", "o", "up") and adapters.config.rank == 8
    ids = _ids(config.vocab_size, seed=3)
    ours = np.asarray(model.forward(config, params, ids, adapters=adapters))
    assert np.abs(ours - _torch_logits(theirs, ids)).max() <= TOL


def test_bad_peft_folder_is_a_clear_error(base, tmp_path):
    _, _, config, _ = base
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, '
                                                  '"target_modules": ["q_proj", "lm_head"]}')
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules \['lm_head'\]"):
        peft_io.load_peft(tmp_path, config)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.LoraConfig(targets=("q", "qkv"))


def test_train_step_updates_adapters_only_with_adapter_sized_optimizer_state(base):
    from jaxtrain.sharding import MeshConfig, make_mesh, rules_for
    from jaxtrain.train import OptimizerConfig, make_optimizer, make_train_step

    _, _, config, params = base
    cfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.1)
    optimizer, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_ratio=0.0), 10)
    mesh, rules = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1]), rules_for("fsdp")
    fns = make_train_step(config, optimizer, schedule, mesh, rules, max_loss_tokens=None, lora=cfg,
                          base_dtype="float32")
    fns.frozen = jax.device_put(params, fns.frozen_shardings)
    before = jax.tree.map(np.asarray, params)
    adapters = model.init_adapters(config, cfg, jax.random.key(0))
    state = {"params": adapters, "opt_state": optimizer.init(adapters), "step": jnp.int32(0)}

    adapter_count = lora.num_params(adapters)
    expected = sum(2 * (a * 4 + 4 * b) for a, b in  # layers x (fan_in r + r fan_out) per projection
                   [(64, 64), (64, 32), (64, 32), (64, 64), (64, 96), (64, 96), (96, 64)])
    assert adapter_count == expected
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapter_count  # Adam's mu and nu, adapters only
    base_shapes = {x.shape for x in jax.tree.leaves(params)}
    assert not any(x.shape in base_shapes for x in moments if x.size > 4 * 96)

    batch = _answer_batch(config.vocab_size)
    losses = []
    for _ in range(3):
        state, metrics = fns.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert all(float(jnp.abs(ab["b"]).max()) > 0 for sub in state["params"]["layers"].values() for ab in sub.values())
    for x, y in zip(jax.tree.leaves(fns.frozen), jax.tree.leaves(before)):
        assert np.array_equal(np.asarray(x), y)


def _lora_step(config, cfg, base_dtype, base_on_host, mesh=None):
    from jaxtrain.sharding import MeshConfig, make_mesh, rules_for
    from jaxtrain.train import OptimizerConfig, make_optimizer, make_train_step

    optimizer, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_ratio=0.0), 10)
    mesh = mesh or make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    fns = make_train_step(config, optimizer, schedule, mesh, rules_for("fsdp"), max_loss_tokens=8, lora=cfg,
                          base_dtype=base_dtype, base_on_host=base_on_host)
    return fns, optimizer


def test_base_in_host_memory_trains_exactly_like_a_base_on_device(base):
    """--base-on-host: the frozen base is read from host memory, layer by layer inside the (remat) scan;
    the steps give the same losses and adapters as with the whole base in device memory."""
    folder, _, config, _ = base
    config = config.replace(remat="full")  # the backward pass recomputes each layer, reading it again
    cfg = lora.LoraConfig(rank=4, alpha=8, dropout=0.1)
    batch = _answer_batch(config.vocab_size)
    results = []
    for on_host in (False, True):
        fns, optimizer = _lora_step(config, cfg, "float32", on_host)
        fns.frozen = runs.load_base(config, init_from=str(folder), base_dtype="float32",
                                    shardings=fns.frozen_shardings)
        adapters = model.init_adapters(config, cfg, jax.random.key(0))
        state = {"params": adapters, "opt_state": optimizer.init(adapters), "step": jnp.int32(0)}
        losses = []
        for _ in range(2):
            state, metrics = fns.step(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, state["params"], fns.frozen))
    (ref_losses, ref_adapters, _), (losses, adapters, frozen) = results
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    assert losses[-1] < losses[0]
    for want, got in zip(jax.tree.leaves(ref_adapters), jax.tree.leaves(adapters)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    kind = lambda x: x.sharding.memory_kind  # noqa: E731
    layers = frozen["layers"]
    assert {kind(x) for x in jax.tree.leaves((layers["attn"], layers["mlp"], frozen["embed"],
                                              frozen["lm_head"]))} == {"pinned_host"}
    assert {kind(x) for x in jax.tree.leaves((layers["attn_norm"], frozen["final_norm"]))} == {"device"}
    with pytest.raises(ValueError, match="--base-on-host needs --base-dtype bfloat16 or float32"):
        _lora_step(config, cfg, "int8", True)


def test_base_on_host_keeps_about_one_layer_of_it_in_hbm_on_tpu():
    """Compiled for one v5e chip (bf16 base): the base is a host argument, and the step's device
    temporaries stay well below the layer stack (each layer is copied in where it is used, never the
    whole stack at once)."""
    from jaxtrain import aot, quant
    from jaxtrain.checkpoint import abstract_state
    from jaxtrain.config import ModelConfig
    from jaxtrain.sharding import MeshConfig, make_mesh
    from jaxtrain.topology import parse_accelerator_type

    topology = parse_accelerator_type("v5e-1")
    config = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=4,
                           num_kv_heads=2, head_dim=128, rope_theta=1e4, sliding_window=None,
                           max_position_embeddings=4096, rms_norm_eps=1e-5, remat="full", attention_impl="xla")
    cfg = lora.LoraConfig(rank=4, alpha=8)
    fns, optimizer = _lora_step(config, cfg, "bfloat16", True, make_mesh(MeshConfig(), topology.devices()))
    adapters = model.adapter_shapes(config, cfg)
    state = abstract_state({"params": adapters, "opt_state": jax.eval_shape(optimizer.init, adapters),
                            "step": jax.ShapeDtypeStruct((), jnp.int32)}, fns.state_shardings)
    shapes = runs.base_shapes(config, "bfloat16")
    tokens = jax.ShapeDtypeStruct((1, 256), jnp.int32, sharding=fns.batch_sharding)
    batch = {"input_ids": tokens, "loss_mask": jax.ShapeDtypeStruct((1, 256), jnp.bool_, sharding=fns.batch_sharding),
             "segment_ids": tokens, "positions": tokens}
    report = aot.compile_lowered(lambda: fns.lower(state, batch, abstract_state(shapes, fns.frozen_shardings)),
                                 topology)
    stack = quant.nbytes({k: v for k, v in shapes["layers"].items() if k in ("attn", "mlp")})
    on_host = stack + quant.nbytes((shapes["embed"], shapes["lm_head"]))
    assert report.host_argument_bytes >= on_host
    assert report.argument_bytes < 0.1 * on_host
    assert report.temp_bytes < 0.35 * stack  # one layer is 1/8 of the stack
