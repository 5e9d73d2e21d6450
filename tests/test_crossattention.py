"""Cross-attention scores per passage (fido.decoding.passage_scores) against a hand computation.

The model is made hand-computable: every residual update before the last cross-attention is
zeroed (self-attention and MLP outputs, the first cross-attention's output), so the query of each
cross-attending layer is RMSNorm(embedding of the input token) x W_q, and the scores follow from
the embeddings, the queries, the keys of the encoder output and the padding mask in numpy. The
last layer's cross-attention and MLP stay, so what is generated (and when EOS comes) depends on
the passages.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fido import decoding
from fido.model.fid import make_model
from tests.model_fixtures import custom, init_params

EOS = decoding.EOS_ID
CROSS_LAYERS = ('layer_01', 'layer_03')  # 4 layers, LSA period 2: layers 2 and 4 (1-based)


def _config(fid_light_k=1):
  return custom('tiny', 'tiny', dec_overrides=dict(num_layers=4), cross_attention_period=2,
                decoder_kv_heads=1, cross_kv_heads=2, fid_light_k=fid_light_k)


def _hand_computable(params):
  """Zeroes every residual update that reaches a cross-attention query but its input token's."""
  params = {m: dict(v) for m, v in params.items()}
  zero = lambda module, name: params[module].__setitem__(name, np.zeros_like(params[module][name]))
  for layer in ('layer_00', 'layer_01', 'layer_02', 'layer_03'):
    zero(f'decoder/~/{layer}/~/self_attention', 'output')
  for layer in ('layer_00', 'layer_01', 'layer_02'):
    zero(f'decoder/~/{layer}/~/mlp', 'wo')
  zero('decoder/~/layer_01/~/cross_attention', 'output')
  # The last cross-attention's output larger and EOS likelier, so that rows stop at different
  # steps (seed 2: greedy lengths 6, 2, 3; beam 2, 2, 3).
  last = params['decoder/~/layer_03/~/cross_attention']
  last['output'] = 4.0 * np.asarray(last['output'])
  w = np.array(params['output_projection']['w'])
  w[:, EOS] += 0.9 * np.abs(w).max()
  params['output_projection'] = dict(w=w)
  return params


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 96, size=(3, 3, 6)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, 1, 4:] = False   # a shorter passage
  mask[1, 2] = False       # an absent passage
  mask[2, 0, 2:] = False
  return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def hand_scores(params, enc_BxSxD, enc_mask_BxS, tokens_BxM, lengths_B, n_passages):
  """Per passage: attention probabilities summed over its tokens, averaged over heads, the two
  cross-attending layers and the generated tokens, by hand."""
  emb_VxD = np.asarray(params['shared_embedding']['embeddings'], np.float64)
  out = []
  for b in range(tokens_BxM.shape[0]):
    inputs = [0] + [int(t) for t in tokens_BxM[b, :lengths_B[b] - 1]]  # start token, then fed back
    total = np.zeros(enc_mask_BxS.shape[1])
    for layer in CROSS_LAYERS:
      attn = params[f'decoder/~/{layer}/~/cross_attention']
      scale = params[f'decoder/~/{layer}/~/cross_attention_norm']['scale']
      w_q_DxHxE = np.asarray(attn['query'], np.float64)
      w_k_DxCxE = np.asarray(attn['key'], np.float64)
      heads, kv_heads = w_q_DxHxE.shape[1], w_k_DxCxE.shape[1]
      keys_SxCxE = np.einsum('sd,dce->sce', np.asarray(enc_BxSxD[b], np.float64), w_k_DxCxE)
      for token in inputs:
        x_D = emb_VxD[token]
        h_D = x_D / np.sqrt(np.mean(x_D ** 2) + 1e-6) * scale
        q_HxE = np.einsum('d,dhe->he', h_D, w_q_DxHxE)
        for head in range(heads):
          logits_S = keys_SxCxE[:, head // (heads // kv_heads)] @ q_HxE[head]
          logits_S = np.where(enc_mask_BxS[b], logits_S, -np.inf)
          p_S = np.exp(logits_S - logits_S.max())
          total += p_S / p_S.sum()
    mean_S = total / (len(CROSS_LAYERS) * heads * len(inputs))
    out.append(mean_S.reshape(n_passages, -1).sum(axis=1))
  return np.stack(out)


@pytest.mark.parametrize('beam_size', [1, 3])
def test_scores_equal_the_hand_computation(beam_size):
  config = _config()
  model = make_model(config)
  params = _hand_computable(init_params(config, seed=2))
  ids, mask = _inputs()
  decode = decoding.make_decode_fn(model, max_length=6, beam_size=beam_size, cross_attention=True)
  out = decode(params, ids, mask)
  lengths = np.asarray(out.lengths)
  assert len(set(lengths.tolist())) > 1 and lengths.min() < 6, lengths  # EOS at different steps
  enc, enc_mask = model.encode(params, ids, mask)
  expected = hand_scores(params, np.asarray(enc), np.asarray(enc_mask), np.asarray(out.tokens),
                         lengths, ids.shape[1])
  np.testing.assert_allclose(np.asarray(out.passage_scores), expected, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out.passage_scores).sum(axis=1), 1.0, atol=1e-5)
  assert float(out.passage_scores[1, 2]) == 0.0  # the absent passage
  plain = decoding.make_decode_fn(model, max_length=6, beam_size=beam_size)(params, ids, mask)
  assert plain.passage_scores is None
  np.testing.assert_array_equal(plain.tokens, out.tokens)  # the scores change nothing else
  np.testing.assert_allclose(plain.scores, out.scores, rtol=1e-6)


def test_uniform_attention_gives_each_passage_its_share_of_tokens_with_fid_light():
  """Zero queries: every head attends uniformly to the kept, unmasked tokens (FiD-Light keeps the
  first 3 of 6 per passage), so a passage's score is its share of them."""
  config = _config(fid_light_k=2)
  model = make_model(config)
  params = init_params(config, seed=2)
  for layer in CROSS_LAYERS:
    module = f'decoder/~/{layer}/~/cross_attention'
    params[module] = dict(params[module], query=np.zeros_like(params[module]['query']))
  ids, mask = _inputs()
  out = jax.jit(lambda p, i, m: decoding.greedy_decode(model, p, i, m, max_length=4,
                                                       cross_attention=True))(params, ids, mask)
  kept_BxP = np.asarray(mask)[:, :, :3].sum(axis=2)
  np.testing.assert_allclose(out.passage_scores, kept_BxP / kept_BxP.sum(axis=1, keepdims=True),
                             atol=1e-6)
