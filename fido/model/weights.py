"""How the decoder stores the weight matrices a decode step reads: float32, bfloat16 or int8.

`config.model.decoder_weights` chooses, for inference (checkpoints and training stay float32):
  float32   as trained, cast to the compute dtype at use (the unchanged path)
  bfloat16  stored in bfloat16; the activations are cast to bfloat16 for the product, which
            accumulates in float32
  int8      symmetric int8 with one float32 scale per output channel (max |w| / 127 over the input
            axes); the activations are quantised the same way per row (per token) at use, the
            product runs int8 x int8 -> int32, and both scales multiply the int32 result

`convert_params` makes either from any float32 parameter tree (a checkpoint, at load time); an int8
matrix `name` [*in, *out] is stored as int8 `name` of the same shape plus float32 `name_scale`
[*out]. The matrices converted are those one decode step multiplies by (STEP_MATRICES): self-
attention query/key/value/output, cross-attention query/output, the MLP and the output layer. The
cross-attention key/value projections (once per sequence, over all encoder tokens: compute-bound),
the encoder, the embeddings, norms and position biases stay float32.

Converted trees also fuse the matrices that multiply the same input (FUSED_MATRICES): self-attention
query|key|value become one `qkv` [D, (H + 2K) * E] and the MLP's wi_0|wi_1 one `wi` [D, 2F],
concatenated along the output axis, so a step runs 4 matmuls per layer instead of 7 (per-channel
scales make the int8 of the fused matrix the concatenation of its parts' int8). float32 trees keep
the checkpoint's layout: training and the float32 paths are unchanged.

Why int8 x int8 rather than float activations x int8 weights (measured on XLA:CPU 0.10.2, 2-core
Zen 4, T5-small decoder matrices at batch 4): XLA:CPU cannot fuse a weight's int8 -> float
conversion into the matmul. `x @ w.astype(f32) * scale` (and qwix's weight-only `qwix.dot`, which
lowers to the same HLO) first converts the whole matrix in a separate fusion, reading 1 byte and
writing and re-reading 4 per weight: slower than float32 weights. An int8 x int8 dot runs as one
YNNPACK kernel reading the int8 bytes; the scales are applied in the elementwise fusion after it.
This is the scheme of CTranslate2's int8 and qwix's dynamic-range quantisation (the same HLO as
`qwix.dot` over two `qwix.quantize`d operands; written here in jnp, without a Flax dependency).
Bytes read per weight: 4 (float32), 2 (bfloat16), 1 + 4 / rows-of-input (int8).
"""

from typing import Mapping, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np

from fido.config import DECODER_WEIGHTS

WEIGHT_FORMATS = DECODER_WEIGHTS
SCALE_SUFFIX = '_scale'
INT8_MAX = 127.0
# Per module kind (the last part of a Haiku module path), the matrices a decode step reads.
STEP_MATRICES: Mapping[str, tuple[str, ...]] = {
    'self_attention': ('query', 'key', 'value', 'output'),
    'cross_attention': ('query', 'output'),
    'mlp': ('wi_0', 'wi_1', 'wo'),
    'output_projection': ('w',),
}
# Per module kind, fused matrix -> the step matrices it concatenates (along the output axis).
FUSED_MATRICES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    'self_attention': {'qkv': ('query', 'key', 'value')},
    'mlp': {'wi': ('wi_0', 'wi_1')},
}
_STORED_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'int8': jnp.int8}


def fuses(weights: str) -> bool:
  """Whether trees stored as `weights` hold FUSED_MATRICES (the converted formats, not float32)."""
  return weights != 'float32'


def input_axes(name: str) -> int:
  """How many leading axes of matrix `name` are contracted: 2 for an attention output [H, E, D]."""
  return 2 if name == 'output' else 1


class Matrix(NamedTuple):
  """A weight as a 2-D [in, out] operand: float32, bfloat16 or int8 (with float32 scale [out])."""
  w: jax.Array
  scale: jax.Array | None = None


def get_matrix(name: str, shape, init, weights: str = 'float32') -> Matrix:
  """`hk.get_parameter` of a weight [*in, *out] stored as `weights`, flattened to [in, out].

  Only float32 weights are created here (init); the other formats come from `convert_params`.
  """
  n_in = input_axes(name)
  d_in, d_out = int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))
  w = hk.get_parameter(name, shape, _STORED_DTYPES[weights], init=init).reshape(d_in, d_out)
  if weights != 'int8':
    return Matrix(w)
  scale = hk.get_parameter(name + SCALE_SUFFIX, shape[n_in:], jnp.float32, init=init)
  return Matrix(w, scale.reshape(d_out))


