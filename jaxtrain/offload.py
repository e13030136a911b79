"""Optimizer state in host memory, streamed through HBM one layer at a time.

Adam keeps two fp32 moments, 8 bytes per parameter: 54 GiB for Mistral 7B, 6.7 GiB per chip of a v5e-8,
which that chip cannot spare next to the fp32 master weights, the gradients and the activations. With
`layerwise(tx)` the moments live in the TPU VM's host RAM (``memory_kind="pinned_host"``, see
`host_shardings`) and the update visits them layer by layer. The scanned layers' parameters are stacked
``[num_layers, ...]``, so a `fori_loop` over the layer index copies one layer's moments into HBM,
computes that layer's update and new moments, and writes the moments back: HBM holds one layer of
optimizer state at a time (0.2 GiB per v5e-8 chip instead of 6.7 GiB). The loop writes each layer's
update over that layer's gradient, so the update tree costs no memory either. Leaves outside the stack
(embedding, LM head, final norm) are updated whole.

Exactness: ``layerwise(tx, clip_norm=c)`` gives the updates and state of
``optax.chain(optax.clip_by_global_norm(c), tx)`` when `tx` is elementwise per leaf (optax's adamw /
adam / sgd with learning-rate schedules, weight decay and moment dtypes: everything `jaxtrain.train`
uses): the moments bitwise, the parameters after ``optax.apply_updates`` to the last bit but one (XLA
may fuse ``p + u`` into the update's arithmetic when the update is not materialised). Global-norm
clipping is the one global step, so it is done here with the whole tree's norm and optax's own
arithmetic before each slice reaches `tx`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

HOST = "pinned_host"
STACKED, WHOLE, OTHER = "stacked", "whole", "other"


def stacked_layers(params, key: str = "layers"):
    """Bool tree: True for the matrices under the top-level `key` (the `nn.scan`-stacked layers).

    Stacked vectors (the norm weights, [num_layers, hidden]) are left to the whole-tree update: they are
    tiny, and TPU memory tiles pack several layers of a 2-D array together, so one layer's row is a
    strided copy, which host transfers on v4 do not support.
    """
    return {k: jax.tree.map(lambda x: k == key and x.ndim >= 3, v) for k, v in params.items()}


class HostOffloaded(optax.GradientTransformation):
    """A `layerwise` transformation: its state belongs in host memory (see `place_state`)."""

    __slots__ = ()


def place_state(optimizer, opt_state_shardings):
    """The optimizer-state shardings where `optimizer` wants them: for a `HostOffloaded` one every
    parameter-shaped leaf (the moments) in host memory, scalars (step counts) on device; otherwise
    unchanged. Call it on the shardings of every optimizer, offloaded or not."""
    if not isinstance(optimizer, HostOffloaded):
        return opt_state_shardings
    return optax.tree_map_params(optimizer, lambda s: s.with_memory_kind(HOST), opt_state_shardings)


def _to_device(x):
    return jax.device_put(x, jax.memory.Space.Device)


def _to_host(x):
    return jax.device_put(x, jax.memory.Space.Host)


def _stand_in(x):
    """An empty array standing in for a leaf this part of the update skips (elementwise on it is free)."""
    return jnp.zeros((0,) + x.shape[1:], x.dtype)


def _clip(grads, clip_norm):
    """optax.clip_by_global_norm's arithmetic, per leaf, with the norm of the whole tree."""
    if clip_norm <= 0:
        return lambda g: g
    norm = optax.tree.norm(grads)
    trigger = norm < clip_norm
    return lambda g: jax.lax.select(trigger, g, (g / norm.astype(g.dtype)) * clip_norm)


def layerwise_update(tx: optax.GradientTransformation, grads, opt_state, params, *, clip_norm: float = 0.0,
                     is_stacked=None):
    """(updates, new state) of ``chain(clip_by_global_norm(clip_norm), tx)``, streamed layer by layer.

    `opt_state` may live in host memory; the new state's parameter-shaped leaves are returned there.
    `is_stacked`: bool tree like `params` marking leaves stacked along a leading layer axis (default
    `stacked_layers(params)`).
    """
    is_stacked = stacked_layers(params) if is_stacked is None else is_stacked
    param_kind = jax.tree.map(lambda s: STACKED if s else WHOLE, is_stacked)
    state_kind = optax.tree_map_params(tx, lambda _, k: k, opt_state, param_kind,
                                       transform_non_params=lambda v: jax.tree.map(lambda _: OTHER, v))
    clip = _clip(grads, clip_norm)
    layer_counts = {x.shape[0] for k, x in zip(jax.tree.leaves(param_kind), jax.tree.leaves(params))
                    if k == STACKED}
    if len(layer_counts) > 1:
        raise ValueError(f"stacked parameters disagree on the layer count: {sorted(layer_counts)}")

    def select(tree, kinds, stacked, whole):
        """`tree` with STACKED leaves mapped by `stacked`, WHOLE ones by `whole`, OTHER ones kept."""
        return jax.tree.map(lambda k, x: stacked(x) if k == STACKED else (whole(x) if k == WHOLE else x),
                            kinds, tree)

    def keep(x):
        return x

    # Everything outside the stack, in one call of tx; the stack is stood in for by empty arrays.
    updates, state_whole = tx.update(select(grads, param_kind, _stand_in, clip),
                                     select(opt_state, state_kind, _stand_in, _to_device),
                                     select(params, param_kind, _stand_in, keep))
    new_state = select(state_whole, state_kind, keep, _to_host)
    if not layer_counts:
        return updates, new_state

    # The stack, one layer per iteration. Slices are read from and written to the loop carry (so XLA
    # updates the gradient and host state buffers in place: each layer's update overwrites its
    # gradient); step counts and other scalars come from the input state in every iteration.
    def body(i, carry):
        g_all, s_all = carry

        def layer(put):
            return lambda x: put(x[i])

        def write(full, new, kinds, put):
            def one(k, f, n):
                return jax.lax.dynamic_update_index_in_dim(f, put(n).astype(f.dtype), i, 0) if k == STACKED else f
            return jax.tree.map(one, kinds, full, new)

        s_in = jax.tree.map(lambda k, c, x: x if k == OTHER else c, state_kind, s_all, opt_state)
        u_i, s_i = tx.update(select(g_all, param_kind, layer(clip), _stand_in),
                             select(s_in, state_kind, layer(_to_device), _stand_in),
                             select(params, param_kind, layer(keep), _stand_in))
        return write(g_all, u_i, param_kind, keep), write(s_all, s_i, state_kind, _to_host)

    stacked_updates, stacked_state = jax.lax.fori_loop(0, layer_counts.pop(), body, (grads, opt_state))

    def merge(kinds, stacked, rest):
        return jax.tree.map(lambda k, a, b: a if k == STACKED else b, kinds, stacked, rest)
    return merge(param_kind, stacked_updates, updates), merge(state_kind, stacked_state, new_state)


def layerwise(tx: optax.GradientTransformation, *, clip_norm: float = 0.0, is_stacked=None) -> HostOffloaded:
    """`tx` (elementwise, e.g. optax.adamw) preceded by global-norm clipping, with its state meant for
    host memory: a drop-in for ``optax.chain(optax.clip_by_global_norm(clip_norm), tx)`` whose state
    shardings go through `place_state`. See the module docstring."""
    def update(grads, state, params=None):
        if params is None:
            raise ValueError("layerwise(...).update needs params (to find the stacked layers)")
        return layerwise_update(tx, grads, state, params, clip_norm=clip_norm, is_stacked=is_stacked)

    return HostOffloaded(tx.init, update)
