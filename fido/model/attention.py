"""T5 attention with a configurable number of key/value heads: MHA, grouped-query (GQA), multi-query.

Shape glossary: B batch, T query length, S key length, D model width, H query heads,
K key/value heads (H % K == 0), G = H // K query heads per key/value head, E = d_kv (head width).

Parameters (no biases, T5 convention):
  query  [D, H, E]   initialised with std (D * E)**-0.5: T5 folds the 1/sqrt(E) logit scale into it
  key    [D, K, E]   or [D, E] when K == 1 (multi-query: no head axis, FiDO §3.2)
  value  same as key
  output [H, E, D]

Mimetic initialisation (Trockman & Kolter, 2023, "Mimetic initialization of self-attention
layers"), per stack, for self-attention (0 = off: T5's independent normal draws):
  mimetic_qk = a  the key starts as a copy of the query (of each group's first head), rescaled to
                  the key's T5 std: W_q W_k^T = a sqrt(E) W_q W_q^T per head, positive semi-definite,
                  so from step 0 a token attends most to tokens like itself (the same word elsewhere)
  mimetic_vo = b  the output starts as sqrt(1 - b^2) Z - b sqrt(D / (H E)) W_v^T (Z: T5's draw),
                  so W_v W_o ~ -b I: a head's output subtracts what it found (b <= 1)
Both only change the initial values; trained and converted weights are used as they are.

Layouts chosen so that XLA never copies weights or caches (measured on CPU: a decode step otherwise
re-transposed every attention weight and the cross-attention keys at every token):
  projections are 2-D matmuls against the weights flattened to [D, H*E] / [H*E, D] (free reshapes);
  keys are kept as [B, K, E, S] and values as [B, K, S, E], queries as [B, K, G, T, E], so both
  attention matmuls are canonical batched matmuls over (B, K) with nothing to transpose.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import jmp

from fido.model import kv_heads
from fido.model.layers import dropout
from fido.model.weights import fuses, get_matrix, matmul


def _grouped(bias_BxHxTxS: jax.Array, num_kv_heads: int) -> jax.Array:
  """Reshapes a bias broadcastable to [B, H, T, S] into one broadcastable to [B, K, G, T, S]."""
  b, h, t, s = bias_BxHxTxS.shape
  if h == 1:
    return bias_BxHxTxS[:, :, None]
  return bias_BxHxTxS.reshape(b, num_kv_heads, h // num_kv_heads, t, s)


class Attention(hk.Module):
  """Dot-product attention whose query heads share K key/value heads (no logit scaling, as T5)."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, d_kv: int,
               dropout_rate: float, policy: jmp.Policy, name: str, weights: str = 'float32',
               kv_weights: str | None = None, mimetic_qk: float = 0.0, mimetic_vo: float = 0.0):
    """`weights`: the storage of query/output (fido.model.weights); `kv_weights`: of key/value
    (default: `weights`; cross-attention keeps its once-per-sequence projections float32);
    `mimetic_qk`, `mimetic_vo`: the mimetic initialisation of self-attention (module docstring)."""
    super().__init__(name=name)
    self.weights = weights
    self.kv_weights = weights if kv_weights is None else kv_weights
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    self.d_model = d_model  # the width of the residual stream this attention writes into
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.d_kv = d_kv
    self.dropout_rate = dropout_rate
    self.policy = policy
    self.mimetic_qk = mimetic_qk
    self.mimetic_vo = mimetic_vo

  def _query_init(self, d_in: int):
    return hk.initializers.RandomNormal((d_in * self.d_kv)**-0.5)

  def _kv_init(self, name: str, d_in: int):
    """T5's normal init of the key or value projection [D, K, E], or the mimetic key."""
    if name != 'key' or not self.mimetic_qk or not hk.running_init():
      return hk.initializers.RandomNormal(d_in**-0.5)
    # The query, created here with its own init if the caller projects keys first.
    w_q_DxHxE = hk.get_parameter('query', [d_in, self.num_heads, self.d_kv], jnp.float32,
                                 init=self._query_init(d_in))
    w_q_DxKxE = w_q_DxHxE.reshape(d_in, self.num_kv_heads, -1, self.d_kv)[:, :, 0]
    scale = self.mimetic_qk * self.d_kv**0.5  # query std (D E)^-1/2 -> key std a D^-1/2
    return lambda shape, dtype: (scale * w_q_DxKxE).reshape(shape).astype(dtype)

  def _output_init(self):
    """T5's normal init of the output projection [H, E, D], or its mimetic mix with -value^T."""
    h, e, d = self.num_heads, self.d_kv, self.d_model
    normal = hk.initializers.RandomNormal((h * e)**-0.5)
    if not self.mimetic_vo or not hk.running_init():
      return normal
    w_v = hk.get_parameter('value', kv_heads.kv_shape(d, self.num_kv_heads, e), jnp.float32)
    w_v_HxExD = jnp.repeat(w_v.reshape(d, self.num_kv_heads, e), h // self.num_kv_heads,
                           axis=1).transpose(1, 2, 0)
    b = self.mimetic_vo
    return lambda shape, dtype: ((1 - b**2)**0.5 * normal(shape, dtype)
                                 - b * (d / (h * e))**0.5 * w_v_HxExD).astype(dtype)

  def _kv_projection(self, name: str, x_BxSxD: jax.Array) -> jax.Array:
    """x @ the key or value projection (stored in fido.model.kv_heads' layout) -> [B, S, K * E]."""
    d_in = x_BxSxD.shape[-1]
    w = get_matrix(name, kv_heads.kv_shape(d_in, self.num_kv_heads, self.d_kv),
                   self._kv_init(name, d_in), self.kv_weights)
    return matmul(x_BxSxD, w, self.policy)

  def _kv_heads(self, k_BxSxKE: jax.Array, v_BxSxKE: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Projected keys and values [B, S, K * E] -> keys [B, K, E, S] and values [B, K, S, E]."""
    b, length, _ = k_BxSxKE.shape
    k_BxSxKxE = k_BxSxKE.reshape(b, length, self.num_kv_heads, self.d_kv)
    v_BxSxKxE = v_BxSxKE.reshape(b, length, self.num_kv_heads, self.d_kv)
    return k_BxSxKxE.transpose(0, 2, 3, 1), v_BxSxKxE.transpose(0, 2, 1, 3)

  def _query_heads(self, q_BxTxHE: jax.Array) -> jax.Array:
    """Projected queries [B, T, H * E] -> [B, K, G, T, E], grouped by the key/value head they share."""
    b, t, _ = q_BxTxHE.shape
    k = self.num_kv_heads
    return q_BxTxHE.reshape(b, t, k, self.num_heads // k, self.d_kv).transpose(0, 2, 3, 1, 4)

  def project_kv(self, x_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys [B, K, E, S] and values [B, K, S, E] of `x` (the encoder output for cross-attention)."""
    return self._kv_heads(self._kv_projection('key', x_BxSxD), self._kv_projection('value', x_BxSxD))

  def project_query(self, x_BxTxD: jax.Array) -> jax.Array:
    """Queries [B, K, G, T, E], grouped by the key/value head they share."""
    d_in = x_BxTxD.shape[-1]
    w_q_DxHE = get_matrix('query', [d_in, self.num_heads, self.d_kv], self._query_init(d_in),
                          self.weights)
    return self._query_heads(matmul(x_BxTxD, w_q_DxHE, self.policy))

  def project_qkv(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention's queries [B, K, G, T, E], keys [B, K, E, T] and values [B, K, T, E] of `x`.

    Converted weights (fido.model.weights.fuses) hold query|key|value as one matrix `qkv`
    [D, (H + 2K) * E]: one matmul, split along its output.
    """
    if not fuses(self.weights):
      k_BxKxExT, v_BxKxTxE = self.project_kv(x_BxTxD)
      return self.project_query(x_BxTxD), k_BxKxExT, v_BxKxTxE
    assert self.kv_weights == self.weights, (self.kv_weights, self.weights)
    h_e, k_e = self.num_heads * self.d_kv, self.num_kv_heads * self.d_kv
    w_qkv = get_matrix('qkv', [x_BxTxD.shape[-1], h_e + 2 * k_e], None, self.weights)
    q_BxTxHE, k_BxTxKE, v_BxTxKE = jnp.split(matmul(x_BxTxD, w_qkv, self.policy),
                                             [h_e, h_e + k_e], axis=-1)
    return self._query_heads(q_BxTxHE), *self._kv_heads(k_BxTxKE, v_BxTxKE)

  def attend(self, q_BxKxGxTxE: jax.Array, k_BxKxExS: jax.Array, v_BxKxSxE: jax.Array,
             bias: jax.Array, *, is_training: bool, return_weights: bool = False):
    """softmax(q k^T + bias) v, then the output projection; `bias` is float32 [B|1, H|1, T|1, S].

    Returns out [B, T, D], or with `return_weights` (out, the attention probabilities
    float32 [B, K, G, T, S] before dropout).
    """
    b, k, g, t, e = q_BxKxGxTxE.shape
    logits_BxKxGxTxS = jnp.einsum('bkgte,bkes->bkgts', q_BxKxGxTxE, k_BxKxExS,
                                  preferred_element_type=jnp.float32)
    probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS + _grouped(bias, k), axis=-1)
    weights = dropout(probs_BxKxGxTxS, self.dropout_rate, is_training).astype(v_BxKxSxE.dtype)
    out_BxKxGxTxE = jnp.einsum('bkgts,bkse->bkgte', weights, v_BxKxSxE)
    w_o_HExD = get_matrix('output', [k * g, e, self.d_model], self._output_init(), self.weights)
    out_BxTxD = matmul(out_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g * e), w_o_HExD,
                       self.policy)
    return (out_BxTxD, probs_BxKxGxTxS) if return_weights else out_BxTxD
