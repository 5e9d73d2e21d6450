"""Model core: parameter shapes, information flow, cached decoding, attention variants, precision."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fido.config import model_config
from fido.decoding import beam_search, greedy_decode, greedy_pick
from fido.model.attention import Attention
from fido.model.decoder import Decoder
from fido.model.encoder import Encoder
from fido.model.fid import make_model, make_policy, shift_right

VOCAB = 64


def tiny(**kwargs):
  kwargs.setdefault('vocab_size', VOCAB)
  return model_config(kwargs.pop('encoder', 'tiny'), kwargs.pop('decoder', None), **kwargs)


def random_batch(seed=0, batch=2, passages=3, length=8, target_len=5):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, VOCAB, size=(batch, passages, length)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[0, 1, 5:] = False  # a short passage
  mask[1, 2, :] = False   # an absent passage
  ids[~mask] = 0
  targets = rng.integers(3, VOCAB, size=(batch, target_len)).astype(np.int32)
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(targets)


def jitted(model):
  """The model with jit-compiled functions: op-by-op dispatch would make the tests slow."""
  return model._replace(
      init=jax.jit(model.init), forward=jax.jit(model.forward, static_argnames='is_training'),
      encode=jax.jit(model.encode), init_cache=jax.jit(model.init_cache, static_argnums=3),
      decode_step=jax.jit(model.decode_step))


def init(config, seed=0, **batch_kwargs):
  model = jitted(make_model(config))
  ids, mask, targets = random_batch(**batch_kwargs)
  params = model.init(jax.random.PRNGKey(seed), ids, mask, shift_right(targets))
  return model, params


def shapes(params):
  return {f'{path}/{name}': tuple(v.shape) for path, leaves in params.items()
          for name, v in leaves.items()}


# ---------------------------------------------------------------- golden parameter shapes


def test_golden_shapes_fido_lsa_mq_asymmetric():
  config = tiny(encoder='tiny', decoder='mini', cross_attention_period=2, decoder_kv_heads=1,
                cross_kv_heads=1)
  model = make_model(config)
  ids, mask, targets = random_batch()
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, mask, targets)
  got = shapes(params)
  d_enc, d_dec, e = 32, 128, 32
  # Asymmetric widths: separate embeddings; no shared one.
  assert got['encoder_embedding/embeddings'] == (VOCAB, d_enc)
  assert got['decoder_embedding/embeddings'] == (VOCAB, d_dec)
  assert 'shared_embedding/embeddings' not in got
  assert got['output_projection/w'] == (d_dec, VOCAB)
  # LSA: only 1-based layers 2 and 4 of the 4-layer decoder cross-attend.
  cross = sorted({k.split('/~/')[1] for k in got if 'cross_attention' in k})
  assert cross == ['layer_01', 'layer_03']
  for layer in ('layer_00', 'layer_02'):
    assert not any(k.startswith(f'decoder/~/{layer}/~/cross') for k in got)
  # MQ: key/value projections have no head axis; cross-attention keys read the encoder width.
  assert got['decoder/~/layer_01/~/cross_attention/key'] == (d_enc, e)
  assert got['decoder/~/layer_01/~/cross_attention/value'] == (d_enc, e)
  assert got['decoder/~/layer_01/~/cross_attention/query'] == (d_dec, 4, e)
  assert got['decoder/~/layer_01/~/cross_attention/output'] == (4, e, d_dec)
  assert got['decoder/~/layer_00/~/self_attention/key'] == (d_dec, e)
  # The encoder stays MHA.
  assert got['encoder/~/layer_00/~/self_attention/key'] == (d_enc, 4, 8)
  assert got['encoder/~/relative_position_bias/embeddings'] == (32, 4)
  assert got['decoder/~/relative_position_bias/embeddings'] == (32, 4)
  assert got['decoder/~/layer_03/~/mlp/wi_0'] == (d_dec, 256)
  # Exactly the T5.1.1 parameter set: no biases anywhere.
  assert all(k.rsplit('/', 1)[1] in {'embeddings', 'w', 'scale', 'query', 'key', 'value', 'output',
                                     'wi_0', 'wi_1', 'wo'} for k in got)


def test_golden_shapes_fid_shares_embedding_and_gqa():
  _, params = init(tiny(decoder_kv_heads=2))
  got = shapes(params)
  assert got['shared_embedding/embeddings'] == (VOCAB, 32)
  assert got['decoder/~/layer_00/~/self_attention/key'] == (32, 2, 8)
  assert got['decoder/~/layer_00/~/cross_attention/key'] == (32, 4, 8)  # cross stays MHA
  assert sum('cross_attention/query' in k for k in got) == 2  # K = 1: every layer (FiD)


# ---------------------------------------------------------------- information flow


def test_no_information_flows_between_passages_in_the_encoder():
  config = tiny()
  policy = make_policy('float32')
  encoder = hk.without_apply_rng(hk.transform(
      lambda x, m: Encoder(config, policy)(x, m, is_training=False)))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 32))
  mask = jnp.ones((3, 6), bool)
  params = encoder.init(jax.random.PRNGKey(1), x, mask)
  jacobian = jax.jit(jax.jacobian(lambda x: encoder.apply(params, x, mask)[0]))(x)  # [6, 32, 3, 6, 32]
  assert np.abs(jacobian[:, :, 1:]).max() == 0.0
  assert np.abs(jacobian[:, :, 0]).max() > 1e-3


def test_decoder_is_causal():
  config = tiny()
  policy = make_policy('float32')
  decoder = hk.without_apply_rng(hk.transform(
      lambda y, enc, m: Decoder(config, policy)(y, enc, m, is_training=False)))
  y = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 32))
  enc = jax.random.normal(jax.random.PRNGKey(1), (1, 7, 32))
  mask = jnp.ones((1, 7), bool)
  params = decoder.init(jax.random.PRNGKey(2), y, enc, mask)
  jacobian = jax.jit(jax.jacobian(lambda y: decoder.apply(params, y, enc, mask)[0]))(y)  # [5, 32, 1, 5, 32]
  for t in range(5):
    assert not np.any(jacobian[t, :, 0, t + 1:]), t
    assert np.abs(jacobian[t, :, 0, :t + 1]).max() > 1e-3, t


def test_padded_and_absent_passages_contribute_nothing():
  model, params = init(tiny(cross_attention_period=2, decoder_kv_heads=1, cross_kv_heads=1))
  ids, mask, targets = random_batch()
  logits = model.forward(params, None, ids, mask, shift_right(targets))
  # Add two more absent passages with garbage tokens: masked tokens must not matter.
  extra = jnp.full((2, 2, 8), 7, jnp.int32)
  logits_more = model.forward(params, None, jnp.concatenate([ids, extra], 1),
                              jnp.concatenate([mask, jnp.zeros_like(extra, bool)], 1),
                              shift_right(targets))
  np.testing.assert_allclose(logits, logits_more, atol=1e-5)
  assert not np.isnan(logits).any()


def test_fid_light_keeps_the_first_tokens_of_each_passage():
  config = tiny()
  model, params = init(config)
  config_light = tiny()
  config_light.fid_light_k = 4
  light = jitted(make_model(config_light))
  ids, mask, _ = random_batch()
  enc, enc_mask = model.encode(params, ids, mask)
  enc_light, mask_light = light.encode(params, ids, mask)
  assert enc_light.shape == (2, 3 * 2, 32)
  np.testing.assert_array_equal(enc_light.reshape(2, 3, 2, 32), enc.reshape(2, 3, 8, 32)[:, :, :2])
  np.testing.assert_array_equal(mask_light.reshape(2, 3, 2), enc_mask.reshape(2, 3, 8)[:, :, :2])


# ---------------------------------------------------------------- attention variants


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
  policy = make_policy('float32')
  h, k, e, d = 4, 2, 8, 32

  def attention(num_kv):
    def f(x, enc):
      att = Attention(d, h, num_kv, e, 0.0, policy, name='attention')
      return att.attend(att.project_query(x), *att.project_kv(enc), jnp.zeros((1, 1, 1, 1)),
                        is_training=False)
    return hk.without_apply_rng(hk.transform(f))

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, d))
  enc = jax.random.normal(jax.random.PRNGKey(1), (2, 5, d))
  gqa, mha = attention(k), attention(h)
  params = gqa.init(jax.random.PRNGKey(2), x, enc)
  mha_params = {'attention': dict(params['attention'])}
  for name in ('key', 'value'):
    mha_params['attention'][name] = jnp.repeat(params['attention'][name], h // k, axis=1)
  np.testing.assert_allclose(gqa.apply(params, x, enc), mha.apply(mha_params, x, enc), atol=1e-5)

  # num_kv_heads == num_heads is plain multi-head attention, checked against an explicit formula.
  p = mha_params['attention']
  q = np.einsum('btd,dhe->bhte', x, p['query'])
  kk = np.einsum('bsd,dhe->bhse', enc, p['key'])
  v = np.einsum('bsd,dhe->bhse', enc, p['value'])
  weights = jax.nn.softmax(np.einsum('bhte,bhse->bhts', q, kk), axis=-1)
  expected = np.einsum('bhts,bhse,hed->btd', weights, v, p['output'])
  np.testing.assert_allclose(mha.apply(mha_params, x, enc), expected, atol=1e-5)


# ---------------------------------------------------------------- cached decoding


@pytest.mark.parametrize('variant', [dict(), dict(cross_attention_period=2, decoder_kv_heads=1,
                                                  cross_kv_heads=1, decoder='mini')])
def test_cached_steps_equal_full_forward(variant):
  model, params = init(tiny(**variant))
  ids, mask, targets = random_batch()
  decoder_inputs = shift_right(targets)
  full = model.forward(params, None, ids, mask, decoder_inputs)
  enc, enc_mask = model.encode(params, ids, mask)
  cache = model.init_cache(params, enc, enc_mask, max_length=7)
  for t in range(targets.shape[1]):
    logits, cache = model.decode_step(params, decoder_inputs[:, t], cache)
    np.testing.assert_allclose(logits, full[:, t], atol=2e-5, rtol=1e-5)


def naive_greedy(model, params, ids, mask, max_length):
  """Reference: recompute the whole prefix with the teacher-forced forward pass at every step.

  The prefix is right-padded to max_length (one compiled shape); causality makes the padding inert.
  """
  tokens = np.zeros((ids.shape[0], max_length), np.int32)
  for t in range(max_length):
    logits = model.forward(params, None, ids, mask, shift_right(tokens))
    tokens[:, t] = np.asarray(logits[:, t].argmax(-1))
  return tokens


def test_cached_greedy_equals_uncached_recomputation_and_jit_equals_no_jit():
  model, params = init(tiny(cross_attention_period=2, decoder_kv_heads=1, decoder='mini'), seed=3)
  ids, mask, _ = random_batch()
  out = jax.jit(lambda p, i, m: greedy_decode(model, p, i, m, max_length=6, stop_at_eos=False))(
      params, ids, mask)
  np.testing.assert_array_equal(out.tokens, naive_greedy(model, params, ids, mask, 6))
  # Without jit: the same pure functions dispatched op by op give the same results.
  eager = make_model(model.config)
  eager_logits = eager.forward(params, None, ids, mask, shift_right(out.tokens))
  np.testing.assert_allclose(eager_logits, model.forward(params, None, ids, mask,
                                                         shift_right(out.tokens)), atol=1e-5)


def test_greedy_stops_at_eos_and_reports_lengths():
  model, params = init(tiny(), seed=1)
  ids, mask, _ = random_batch()
  # Make EOS the argmax after the first token of row 0 by biasing the output layer towards id 1.
  free = jax.jit(lambda p: greedy_decode(model, p, ids, mask, max_length=6, stop_at_eos=False))(
      params)
  params = jax.tree_util.tree_map(lambda x: x, params)
  w = params['output_projection']['w']
  first = int(free.tokens[0, 0])
  eos_bias = jnp.zeros_like(w).at[:, 1].set(w[:, first] * 0.999)
  params['output_projection'] = {'w': w + eos_bias}
  out = jax.jit(lambda p: greedy_decode(model, p, ids, mask, max_length=6))(params)
  assert out.tokens.shape == (2, 6)
  tokens = np.asarray(out.tokens)
  for row in range(2):
    eos = np.flatnonzero(tokens[row] == 1)
    if eos.size:
      assert out.lengths[row] == eos[0] + 1
      assert (tokens[row, eos[0] + 1:] == 0).all()
    else:
      assert out.lengths[row] == 6
  assert (tokens == 1).any(), 'the biased model should emit EOS somewhere'


def sequence_logp(model, params, ids, mask, tokens, lengths):
  logits = model.forward(params, None, ids, mask, shift_right(tokens))
  logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None],
                            2)[..., 0]
  return (logp * (np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None])).sum(1)


def test_beam_search_scores_are_sequence_log_probs_and_never_below_greedy():
  model, params = init(tiny(cross_attention_period=2, decoder_kv_heads=1), seed=2)
  ids, mask, _ = random_batch()
  greedy = jax.jit(lambda p: greedy_decode(model, p, ids, mask, max_length=5))(params)
  for width in (1, 3):
    beam = jax.jit(lambda p: beam_search(model, p, ids, mask, beam_size=width, max_length=5,
                                         alpha=0.0))(params)
    # With alpha = 0 the score is the log-probability; greedy's path is always a candidate.
    np.testing.assert_allclose(beam.scores, sequence_logp(model, params, ids, mask, beam.tokens,
                                                          beam.lengths), rtol=1e-4)
    assert (np.asarray(beam.scores) >= np.asarray(greedy.scores) - 1e-4).all()
  np.testing.assert_allclose(greedy.scores, sequence_logp(model, params, ids, mask, greedy.tokens,
                                                          greedy.lengths), rtol=1e-4)


def test_exhaustive_beam_search_finds_the_most_likely_sequence():
  vocab, max_length = 5, 3
  config = tiny(vocab_size=vocab, cross_attention_period=2, decoder_kv_heads=1)
  model = jitted(make_model(config))
  ids = jnp.asarray(np.random.default_rng(0).integers(2, vocab, (2, 2, 6)), jnp.int32)
  mask = jnp.ones_like(ids, bool)
  params = model.init(jax.random.PRNGKey(4), ids, mask, jnp.zeros((2, 3), jnp.int32))
  # Sharpen the output distribution so that the search is not trivially flat.
  params['output_projection'] = {'w': params['output_projection']['w'] * 8}

  # Brute force: every sequence that ends at EOS or at max_length, scored by log-prob / penalty.
  candidates = []
  for length in range(1, max_length + 1):
    for seq in np.ndindex(*(vocab,) * length):
      if 1 in seq[:-1] or (length < max_length and seq[-1] != 1):
        continue
      candidates.append(list(seq) + [0] * (max_length - length))
  candidates = np.asarray(candidates, np.int32)
  alpha = 0.6
  best = []
  for row in range(2):
    n = len(candidates)
    logits = model.forward(params, None, jnp.repeat(ids[row:row + 1], n, 0),
                           jnp.repeat(mask[row:row + 1], n, 0), shift_right(candidates))
    logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), candidates[:, :, None], 2)[..., 0]
    lengths = np.where((candidates == 1).any(1), (candidates == 1).argmax(1) + 1, max_length)
    valid = np.arange(max_length)[None] < lengths[:, None]
    scores = (logp * valid).sum(1) / ((5 + lengths) / 6) ** alpha
    best.append((candidates[scores.argmax()], scores.max()))
  out = jax.jit(lambda p: beam_search(model, p, ids, mask, beam_size=vocab**(max_length - 1),
                                      max_length=max_length, alpha=alpha))(params)
  for row in range(2):
    np.testing.assert_array_equal(out.tokens[row], best[row][0])
    np.testing.assert_allclose(out.scores[row], best[row][1], rtol=1e-4)


# ---------------------------------------------------------------- precision and memory


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = tiny(cross_attention_period=2, decoder_kv_heads=1)
  model, params = init(config)
  config_bf16 = tiny(cross_attention_period=2, decoder_kv_heads=1, dtype='bfloat16')
  model_bf16 = jitted(make_model(config_bf16))
  ids, mask, targets = random_batch()
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  logits32 = model.forward(params, None, ids, mask, shift_right(targets))
  logits16 = model_bf16.forward(params, None, ids, mask, shift_right(targets))
  assert logits16.dtype == jnp.float32
  assert not np.array_equal(logits32, logits16)  # really computed in bfloat16
  np.testing.assert_allclose(logits16, logits32, atol=0.15 * float(np.abs(logits32).max()))
  enc, enc_mask = model_bf16.encode(params, ids, mask)
  assert enc.dtype == jnp.bfloat16
  cache = model_bf16.init_cache(params, enc, enc_mask, 4)
  assert cache.self_k[0].dtype == jnp.bfloat16 and cache.cross_k[0].dtype == jnp.bfloat16


def cache_bytes(config, batch=2, max_length=4):
  model = make_model(config)
  ids, mask, targets = random_batch(batch=batch)

  def cache_fn():
    params = model.init(jax.random.PRNGKey(0), ids, mask, targets)
    return model.init_cache(params, *model.encode(params, ids, mask), max_length)

  cache = jax.eval_shape(cache_fn)
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


def test_multi_query_and_lsa_shrink_the_decoder_cache():
  fid = cache_bytes(tiny())
  mq = cache_bytes(tiny(decoder_kv_heads=1, cross_kv_heads=1))
  lsa_mq = cache_bytes(tiny(decoder_kv_heads=1, cross_kv_heads=1, cross_attention_period=2))
  bias_bytes = 2 * 3 * 8 * 4  # the cross-attention mask bias, [B, 1, 1, S] float32
  assert (mq - bias_bytes - 4) * 4 == (fid - bias_bytes - 4)  # 4 heads -> 1: a quarter
  assert lsa_mq < mq


def test_greedy_pick_is_argmax_with_first_tie_and_its_log_probability():
  logits = jnp.array([[0.0, 3.0, 1.0, 3.0],     # a tie: the first maximum wins, as jnp.argmax
                      [5.0, -1.0, 2.0, 4.9],
                      [jnp.nan, 0.0, 1.0, 2.0]])  # NaN logits still give an in-range token
  tokens, logp = jax.jit(greedy_pick)(logits)
  assert tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens[:2], [1, 0])
  assert 0 <= int(tokens[2]) < 4
  expected = jax.nn.log_softmax(logits[:2])[jnp.arange(2), tokens[:2]]
  np.testing.assert_allclose(logp[:2], expected, rtol=1e-6)
  random = jax.random.normal(jax.random.PRNGKey(0), (8, 1000))
  np.testing.assert_array_equal(greedy_pick(random)[0], jnp.argmax(random, axis=-1))


def test_position_bias_init_std_is_per_stack_and_validated():
  from fido.config import ConfigError, validate_model_config  # pylint: disable=g-import-not-at-top
  from fido.model.fid import init_params  # pylint: disable=g-import-not-at-top
  config = model_config('micro')
  config.encoder.position_bias_init_std = 4.0
  params = init_params(make_model(config), jax.random.PRNGKey(0))
  std = {stack: float(np.std(params[f'{stack}/~/relative_position_bias']['embeddings']))
         for stack in ('encoder', 'decoder')}
  assert 3.0 < std['encoder'] < 5.0 and 0.7 < std['decoder'] < 1.3, std
  config.decoder.position_bias_init_std = 0.0
  with pytest.raises(ConfigError, match='decoder.position_bias_init_std=0.0'):
    validate_model_config(config)


@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])  # MHA, GQA, MQ
def test_mimetic_init_ties_key_to_query_and_output_to_minus_value(num_kv_heads):
  from fido.config import ConfigError, validate_model_config  # pylint: disable=g-import-not-at-top
  from fido.model.fid import init_params  # pylint: disable=g-import-not-at-top
  config = model_config('micro')  # 4 heads of 16, width 64, in both stacks
  config.encoder.update(num_kv_heads=num_kv_heads, mimetic_qk=1.0, mimetic_vo=0.6)
  config.decoder.update(num_kv_heads=num_kv_heads, mimetic_qk=1.0, mimetic_vo=0.6)
  params = init_params(make_model(config), jax.random.PRNGKey(0))
  for stack in ('encoder', 'decoder'):
    attention = params[f'{stack}/~/layer_01/~/self_attention']
    q, k, v, o = (np.asarray(attention[n]) for n in ('query', 'key', 'value', 'output'))
    d, h, e = q.shape
    g = h // num_kv_heads
    # The key is each group's first query head at the key's T5 scale (std D^-1/2).
    first_heads = q.reshape(d, num_kv_heads, g, e)[:, :, 0]
    np.testing.assert_allclose(k.reshape(first_heads.shape), e**0.5 * first_heads, rtol=1e-6)
    np.testing.assert_allclose(np.std(k), d**-0.5, rtol=0.15)
    # So in every key/value group a token's logit is largest against itself.
    x = np.random.default_rng(0).normal(size=(16, d))
    logits = np.einsum('kte,kse->kts', np.einsum('td,dke->kte', x, first_heads),
                       np.einsum('sd,dke->kse', x, k.reshape(d, num_kv_heads, e)))
    assert (np.argmax(logits, axis=-1) == np.arange(16)).mean() > 0.9, stack
    # W_v W_o over the heads ~ -0.6 I (H E = D): its diagonal, not its off-diagonal, is large.
    vo = np.einsum('dhe,hef->df', np.repeat(v.reshape(d, num_kv_heads, e), g, axis=1), o)
    np.testing.assert_allclose(np.diag(vo).mean(), -0.6, atol=0.1)
    assert np.abs(vo - np.diag(np.diag(vo))).mean() < 0.2, stack
  # Cross-attention keeps T5's independent draws (its queries and keys read different streams).
  cross = params['decoder/~/layer_00/~/cross_attention']
  assert abs(np.corrcoef(cross['key'].ravel(), cross['query'].ravel())[0, 1]) < 0.1
  config.encoder.mimetic_vo = 1.5
  with pytest.raises(ConfigError, match=r'encoder\.mimetic_vo=1\.5'):
    validate_model_config(config)
  config.encoder.mimetic_vo, config.decoder.mimetic_qk = 0.0, -1.0
  with pytest.raises(ConfigError, match=r'decoder\.mimetic_qk=-1\.0'):
    validate_model_config(config)


def test_mimetic_init_is_off_by_default_and_changes_only_the_initial_values():
  from fido.model.fid import init_params  # pylint: disable=g-import-not-at-top
  config = model_config('micro')
  assert config.encoder.mimetic_qk == config.encoder.mimetic_vo == 0.0
  model = make_model(config)
  params = init_params(model, jax.random.PRNGKey(0))
  for stack in ('encoder', 'decoder'):
    attention = params[f'{stack}/~/layer_00/~/self_attention']
    assert abs(np.corrcoef(attention['key'].ravel(), attention['query'].ravel())[0, 1]) < 0.1
  # The same parameters compute the same function whatever the init fields say.
  config.encoder.update(mimetic_qk=1.0, mimetic_vo=0.5)
  ids, mask, targets = random_batch()
  forward = lambda m: m.forward(params, None, ids, mask, shift_right(targets), is_training=False)
  np.testing.assert_array_equal(forward(model), forward(make_model(config)))
