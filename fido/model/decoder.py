"""T5.1.1 decoder with FiDO's layer-sparse cross-attention (LSA) and multi-query attention (MQ).

Shape glossary: B batch, T target length, S = P * L fused encoder length, D decoder width,
H heads, K self-attention kv heads, C cross-attention kv heads, E d_kv, M max decode length.

LSA (FiDO §3.1): decoder layer i (1-based) has cross-attention iff i % K == 0; the other layers have
no cross-attention parameters at all. MQ (§3.2): `num_kv_heads` / `cross_num_kv_heads` = 1.
"""

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections

from fido.config import cross_attention_layers, decoder_weights
from fido.model.attention import Attention
from fido.model.layers import GatedGeluMLP, RelativePositionBias, RMSNorm, dropout, large_negative


class DecoderCache(NamedTuple):
  """Everything incremental decoding reuses between steps (a pytree).

  position:   int32 []  index of the next token to write
  self_k/v:   per layer, keys [B, K, E, M] / values [B, K, M, E] of the tokens decoded so far
  cross_k/v:  per cross-attention layer, keys [B, C, E, S] / values [B, C, S, E], projected once
  cross_bias: float32 [B, 1, 1, S], 0 on real encoder tokens, a large negative on padding
  """
  position: jax.Array
  self_k: tuple[jax.Array, ...]
  self_v: tuple[jax.Array, ...]
  cross_k: tuple[jax.Array, ...]
  cross_v: tuple[jax.Array, ...]
  cross_bias: jax.Array


def mask_to_bias(mask_BxS: jax.Array) -> jax.Array:
  """Key padding mask [B, S] -> additive float32 bias [B, 1, 1, S]."""
  return jnp.where(mask_BxS, 0.0, large_negative(jnp.float32))[:, None, None, :]


