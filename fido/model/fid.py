"""Fusion-in-Decoder: encode each passage separately, fuse by concatenation, decode over all of them.

Shape glossary: B batch, P passages, L passage length, S = P * L' fused length (L' = L // fid_light_k),
T target length, D width, V vocabulary.

`make_model(config.model)` returns pure functions over one Haiku parameter tree (hk.multi_transform):
  init(rng, passage_ids, passage_mask, decoder_input_ids) -> params
  forward(params, rng, passage_ids, passage_mask, decoder_input_ids, is_training) -> logits [B, T, V]
  encode(params, passage_ids, passage_mask) -> (enc [B, S, D_enc], enc_mask [B, S])
  init_cache(params, enc, enc_mask, max_length) -> DecoderCache (cross-attention K/V projected once)
  decode_step(params, token_ids [B], cache) -> (logits [B, V], cache)
  decode_step(params, token_ids, cache, with_cross_attention=True) -> (logits, cache, cross [B, S]):
      also the cross-attention probabilities averaged over heads and cross-attending layers
  load_params(float32 params) -> params: a checkpoint's tree as these functions read it
Logits are float32 whatever the compute dtype. With `config.decoder_weights` other than 'float32'
(inference only), the functions read the decode step's matrices in that format (fido.model.weights):
`load_params` converts a float32 tree, and `init` returns a converted one.
"""

from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import ml_collections

from fido.config import decoder_weights, shares_embedding, validate_model_config
from fido.model import weights
from fido.model.decoder import Decoder, DecoderCache
from fido.model.encoder import Encoder
from fido.model.layers import Embed
from fido.model.weights import get_matrix, matmul


def make_policy(dtype: str) -> jmp.Policy:
  """Parameters in float32, compute in `dtype`, outputs (logits) in float32."""
  return jmp.Policy(param_dtype=jnp.float32, compute_dtype=jnp.dtype(dtype),
                    output_dtype=jnp.float32)


def shift_right(target_ids_BxT: jax.Array, start_id: int = 0) -> jax.Array:
  """Decoder inputs for teacher forcing: the targets delayed by one, starting with T5's pad id."""
  start_Bx1 = jnp.full_like(target_ids_BxT[:, :1], start_id)
  return jnp.concatenate([start_Bx1, target_ids_BxT[:, :-1]], axis=1)


class OutputProjection(hk.Module):
  """Untied output layer [D, V]: no d_model**-0.5 rescaling of the logits (T5.1.1)."""

  def __init__(self, vocab_size: int, policy: jmp.Policy, name: str = 'output_projection',
               weights: str = 'float32'):
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self.policy = policy
    self.weights = weights

  def __call__(self, hidden_BxTxD: jax.Array) -> jax.Array:
    d_model = hidden_BxTxD.shape[-1]
    w_DxV = get_matrix('w', [d_model, self.vocab_size],
                       hk.initializers.RandomNormal(d_model**-0.5), self.weights)
    logits = matmul(hidden_BxTxD, w_DxV, self.policy, out_dtype=jnp.float32)
    return self.policy.cast_to_output(logits)