def quantize_rows(x_NxI: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 along the last axis: (q int8 [..., I], scale float32 [..., 1]); x ~ q * scale."""
  x32 = x_NxI.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / INT8_MAX
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.round(x32 / scale).astype(jnp.int8), scale


def matmul(x_NxI: jax.Array, matrix: Matrix, policy: jmp.Policy, out_dtype=None) -> jax.Array:
  """x [..., in] @ matrix [in, out] -> [..., out] in `out_dtype` (default: the compute dtype)."""
  w = matrix.w
  if w.dtype == jnp.float32:
    return jnp.matmul(x_NxI, policy.cast_to_compute(w), preferred_element_type=out_dtype)
  out_dtype = out_dtype or policy.compute_dtype
  if w.dtype == jnp.bfloat16:
    y = jnp.matmul(x_NxI.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)
  x_q, x_scale = quantize_rows(x_NxI)
  y_int = jax.lax.dot_general(x_q, w, (((x_q.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
  return (y_int.astype(jnp.float32) * x_scale * matrix.scale).astype(out_dtype)


def quantize(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel symmetric int8 of a float weight [*in, *out]: (int8 [*in, *out], scale [*out]).

  |w - q * scale| <= scale / 2 element by element, scale = max |w| over the input axes / 127.
  """
  w = jnp.asarray(w, jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=tuple(range(n_in))) / INT8_MAX
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
  return q.astype(jnp.float32) * scale


def _module_kind(module: str) -> str:
  """The kind of Haiku module path `module` for the step matrices ('' outside the decode step)."""
  if module != 'output_projection' and not module.startswith('decoder/'):
    return ''
  return module.split('/')[-1]


def step_matrix_names(module: str) -> tuple[str, ...]:
  """The names a decode-step matrix of module path `module` may have: separate or fused."""
  kind = _module_kind(module)
  return STEP_MATRICES.get(kind, ()) + tuple(FUSED_MATRICES.get(kind, {}))


def fuse(module: str, leaves: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`leaves` of module path `module` with each FUSED_MATRICES group as one [in, sum of outs]."""
  out = dict(leaves)
  for fused, parts in FUSED_MATRICES.get(_module_kind(module), {}).items():
    if all(part in out for part in parts):
      matrices = [out.pop(part) for part in parts]  # each [in, *out]: one input axis
      out[fused] = jnp.concatenate([w.reshape(w.shape[0], -1) for w in matrices], axis=1)
  return out


def convert_params(params, weights: str):
  """A float32 parameter tree with every decode-step matrix stored as `weights` (a new tree),
  fused (`fuse`) unless float32.

  Traceable (jit, eval_shape). Raises ValueError on a step matrix that is not float32 (a tree
  converted already).
  """
  if weights not in WEIGHT_FORMATS:
    raise ValueError(f'weights={weights!r}: expected one of {WEIGHT_FORMATS}')
  out = {}
  for module, leaves in params.items():
    names = [name for name in step_matrix_names(module) if name in leaves]
    for name in names:
      if leaves[name].dtype != jnp.float32 or name in FUSED_MATRICES.get(_module_kind(module), {}):
        raise ValueError(f'{module}/{name} is {leaves[name].dtype}, fused or not float32: '
                         'already converted?')
    out[module] = fuse(module, leaves) if fuses(weights) else dict(leaves)
    for name in step_matrix_names(module):
      if name not in out[module]:
        continue
      w = out[module][name]
      if weights == 'bfloat16':
        out[module][name] = jnp.asarray(w, jnp.bfloat16)
      elif weights == 'int8':
        out[module][name], out[module][name + SCALE_SUFFIX] = quantize(w, input_axes(name))
  return out


def step_bytes(params) -> int:
  """Bytes of the decode-step matrices (and their scales) in a parameter tree."""
  total = 0
  for module, leaves in params.items():
    for name in step_matrix_names(module):
      for leaf in (name, name + SCALE_SUFFIX):
        if leaf in leaves:
          total += leaves[leaf].size * leaves[leaf].dtype.itemsize
  return total
