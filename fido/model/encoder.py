"""T5.1.1 encoder stack: pre-norm self-attention and gated-GELU blocks over one passage at a time.

Shape glossary: N sequences (in FiD, batch x passages), L sequence length, D width, H heads.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections

from fido.model.attention import Attention
from fido.model.layers import GatedGeluMLP, RelativePositionBias, RMSNorm, dropout, large_negative


class EncoderLayer(hk.Module):
  """x + SelfAttention(RMSNorm(x)), then x + MLP(RMSNorm(x)); dropout on each residual branch."""

  def __init__(self, config: ml_collections.ConfigDict, policy: jmp.Policy, name: str):
    super().__init__(name=name)
    stack, eps = config.encoder, config.layer_norm_epsilon
    self.dropout_rate = config.dropout_rate
    self.self_attention_norm = RMSNorm(eps, policy, name='self_attention_norm')
    self.self_attention = Attention(stack.d_model, stack.num_heads, stack.num_kv_heads, stack.d_kv,
                                    config.dropout_rate, policy, name='self_attention',
                                    mimetic_qk=stack.get('mimetic_qk', 0.0),
                                    mimetic_vo=stack.get('mimetic_vo', 0.0))
    self.mlp_norm = RMSNorm(eps, policy, name='mlp_norm')
    self.mlp = GatedGeluMLP(stack.d_ff, config.dropout_rate, policy, name='mlp')

  def __call__(self, x_NxLxD: jax.Array, bias_NxHxLxL: jax.Array, *, is_training: bool) -> jax.Array:
    h_NxLxD = self.self_attention_norm(x_NxLxD)
    k, v = self.self_attention.project_kv(h_NxLxD)
    h_NxLxD = self.self_attention.attend(self.self_attention.project_query(h_NxLxD), k, v,
                                         bias_NxHxLxL, is_training=is_training)
    x_NxLxD = x_NxLxD + dropout(h_NxLxD, self.dropout_rate, is_training)
    h_NxLxD = self.mlp(self.mlp_norm(x_NxLxD), is_training=is_training)
    return x_NxLxD + dropout(h_NxLxD, self.dropout_rate, is_training)


class Encoder(hk.Module):
  """Embedded tokens [N, L, D] and their mask [N, L] -> contextual states [N, L, D]."""

  def __init__(self, config: ml_collections.ConfigDict, policy: jmp.Policy, name: str = 'encoder'):
    super().__init__(name=name)
    self.dropout_rate = config.dropout_rate
    # One bidirectional relative position bias for the whole stack, shared by all its layers.
    self.relative_position_bias = RelativePositionBias(
        config.encoder.num_heads, bidirectional=True,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance, name='relative_position_bias',
        init_std=config.encoder.get('position_bias_init_std', 1.0))
    self.layers = [EncoderLayer(config, policy, name=f'layer_{i:02d}')
                   for i in range(config.encoder.num_layers)]
    self.final_norm = RMSNorm(config.layer_norm_epsilon, policy, name='final_norm')

  def __call__(self, x_NxLxD: jax.Array, mask_NxL: jax.Array, *, is_training: bool) -> jax.Array:
    positions = jnp.arange(x_NxLxD.shape[1])
    bias_NxHxLxL = jnp.where(mask_NxL[:, None, None, :],
                             self.relative_position_bias(positions, positions),
                             large_negative(jnp.float32))
    x_NxLxD = dropout(x_NxLxD, self.dropout_rate, is_training)
    for layer in self.layers:
      x_NxLxD = layer(x_NxLxD, bias_NxHxLxL, is_training=is_training)
    return dropout(self.final_norm(x_NxLxD), self.dropout_rate, is_training)
