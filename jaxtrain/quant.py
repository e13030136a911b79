"""Weight-only int8 base weights (QLoRA-style), with per-output-channel scales.

Mistral 7B's projections in bf16 are 13.5 GiB, almost all of a v5e chip's 15.75 GiB; in int8 they are
6.7 GiB. Each projection weight W (our layout: input dims first, then output dims) becomes a
`qwix.QArray`: int8 values q and one scale per output channel (and layer), s = max|W[:, c]| / 127.5, so
W ≈ q * s. The matmul goes through `qwix.einsum`, which dequantises the int8 operand inside the matmul
(XLA fuses the convert-and-scale into the dot's operand read: no dequantised copy of the weight is kept).

qwix (Google's JAX quantization library) serves as the container and the matmul. Its model-rewriting
providers (`quantize_model`, `PtqProvider`) do not: they recognise weights by object identity inside
intercepted modules, which our `_compute` cast and `nn.scan` break, so the model calls `einsum` below
explicitly instead. Quantising is qwix's absmax recipe written in numpy (`quantize_np`), so that it runs
on the host, tensor by tensor, and the loader never builds the bf16 model (XLA's division may differ
from numpy's by an ulp, so one implementation serves every path and results do not depend on the device).

The embedding, the LM head and the norms stay in the compute dtype (0.5 GiB for 7B, and the two most
quantisation-sensitive tensors).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.sharding import PartitionSpec

PROJECTIONS = ("wq", "wk", "wv", "wo", "gate", "up", "down")
# Leading (input) dims of each projection weight, after the stacked layer axis.
INPUT_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "gate": 1, "up": 1, "down": 1}
QBOUND = 127.5  # qwix's symmetric int8 bound: the top bucket holds [126.5, 127.5) * scale


def is_quantized(x) -> bool:
    return isinstance(x, qwix.QArray)


def einsum(spec: str, x, w, dtype):
    """`x` times the weight `w` (einsum `spec`), in `dtype`; `w` is a float array or an int8 `QArray`."""
    if is_quantized(w):
        return qwix.einsum(spec, x, qwix.QArray(w.qvalue, w.scale.astype(dtype), qtype=w.qtype))
    return _float_einsum(spec, x, w.astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _float_einsum(spec: str, x, w):
    """`jnp.einsum(spec, x, w)` whose weight gradient is written with the activations first.

    Why: autodiff writes dW as (cotangent, x); XLA:CPU then transposes the cotangent for its dot and fuses
    the cotangent's elementwise producers (SwiGLU's backward) into that strided transpose, which made
    the MLP's backward 3x slower than with x first (the train step's backward was 8x its forward).
    Same arithmetic either way; other backends see an equivalent dot.
    """
    return jnp.einsum(spec, x, w)


def _float_einsum_fwd(spec, x, w):
    return jnp.einsum(spec, x, w), (x, w)


def _float_einsum_bwd(spec, residuals, dy):
    x, w = residuals
    x_spec, rest = spec.split(",")
    w_spec, y_spec = rest.split("->")
    dx = jnp.einsum(f"{y_spec},{w_spec}->{x_spec}", dy, w)
    dw = jnp.einsum(f"{x_spec},{y_spec}->{w_spec}", x, dy)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_float_einsum.defvjp(_float_einsum_fwd, _float_einsum_bwd)


def quantize_np(w: np.ndarray, input_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales) of one layer's weight [*inputs, *outputs], qwix's absmax recipe."""
    w = np.asarray(w, np.float32)
    scale = np.max(np.abs(w), axis=tuple(range(input_dims)), keepdims=True) / np.float32(QBOUND)
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), scale).astype(np.float32)
    q = np.clip(np.round(w / scale), -128, 127).astype(np.int8)
    return q, scale


def quantize(w, input_dims: int) -> qwix.QArray:
    """int8 `QArray` of a stacked weight [layers, *inputs, *outputs], quantised layer by layer on the host."""
    layers = [quantize_np(jax.device_get(w[i]), input_dims) for i in range(w.shape[0])]
    return qwix.QArray(jnp.asarray(np.stack([q for q, _ in layers])),
                       jnp.asarray(np.stack([s for _, s in layers])), qtype=jnp.int8)


def dequantize(w, dtype=jnp.float32):
    return qwix.dequantize(w).astype(dtype) if is_quantized(w) else jnp.asarray(w, dtype)


def quantize_params(params: dict) -> dict:
    """The parameter tree with every stacked projection weight in int8 (jit it with out_shardings from
    `quantized_shardings` to build it in place on a mesh)."""
    return quantize_params_like(params, lambda name, w: quantize(w, INPUT_DIMS[name]))


def quantized_shardings(shardings: dict) -> dict:
    """Shardings of the int8 tree from those of the float tree: int8 values like the weight, scales
    like the weight except on their (size 1) input dims."""
    def convert(name, sharding):
        spec = tuple(sharding.spec) + (None,) * max(0, 1 + INPUT_DIMS[name] - len(sharding.spec))
        scale_spec = PartitionSpec(spec[0], *([None] * INPUT_DIMS[name]), *spec[1 + INPUT_DIMS[name]:])
        scale = jax.sharding.NamedSharding(sharding.mesh, scale_spec, memory_kind=sharding.memory_kind)
        return qwix.QArray(sharding, scale, qtype=jnp.int8)
    return quantize_params_like(shardings, convert)


def quantize_params_like(tree: dict, convert) -> dict:
    """Apply `convert(name, leaf)` to the projection leaves of a params-shaped tree."""
    out = dict(tree)
    out["layers"] = {group: ({name: convert(name, leaf) for name, leaf in sub.items()}
                             if group in ("attn", "mlp") else sub)
                     for group, sub in tree["layers"].items()}
    return out


def quantized_shapes(shapes: dict) -> dict:
    """ShapeDtypeStructs of the int8 tree (for AOT compiles and restore targets)."""
    def convert(name, s):
        scale = (s.shape[0],) + (1,) * INPUT_DIMS[name] + s.shape[1 + INPUT_DIMS[name]:]
        return qwix.QArray(jax.ShapeDtypeStruct(s.shape, jnp.int8),
                           jax.ShapeDtypeStruct(scale, jnp.float32), qtype=jnp.int8)
    return quantize_params_like(shapes, convert)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