class DecoderLayer(hk.Module):
  """Self-attention, cross-attention (only in LSA layers), gated-GELU MLP; each pre-norm residual."""

  def __init__(self, config: ml_collections.ConfigDict, has_cross_attention: bool,
               policy: jmp.Policy, name: str):
    super().__init__(name=name)
    dec, eps, rate = config.decoder, config.layer_norm_epsilon, config.dropout_rate
    weights = decoder_weights(config)  # the decode step's matrices (fido.model.weights)
    self.dropout_rate = rate
    self.has_cross_attention = has_cross_attention
    self.self_attention_norm = RMSNorm(eps, policy, name='self_attention_norm')
    self.self_attention = Attention(dec.d_model, dec.num_heads, dec.num_kv_heads, dec.d_kv, rate,
                                    policy, name='self_attention', weights=weights,
                                    mimetic_qk=dec.get('mimetic_qk', 0.0),
                                    mimetic_vo=dec.get('mimetic_vo', 0.0))
    if has_cross_attention:
      self.cross_attention_norm = RMSNorm(eps, policy, name='cross_attention_norm')
      self.cross_attention = Attention(dec.d_model, dec.num_heads, dec.cross_num_kv_heads,
                                       dec.d_kv, rate, policy, name='cross_attention',
                                       weights=weights, kv_weights='float32')
    self.mlp_norm = RMSNorm(eps, policy, name='mlp_norm')
    self.mlp = GatedGeluMLP(dec.d_ff, rate, policy, name='mlp', weights=weights)

  def project_cross_kv(self, enc_BxSxDenc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys [B, C, E, S] and values [B, C, S, E]; projections map D_enc -> C * E."""
    return self.cross_attention.project_kv(enc_BxSxDenc)

  def __call__(self, x_BxTxD: jax.Array, self_bias: jax.Array, cross_kv, cross_bias: jax.Array,
               self_cache=None, *, is_training: bool, with_cross_attention: bool = False):
    """One layer over T new positions.

    self_bias: float32 [1, H, T, T] (full) or [1, H, T, M] (cached): relative bias + causal mask.
    cross_kv: (k [B, C, E, S], v [B, C, S, E]), or None in layers without cross-attention.
    self_cache: None, or (k [B, K, E, M], v [B, K, M, E], position) to write the T new ones into.
    Returns (x [B, T, D], (k, v): this layer's self-attention keys/values incl. the new positions,
    cross-attention probabilities averaged over heads float32 [B, T, S] when
    `with_cross_attention` and the layer cross-attends, else None).
    """
    h_BxTxD = self.self_attention_norm(x_BxTxD)
    q_BxKxGxTxE, k_BxKxExT, v_BxKxTxE = self.self_attention.project_qkv(h_BxTxD)
    if self_cache is not None:
      k_cache, v_cache, position = self_cache
      k_BxKxExT = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxKxExT.astype(k_cache.dtype),
                                                      position, axis=3)
      v_BxKxTxE = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxKxTxE.astype(v_cache.dtype),
                                                      position, axis=2)
    h_BxTxD = self.self_attention.attend(q_BxKxGxTxE, k_BxKxExT, v_BxKxTxE, self_bias,
                                         is_training=is_training)
    x_BxTxD = x_BxTxD + dropout(h_BxTxD, self.dropout_rate, is_training)

    cross_BxTxS = None
    if self.has_cross_attention:
      h_BxTxD = self.cross_attention_norm(x_BxTxD)
      h_BxTxD = self.cross_attention.attend(self.cross_attention.project_query(h_BxTxD),
                                            *cross_kv, cross_bias, is_training=is_training,
                                            return_weights=with_cross_attention)
      if with_cross_attention:
        h_BxTxD, probs_BxKxGxTxS = h_BxTxD
        cross_BxTxS = probs_BxKxGxTxS.mean(axis=(1, 2))
      x_BxTxD = x_BxTxD + dropout(h_BxTxD, self.dropout_rate, is_training)

    h_BxTxD = self.mlp(self.mlp_norm(x_BxTxD), is_training=is_training)
    x_BxTxD = x_BxTxD + dropout(h_BxTxD, self.dropout_rate, is_training)
    return x_BxTxD, (k_BxKxExT, v_BxKxTxE), cross_BxTxS


class Decoder(hk.Module):
  """Embedded target tokens -> final-normed hidden states, attending to the fused encoder output."""

  def __init__(self, config: ml_collections.ConfigDict, policy: jmp.Policy, name: str = 'decoder'):
    super().__init__(name=name)
    dec = config.decoder
    self.dropout_rate = config.dropout_rate
    self.num_kv_heads, self.d_kv = dec.num_kv_heads, dec.d_kv
    self.cache_dtype = policy.compute_dtype
    # One causal relative position bias for the whole stack, shared by all its layers.
    self.relative_position_bias = RelativePositionBias(
        dec.num_heads, bidirectional=False, num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance, name='relative_position_bias',
        init_std=dec.get('position_bias_init_std', 1.0))
    cross = set(cross_attention_layers(dec))
    self.layers = [DecoderLayer(config, i in cross, policy, name=f'layer_{i:02d}')
                   for i in range(dec.num_layers)]
    self.final_norm = RMSNorm(config.layer_norm_epsilon, policy, name='final_norm')

  def _self_bias(self, query_positions_T: jax.Array, key_positions_S: jax.Array) -> jax.Array:
    """Relative position bias plus causal mask, [1, H, T, S] float32."""
    causal_TxS = key_positions_S[None, :] <= query_positions_T[:, None]
    return jnp.where(causal_TxS, self.relative_position_bias(query_positions_T, key_positions_S),
                     large_negative(jnp.float32))

  def __call__(self, y_BxTxD: jax.Array, enc_BxSxDenc: jax.Array, enc_mask_BxS: jax.Array, *,
               is_training: bool) -> jax.Array:
    """Teacher-forced decoding of all T positions at once (training, scoring)."""
    positions = jnp.arange(y_BxTxD.shape[1])
    self_bias = self._self_bias(positions, positions)
    cross_bias = mask_to_bias(enc_mask_BxS)
    x_BxTxD = dropout(y_BxTxD, self.dropout_rate, is_training)
    for layer in self.layers:
      cross_kv = layer.project_cross_kv(enc_BxSxDenc) if layer.has_cross_attention else None
      x_BxTxD, _, _ = layer(x_BxTxD, self_bias, cross_kv, cross_bias, is_training=is_training)
    return dropout(self.final_norm(x_BxTxD), self.dropout_rate, is_training)

  def init_cache(self, enc_BxSxDenc: jax.Array, enc_mask_BxS: jax.Array,
                 max_length: int) -> DecoderCache:
    """Projects cross-attention keys/values once and allocates empty self-attention caches.

    Cache memory scales with the kv heads: MQ (K = C = 1) shrinks it by the number of heads.
    """
    cross_kv = [layer.project_cross_kv(enc_BxSxDenc) for layer in self.layers
                if layer.has_cross_attention]
    b, k, e = enc_BxSxDenc.shape[0], self.num_kv_heads, self.d_kv
    empty_k = tuple(jnp.zeros((b, k, e, max_length), self.cache_dtype) for _ in self.layers)
    empty_v = tuple(jnp.zeros((b, k, max_length, e), self.cache_dtype) for _ in self.layers)
    return DecoderCache(position=jnp.zeros([], jnp.int32), self_k=empty_k, self_v=empty_v,
                        cross_k=tuple(k for k, _ in cross_kv), cross_v=tuple(v for _, v in cross_kv),
                        cross_bias=mask_to_bias(enc_mask_BxS))

  def step(self, y_Bx1xD: jax.Array, cache: DecoderCache, *, with_cross_attention: bool = False):
    """Decodes the token at `cache.position`; returns hidden [B, 1, D] and the updated cache, and
    with `with_cross_attention` the cross-attention probabilities over the encoder tokens averaged
    over heads and the cross-attending layers (only every K-th layer with LSA), float32 [B, S]."""
    max_length = cache.self_v[0].shape[2]
    self_bias = self._self_bias(cache.position[None], jnp.arange(max_length))
    x_Bx1xD = y_Bx1xD
    new_k, new_v, cross = [], [], []
    cross_kv = iter(zip(cache.cross_k, cache.cross_v))
    for i, layer in enumerate(self.layers):
      x_Bx1xD, (k, v), probs_Bx1xS = layer(
          x_Bx1xD, self_bias, next(cross_kv) if layer.has_cross_attention else None,
          cache.cross_bias, self_cache=(cache.self_k[i], cache.self_v[i], cache.position),
          is_training=False, with_cross_attention=with_cross_attention)
      new_k.append(k)
      new_v.append(v)
      if probs_Bx1xS is not None:
        cross.append(probs_Bx1xS[:, 0])
    cache = cache._replace(position=cache.position + 1, self_k=tuple(new_k), self_v=tuple(new_v))
    if with_cross_attention:
      return self.final_norm(x_Bx1xD), cache, sum(cross) / len(cross)
    return self.final_norm(x_Bx1xD), cache
