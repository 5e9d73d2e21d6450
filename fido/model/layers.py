"""T5.1.1 building blocks: RMSNorm, gated-GELU MLP, relative position bias, token embedding.

Shape glossary: B batch, T query length, S key length, D model width, F d_ff, H heads, V vocab.
Parameters are created in float32; `policy` (a `jmp.Policy`) casts them to the compute dtype at use.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np

from fido.model.weights import fuses, get_matrix, matmul


class RMSNorm(hk.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias; statistics in float32."""

  def __init__(self, epsilon: float, policy: jmp.Policy, name: str):
    super().__init__(name=name)
    self.epsilon = epsilon
    self.policy = policy

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    scale_D = hk.get_parameter('scale', [x_BxTxD.shape[-1]], jnp.float32, init=jnp.ones)
    x32 = x_BxTxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return self.policy.cast_to_compute(x32 * scale_D)


class GatedGeluMLP(hk.Module):
  """T5.1.1 feed-forward: wo(gelu(x wi_0) * (x wi_1)), tanh-approximated GELU, no biases."""

  def __init__(self, d_ff: int, dropout_rate: float, policy: jmp.Policy, name: str,
               weights: str = 'float32'):
    super().__init__(name=name)
    self.weights = weights  # storage of wi_0/wi_1 (or wi, fused)/wo (fido.model.weights)
    self.d_ff = d_ff
    self.dropout_rate = dropout_rate
    self.policy = policy

  def __call__(self, x_BxTxD: jax.Array, *, is_training: bool) -> jax.Array:
    gate_BxTxF, linear_BxTxF = self._wi(x_BxTxD)
    h_BxTxF = dropout(jax.nn.gelu(gate_BxTxF, approximate=True) * linear_BxTxF, self.dropout_rate,
                      is_training)
    wo_FxD = get_matrix('wo', [self.d_ff, x_BxTxD.shape[-1]],
                        hk.initializers.RandomNormal(self.d_ff**-0.5), self.weights)
    return matmul(h_BxTxF, wo_FxD, self.policy)

  def _wi(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x wi_0, x wi_1), each [B, T, F]; converted weights (fido.model.weights.fuses) hold
    wi_0|wi_1 as one matrix `wi` [D, 2F]: one matmul, split in halves."""
    d_model = x_BxTxD.shape[-1]
    if fuses(self.weights):
      wi_Dx2F = get_matrix('wi', [d_model, 2 * self.d_ff], None, self.weights)
      gate_BxTxF, linear_BxTxF = jnp.split(matmul(x_BxTxD, wi_Dx2F, self.policy), 2, axis=-1)
      return gate_BxTxF, linear_BxTxF
    in_init = hk.initializers.RandomNormal(d_model**-0.5)
    wi_0_DxF = get_matrix('wi_0', [d_model, self.d_ff], in_init, self.weights)
    wi_1_DxF = get_matrix('wi_1', [d_model, self.d_ff], in_init, self.weights)
    return matmul(x_BxTxD, wi_0_DxF, self.policy), matmul(x_BxTxD, wi_1_DxF, self.policy)


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  if not is_training or rate == 0.0:
    return x
  return hk.dropout(hk.next_rng_key(), rate, x)


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucketing of (key - query) offsets: half exact buckets, half log-spaced up to max_distance."""
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # Clamp to 1 before the log: small distances take the exact branch anyway.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(large.astype(jnp.int32), num_buckets - 1)
  return bucket + jnp.where(is_small, distance, large)


class RelativePositionBias(hk.Module):
  """Learned per-head bias over bucketed offsets; computed once per stack and shared by its layers."""

  def __init__(self, num_heads: int, bidirectional: bool, num_buckets: int, max_distance: int,
               name: str, init_std: float = 1.0):
    super().__init__(name=name)
    self.init_std = init_std
    self.num_heads = num_heads
    self.bidirectional = bidirectional
    self.num_buckets = num_buckets
    self.max_distance = max_distance

  def __call__(self, query_positions_T: jax.Array, key_positions_S: jax.Array) -> jax.Array:
    """Returns the bias [1, H, T, S] in float32 for absolute query/key positions."""
    embeddings = hk.get_parameter('embeddings', [self.num_buckets, self.num_heads], jnp.float32,
                                  init=hk.initializers.RandomNormal(self.init_std))
    relative_TxS = key_positions_S[None, :] - query_positions_T[:, None]
    buckets_TxS = relative_position_bucket(relative_TxS, self.bidirectional, self.num_buckets,
                                           self.max_distance)
    bias_TxSxH = jnp.take(embeddings, buckets_TxS, axis=0)
    return jnp.transpose(bias_TxSxH, (2, 0, 1))[None]


class Embed(hk.Module):
  """Token embedding table [V, D]; T5 initialises it with unit variance."""

  def __init__(self, vocab_size: int, d_model: int, policy: jmp.Policy, name: str):
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self.d_model = d_model
    self.policy = policy

  def __call__(self, ids: jax.Array) -> jax.Array:
    table_VxD = hk.get_parameter('embeddings', [self.vocab_size, self.d_model], jnp.float32,
                                 init=hk.initializers.RandomNormal(1.0))
    return self.policy.cast_to_compute(jnp.take(table_VxD, ids, axis=0))


def large_negative(dtype) -> float:
  """A finite 'minus infinity': fully masked rows give uniform weights instead of NaN."""
  return float(np.finfo(np.dtype(dtype)).min) * 0.5
