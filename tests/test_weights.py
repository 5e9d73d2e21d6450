"""Decoder weight storage (fido.model.weights): int8 / bfloat16 made from float32 trees at load time."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fido.config import cross_attention_layers
from fido.model import weights
from fido.model.fid import make_model
from model_fixtures import custom, flat, init_params


def fido_tiny(decoder_weights='float32'):
  """LSA (cross-attention in layer 2 of 2), multi-query, a decoder wider than the encoder."""
  return custom('tiny', 'micro', cross_attention_period=2, decoder_kv_heads=1, cross_kv_heads=1,
                decoder_weights=decoder_weights)


@pytest.mark.parametrize('shape, n_in', [((64, 48), 1), ((4, 16, 32), 2), ((32, 4, 8), 1)])
def test_dequantised_weights_are_within_half_a_step_of_float32(shape, n_in):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  w[..., 0] = 0.0  # an all-zero output channel: scale 1, exact zeros
  q, scale = weights.quantize(w, n_in)
  assert q.dtype == jnp.int8 and scale.shape == shape[n_in:]
  axes = tuple(range(n_in))
  np.testing.assert_allclose(scale[..., 1:], np.abs(w).max(axis=axes)[..., 1:] / 127, rtol=1e-6)
  error = np.abs(np.asarray(weights.dequantize(q, scale)) - w)
  assert np.all(error <= np.asarray(scale) / 2 * (1 + 1e-5))
  assert np.abs(np.asarray(q)).max() == 127  # the largest weight of a channel is +-127 steps
  np.testing.assert_array_equal(np.asarray(q)[..., 0], 0)


def test_convert_params_stores_exactly_the_decode_step_matrices():
  config = fido_tiny()
  params = init_params(config, seed=0)
  int8 = weights.convert_params(params, 'int8')
  converted = {f'{m}/{p}' for m, leaves in int8.items() for p, v in leaves.items()
               if v.dtype == jnp.int8}
  # query|key|value and wi_0|wi_1 fused (fido.model.weights.FUSED_MATRICES): 4 matmuls per layer.
  expected = {f'decoder/~/layer_{i:02d}/~/{m}/{p}' for i in range(2)
              for m, names in (('self_attention', ('qkv', 'output')), ('mlp', ('wi', 'wo')))
              for p in names}
  expected |= {'decoder/~/layer_01/~/cross_attention/query',
               'decoder/~/layer_01/~/cross_attention/output', 'output_projection/w'}
  assert converted == expected
  dec = config.decoder
  self_attention, mlp = int8['decoder/~/layer_00/~/self_attention'], int8['decoder/~/layer_00/~/mlp']
  assert set(self_attention) == {'qkv', 'qkv_scale', 'output', 'output_scale'}
  assert self_attention['qkv'].shape == (dec.d_model, (dec.num_heads + 2) * dec.d_kv)  # K = 1
  assert set(mlp) == {'wi', 'wi_scale', 'wo', 'wo_scale'} and mlp['wi'].shape == (dec.d_model,
                                                                                  2 * dec.d_ff)
  # Per-channel scales: the fused int8 matrix is its parts' int8, side by side.
  float_attention = params['decoder/~/layer_00/~/self_attention']
  parts = [weights.quantize(float_attention[p].reshape(dec.d_model, -1), 1)
           for p in ('query', 'key', 'value')]
  np.testing.assert_array_equal(self_attention['qkv'], np.concatenate([q for q, _ in parts], 1))
  np.testing.assert_array_equal(self_attention['qkv_scale'],
                                np.concatenate([s for _, s in parts]))
  cross = int8['decoder/~/layer_01/~/cross_attention']
  assert cross['key'].dtype == jnp.float32 and 'key_scale' not in cross  # once per sequence
  assert cross['output_scale'].shape == (config.decoder.d_model,)    # output [H, E, D]: per D
  assert int8['output_projection']['w_scale'].shape == (config.vocab_size,)
  assert all(v.dtype == jnp.float32 for m, leaves in int8.items() for p, v in leaves.items()
             if m.startswith('encoder') or 'embedding' in m)
  bf16 = weights.convert_params(params, 'bfloat16')
  assert {f'{m}/{p}' for m, leaves in bf16.items() for p, v in leaves.items()
          if v.dtype == jnp.bfloat16} == expected
  assert weights.convert_params(params, 'float32').keys() == params.keys()
  assert flat(weights.convert_params(params, 'float32')).keys() == flat(params).keys()  # unfused
  float_bytes = weights.step_bytes(params)
  assert weights.step_bytes(bf16) == float_bytes // 2
  assert float_bytes // 4 < weights.step_bytes(int8) < float_bytes // 3
  with pytest.raises(ValueError, match='already converted'):
    weights.convert_params(int8, 'int8')
  with pytest.raises(ValueError, match='already converted'):
    weights.convert_params(jax.tree.map(lambda w: w.astype(jnp.float32), bf16), 'int8')


@pytest.mark.parametrize('decoder_weights, rtol', [('int8', 1e-5), ('bfloat16', 2e-3)])
def test_fused_step_matrices_give_the_logits_of_separate_ones(monkeypatch, decoder_weights, rtol):
  # The same converted weights, fused at load (the default) and left as separate matrices.
  config = fido_tiny(decoder_weights)
  params = init_params(fido_tiny(), seed=2)
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(3, config.vocab_size, (2, 3, 6)), jnp.int32)
  targets = jnp.asarray(rng.integers(3, config.vocab_size, (2, 4)), jnp.int32)

  def run():
    model = make_model(config)
    stored = model.load_params(params)
    enc, enc_mask = model.encode(stored, ids, ids > 0)
    cache, steps, decode_step = model.init_cache(stored, enc, enc_mask, 4), [], jax.jit(model.decode_step)
    for token in jnp.concatenate([jnp.zeros((2, 1), jnp.int32), targets[:, :3]], 1).T:
      logits, cache = decode_step(stored, token, cache)
      steps.append(logits)
    return stored, jax.jit(model.forward)(stored, None, ids, ids > 0, targets), jnp.stack(steps, 1)

  fused, fused_forward, fused_steps = run()
  for module in ('weights', 'attention', 'layers'):
    monkeypatch.setattr(f'fido.model.{module}.fuses', lambda weights: False)
  separate, forward, steps = run()
  assert 'qkv' in fused['decoder/~/layer_00/~/self_attention']
  assert 'query' in separate['decoder/~/layer_00/~/self_attention']
  np.testing.assert_allclose(fused_forward, forward, rtol=rtol, atol=rtol * np.abs(forward).max())
  np.testing.assert_allclose(fused_steps, steps, rtol=rtol, atol=rtol * np.abs(steps).max())
  np.testing.assert_array_equal(fused_steps.argmax(-1), steps.argmax(-1))


@pytest.mark.parametrize('decoder_weights, tolerance', [('int8', 0.05), ('bfloat16', 0.02)])
def test_quantised_decoder_output_matches_float32(decoder_weights, tolerance):
  config = fido_tiny()
  params = init_params(config, seed=1)
  model, quantised = make_model(config), make_model(fido_tiny(decoder_weights))
  stored = quantised.load_params(params)
  assert model.load_params(params) is params  # float32: the checkpoint's tree as it is
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(3, config.vocab_size, (2, 3, 6)), jnp.int32)
  mask = jnp.ones(ids.shape, bool)
  targets = jnp.asarray(rng.integers(3, config.vocab_size, (2, 5)), jnp.int32)
  expected = jax.jit(model.forward)(params, None, ids, mask, targets)
  logits = jax.jit(quantised.forward)(stored, None, ids, mask, targets)
  error = float(jnp.max(jnp.abs(logits - expected)) / jnp.max(jnp.abs(expected)))
  assert 0 < error < tolerance
  # The cached decode steps (self- and cross-attention caches), fed the same tokens.
  enc, enc_mask = model.encode(params, ids, mask)

  def step_logits(fns, p):
    cache, out = fns.init_cache(p, enc, enc_mask, 3), []
    for token in (jnp.zeros((2,), jnp.int32), targets[:, 0], targets[:, 1]):
      logits, cache = fns.decode_step(p, token, cache)
      out.append(logits)
    return jnp.stack(out, axis=1)

  expected = jax.jit(lambda p: step_logits(model, p))(params)
  np.testing.assert_allclose(expected, jax.jit(model.forward)(params, None, ids, mask, jnp.concatenate(
      [jnp.zeros((2, 1), jnp.int32), targets[:, :2]], axis=1)), atol=1e-4)
  logits = jax.jit(lambda p: step_logits(quantised, p))(stored)
  error = float(jnp.max(jnp.abs(logits - expected)) / jnp.max(jnp.abs(expected)))
  assert 0 < error < tolerance


def test_int8_decode_step_reads_int8_weights_in_its_matmuls():
  # XLA:CPU does not fuse an int8 -> float conversion into a dot: a converted weight would be
  # written and read again in float32. The step must multiply the int8 weights themselves.
  config = fido_tiny('int8')
  model = make_model(config)
  params = model.load_params(init_params(fido_tiny(), seed=0))
  enc, enc_mask = jnp.ones((2, 6, config.encoder.d_model)), jnp.ones((2, 6), bool)
  cache = model.init_cache(params, enc, enc_mask, 4)
  hlo = jax.jit(model.decode_step).lower(params, jnp.zeros((2,), jnp.int32),
                                         cache).compile().as_text()
  dec, v = config.decoder, config.vocab_size
  d, f, qkv = dec.d_model, dec.d_ff, (dec.num_heads + 2 * dec.num_kv_heads) * dec.d_kv
  for shape in (f's8[{d},{2 * f}]', f's8[{f},{d}]', f's8[{d},{v}]', f's8[{d},{qkv}]'):
    assert shape in hlo
  for shape in (f'{d},{v}', f'{d},{f}', f'{d},{2 * f}', f'{f},{d}', f'{d},{qkv}'):
    assert f'f32[{shape}]' not in hlo and f'bf16[{shape}]' not in hlo
  # One int8 matmul per matrix, fused: per layer qkv, output, wi, wo; the cross-attention's query
  # and output; the output layer.
  int8_dots = re.findall(r'= s32\[[0-9,]+\]\S* dot\(', hlo)
  assert len(int8_dots) == 4 * dec.num_layers + 2 * len(cross_attention_layers(dec)) + 1


def test_configs_saved_before_decoder_weights_read_as_float32():
  config = custom('tiny')
  del config['decoder_weights']
  params = init_params(config, seed=0)
  assert all(v.dtype == jnp.float32 for leaves in params.values() for v in leaves.values())