class FiD:
  """Holds the top-level Haiku modules; built and called inside `hk.multi_transform`."""

  def __init__(self, config: ml_collections.ConfigDict, policy: jmp.Policy):
    self.fid_light_k = config.fid_light_k
    # T5 shares one input embedding between the stacks; an asymmetric model cannot (widths differ).
    if shares_embedding(config):
      self.encoder_embedding = self.decoder_embedding = Embed(
          config.vocab_size, config.encoder.d_model, policy, name='shared_embedding')
    else:
      self.encoder_embedding = Embed(config.vocab_size, config.encoder.d_model, policy,
                                     name='encoder_embedding')
      self.decoder_embedding = Embed(config.vocab_size, config.decoder.d_model, policy,
                                     name='decoder_embedding')
    self.encoder = Encoder(config, policy, name='encoder')
    self.decoder = Decoder(config, policy, name='decoder')
    self.output_projection = OutputProjection(config.vocab_size, policy, name='output_projection',
                                              weights=decoder_weights(config))

  def encode(self, passage_ids_BxPxL: jax.Array, passage_mask_BxPxL: jax.Array, *,
             is_training: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs the encoder on each passage independently and concatenates the outputs."""
    b, p, l = passage_ids_BxPxL.shape
    mask_NxL = passage_mask_BxPxL.reshape(b * p, l).astype(bool)
    x_NxLxD = self.encoder_embedding(passage_ids_BxPxL.reshape(b * p, l))
    enc_NxLxD = self.encoder(x_NxLxD, mask_NxL, is_training=is_training)
    # FiD-Light (Hofstätter et al., 2022): the decoder sees only the first L // k tokens per passage.
    kept = l // self.fid_light_k
    enc_BxPxLxD = enc_NxLxD.reshape(b, p, l, -1)[:, :, :kept]
    mask_BxPxL = mask_NxL.reshape(b, p, l)[:, :, :kept]
    return enc_BxPxLxD.reshape(b, p * kept, -1), mask_BxPxL.reshape(b, p * kept)

  def __call__(self, passage_ids_BxPxL: jax.Array, passage_mask_BxPxL: jax.Array,
               decoder_input_ids_BxT: jax.Array, *, is_training: bool) -> jax.Array:
    enc_BxSxD, enc_mask_BxS = self.encode(passage_ids_BxPxL, passage_mask_BxPxL,
                                          is_training=is_training)
    y_BxTxD = self.decoder_embedding(decoder_input_ids_BxT)
    hidden_BxTxD = self.decoder(y_BxTxD, enc_BxSxD, enc_mask_BxS, is_training=is_training)
    return self.output_projection(hidden_BxTxD)

  def init_cache(self, enc_BxSxD: jax.Array, enc_mask_BxS: jax.Array,
                 max_length: int) -> DecoderCache:
    return self.decoder.init_cache(enc_BxSxD, enc_mask_BxS, max_length)

  def decode_step(self, token_ids_B: jax.Array, cache: DecoderCache, *,
                  with_cross_attention: bool = False):
    y_Bx1xD = self.decoder_embedding(token_ids_B[:, None])
    hidden_Bx1xD, cache, *cross_BxS = self.decoder.step(y_Bx1xD, cache,
                                                         with_cross_attention=with_cross_attention)
    return (self.output_projection(hidden_Bx1xD)[:, 0], cache, *cross_BxS)


class FiDFunctions(NamedTuple):
  """Pure functions over one parameter tree; see the module docstring for signatures."""
  init: Callable
  forward: Callable
  encode: Callable
  init_cache: Callable
  decode_step: Callable
  config: ml_collections.ConfigDict
  load_params: Callable


def stored_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model config of the float32 tree that checkpoints and training hold for `config`."""
  stored = ml_collections.ConfigDict(config.to_dict())
  stored.decoder_weights = 'float32'
  return stored


def make_model(config: ml_collections.ConfigDict) -> FiDFunctions:
  """Transforms the FiD model described by `config` (the `config.model` section)."""
  validate_model_config(config)
  policy = make_policy(config.dtype)

  def build():
    fid = FiD(config, policy)

    def init(passage_ids, passage_mask, decoder_input_ids):
      return fid(passage_ids, passage_mask, decoder_input_ids, is_training=False)

    return init, (fid.__call__, fid.encode, fid.init_cache, fid.decode_step)

  transformed = hk.multi_transform(build)
  forward_fn, encode_fn, init_cache_fn, decode_step_fn = transformed.apply

  def forward(params, rng, passage_ids, passage_mask, decoder_input_ids, is_training=False):
    return forward_fn(params, rng, passage_ids, passage_mask, decoder_input_ids,
                      is_training=is_training)

  def encode(params, passage_ids, passage_mask):
    return encode_fn(params, None, passage_ids, passage_mask)

  def init_cache(params, enc, enc_mask, max_length):
    return init_cache_fn(params, None, enc, enc_mask, max_length)

  def decode_step(params, token_ids, cache, with_cross_attention=False):
    return decode_step_fn(params, None, token_ids, cache,
                          with_cross_attention=with_cross_attention)

  weight_format = decoder_weights(config)
  init = transformed.init
  if weight_format != 'float32':
    float_init = make_model(stored_config(config)).init
    init = lambda *args, **kwargs: weights.convert_params(float_init(*args, **kwargs), weight_format)

  def load_params(params):
    return params if weight_format == 'float32' else weights.convert_params(params, weight_format)

  return FiDFunctions(init, forward, encode, init_cache, decode_step, config, load_params)


def init_params(model: FiDFunctions, rng: jax.Array, batch_size: int = 1, n_passages: int = 1,
                passage_len: int = 8, target_len: int = 4) -> hk.Params:
  """Initialises parameters with dummy inputs (parameter shapes do not depend on the input shapes)."""
  ids = jnp.zeros((batch_size, n_passages, passage_len), jnp.int32)
  return model.init(rng, ids, ids != 0, jnp.zeros((batch_size, target_len), jnp.int32))
