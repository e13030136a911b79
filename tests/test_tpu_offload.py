"""Host-offloaded, layer-streamed optimizer (jaxtrain.offload) against plain optax, and its TPU memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxtrain import aot, offload
from jaxtrain.sharding import MeshConfig, make_mesh
from jaxtrain.topology import parse_accelerator_type


def _adamw(mu_dtype=jnp.float32):
    return optax.adamw(optax.linear_schedule(0.0, 1e-2, 3), weight_decay=0.1, mu_dtype=mu_dtype)


@pytest.mark.parametrize("mu_dtype", [jnp.float32, jnp.bfloat16])
def test_layerwise_equals_optax_chain_with_state_on_host(mu_dtype):
    """Three steps on a model-shaped tree (stacked layers + whole leaves): clipped (huge gradient), then
    unclipped. Moments bitwise equal; parameters to the last bit but one (XLA may fuse p + u
    differently); the state stays in host memory."""
    rng = np.random.default_rng(0)
    shapes = {"embed": (50, 16), "final_norm": {"weight": (16,)}, "lm_head": (16, 50),
              "layers": {"attn": {"wq": (3, 16, 2, 8)}, "mlp": {"up": (3, 16, 32)}, "norm": {"weight": (3, 16)}}}
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    reference = optax.chain(optax.clip_by_global_norm(1.0), _adamw(mu_dtype))
    streamed = offload.layerwise(_adamw(mu_dtype), clip_norm=1.0)
    host = SingleDeviceSharding(jax.devices()[0], memory_kind=offload.HOST)
    host_state = optax.tree_map_params(streamed, lambda x: jax.device_put(x, host), streamed.init(params))

    def step(tx):
        def f(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s
        return jax.jit(f, donate_argnums=(0, 1))

    step_ref, step_new = step(reference), step(streamed)
    p_ref, s_ref = params, reference.init(params)
    p_new, s_new = jax.tree.map(jnp.copy, params), host_state
    for scale in (3.0, 1e-3, 1e-3):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape) * scale, x.dtype), params)
        p_ref, s_ref = step_ref(p_ref, s_ref, grads)
        p_new, s_new = step_new(p_new, s_new, grads)
    for want, got in zip(jax.tree.leaves(s_ref[1]), jax.tree.leaves(s_new)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for want, got in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_new)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-7, atol=1e-9)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(s_new) if x.ndim}
    assert kinds == {offload.HOST}


def test_place_state():
    params = {"layers": {"w": jnp.zeros((4, 8))}, "embed": jnp.zeros((3, 8))}
    device = SingleDeviceSharding(jax.devices()[0])
    tx = offload.layerwise(optax.adam(1e-3))
    state_shardings = jax.tree.map(lambda _: device, tx.init(params))
    placed = offload.place_state(tx, state_shardings)
    assert placed[0].count.memory_kind == "device"
    assert {s.memory_kind for s in jax.tree.leaves((placed[0].mu, placed[0].nu))} == {offload.HOST}
    plain = optax.adam(1e-3)
    assert offload.place_state(plain, state_shardings) is state_shardings


def test_streaming_keeps_hbm_to_one_layer_on_tpu():
    """Compiled for a v5e-8: the moments are host arguments and the update needs about one layer of
    them in HBM, where the plain optimizer needs all of them (every number here is per chip)."""
    topo = parse_accelerator_type("v5e-8")
    mesh = make_mesh(MeshConfig(fsdp=-1), topo.devices())
    layers, d, f = 16, 1024, 4096
    sharded = NamedSharding(mesh, P(None, "fsdp", None))
    params = {"layers": jax.ShapeDtypeStruct((layers, d, f), jnp.float32, sharding=sharded)}
    stack_bytes = layers * d * f * 4 // 8                      # one fp32 stack, per chip

    def report(tx, host):
        state = jax.eval_shape(tx.init, params)
        shardings = optax.tree_map_params(tx, lambda _: sharded, state,
                                          transform_non_params=lambda _: NamedSharding(mesh, P()))
        shardings = offload.place_state(tx, shardings) if host else shardings
        state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)

        def step(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s
        in_shardings = ({"layers": sharded}, shardings, {"layers": sharded})
        return aot.compile_for_topology(step, (params, state, params), in_shardings, in_shardings[:2], (0, 1),
                                        topo)

    plain = report(optax.chain(optax.clip_by_global_norm(1.0), _adamw()), host=False)
    streamed = report(offload.layerwise(_adamw(), clip_norm=1.0), host=True)
    assert plain.argument_bytes >= 4 * stack_bytes             # params, grads, mu, nu
    assert streamed.host_argument_bytes == 2 * stack_bytes       # mu, nu
    assert streamed.argument_bytes < 2.1 * stack_bytes           # params, grads
    assert streamed.temp_bytes < 4 * stack_bytes / layers        # about one layer's moments and update
    assert streamed.per_chip_bytes < plain.per_chip_bytes - 1.75 * stack_bytes
