"""The key/value-head layout of multi-head, grouped-query and multi-query attention (its one owner).

Shapes: D the width keys and values are projected from (the encoder's, for cross-attention),
H query heads, K key/value heads (H % K == 0), G = H / K query heads per key/value head, E d_kv.

  K = H      multi-head (MHA)              key/value projection [D, K, E]
  1 < K < H  grouped-query (GQA)           key/value projection [D, K, E]
  K = 1      multi-query (MQ, FiDO §3.2)   key/value projection [D, E]: no head axis, as
                                           flaxformer's MultiQueryDotProductAttention

Query head h reads key/value head h // G (fido.model.attention). Fewer key/value heads are made
from more by averaging each group of G adjacent heads (GQA, Ainslie et al., 2023, §2.1: mean
pooling beats keeping one head per group or random init): converting T5 checkpoints
(fido.convert_fido) and uptraining a multi-head twin (fido.train) both pool here.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fido.errors import ConversionError

KV_PARAMS = ('key', 'value')           # an attention module's key/value projections
MULTI_QUERY_AXES = ('d_in', 'd_kv')                 # K = 1
GROUPED_AXES = ('d_in', 'kv_heads', 'd_kv')         # K > 1 (GQA and MHA)


def kv_axes(num_kv_heads: int) -> tuple[str, ...]:
  """The axes of a key/value projection with `num_kv_heads` heads."""
  return MULTI_QUERY_AXES if num_kv_heads == 1 else GROUPED_AXES


def kv_shape(d_in: int, num_kv_heads: int, d_kv: int) -> tuple[int, ...]:
  """A key/value projection's shape: [D, E] for K = 1, else [D, K, E]."""
  sizes = dict(d_in=d_in, kv_heads=num_kv_heads, d_kv=d_kv)
  return tuple(sizes[axis] for axis in kv_axes(num_kv_heads))


def num_kv_heads_of(shape: Sequence[int]) -> int:
  """K of a key/value projection's shape: [D, E] -> 1, [D, K, E] -> K."""
  return 1 if len(shape) == len(MULTI_QUERY_AXES) else shape[1]


def is_kv_projection(path: Sequence[Any]) -> bool:
  """Whether a tree path ends in an attention module's key or value projection ('.../attention'
  module, then 'key' or 'value'), in a params tree or in an optimizer state mirroring one."""
  names = [getattr(entry, 'key', None) for entry in path[-2:]]
  return (len(names) == 2 and isinstance(names[0], str) and names[0].endswith('attention')
          and names[1] in KV_PARAMS)


def pool_heads(w_DxHxE, num_kv_heads: int, accumulate_dtype=None, dtype=None):
  """[D, H, E] key/value heads -> kv_shape(D, K, E): the mean of each group of H/K adjacent heads.

  `w_DxHxE` is a numpy or jax array; the mean accumulates in `accumulate_dtype` (default: the
  input's; conversion asks for float64) and the result has `dtype` (default: the input's).
  """
  d, h, e = w_DxHxE.shape
  if h % num_kv_heads:
    raise ConversionError(f'{h} heads cannot be pooled into {num_kv_heads} groups')
  pooled_DxKxE = w_DxHxE.reshape(d, num_kv_heads, h // num_kv_heads, e).mean(
      axis=2, dtype=accumulate_dtype)
  return pooled_DxKxE.reshape(kv_shape(d, num_kv_heads, e)).astype(dtype or w_DxHxE.dtype)


def pool_kv_heads(source: Any, target: Any) -> Any:
  """`source` reshaped into `target`'s shapes: key/value heads mean-pooled, everything else copied.

  `source` is a params tree, or an optimizer state mirroring one (second moments, momentum), of a
  model with more key/value heads than `target`'s model and otherwise the same shapes; `target` is
  the matching tree of arrays or jax.ShapeDtypeStructs. Each [D, H, E] key/value leaf becomes
  kv_shape(D, K, E) by `pool_heads` (in the source's dtype, with jax): GQA uptraining (Ainslie et
  al., 2023), how FiDO turns multi-head T5 into multi-query. The result has `target`'s dtypes and,
  where `target` carries them, its shardings. Any other shape mismatch raises ConversionError
  naming the leaf.
  """
  def convert(path, src, dst):
    src_shape, dst_shape = tuple(src.shape), tuple(dst.shape)
    if src_shape != dst_shape:
      h = src_shape[1] if len(src_shape) == len(GROUPED_AXES) else None
      k = num_kv_heads_of(dst_shape) if len(dst_shape) in (2, 3) else None
      if not (is_kv_projection(path) and h and k and h % k == 0
              and dst_shape == kv_shape(src_shape[0], k, src_shape[-1])):
        raise ConversionError(f'{jax.tree_util.keystr(path)}: shape {src_shape} cannot become '
                              f'{dst_shape}; only key/value heads [D, H, E] -> [D, K, E] or [D, E] '
                              'can be pooled, every other shape must match')
      src = pool_heads(jnp.asarray(src), k)
    out = jnp.asarray(src, dst.dtype)
    sharding = getattr(dst, 'sharding', None)
    return jax.device_put(out, sharding) if sharding is not None else out
  return jax.tree_util.tree_map_with_path(convert, source, target)


def multi_head(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.model with every attention multi-head (K = H): the twin that uptraining starts from."""
  twin = ml_collections.ConfigDict(model.to_dict())
  for stack in (twin.encoder, twin.decoder):
    stack.num_kv_heads = stack.num_heads
  twin.decoder.cross_num_kv_heads = twin.decoder.num_heads
  return twin
