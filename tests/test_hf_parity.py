"""Numerical parity with Hugging Face T5.1.1 (float32): encoder states, logits, greedy tokens, round trip.

FiD is T5 with each passage encoded separately and the encoder outputs concatenated, so the HF reference
runs HF's encoder on [B*P, L], concatenates to [B, P*L, D] and feeds that (with the flattened mask) to
HF's decoder / `generate(encoder_outputs=...)`.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from fido import convert  # pylint: disable=g-import-not-at-top
from fido.decoding import greedy_decode  # pylint: disable=g-import-not-at-top
from fido.model.fid import make_model, shift_right  # pylint: disable=g-import-not-at-top
try:
  from tests import hf_reference  # pylint: disable=g-import-not-at-top
except ImportError:  # tests/ is not a package: pytest put it on sys.path
  import hf_reference  # pylint: disable=g-import-not-at-top

TOL = 1e-4
VOCAB = 128
MAX_NEW = 8


@pytest.fixture(scope='module')
def hf_model():
  # inner width H*E = 64 != d_model = 48 ('custom'), an extra decoder layer, and few buckets with a
  # short max distance so that short test sequences reach T5's log-spaced buckets.
  hf_config = hf_reference.tiny_t5_config(d_model=48, d_ff=96, num_heads=4, d_kv=16, num_layers=2,
                                          num_decoder_layers=3, vocab_size=VOCAB,
                                          relative_attention_num_buckets=16,
                                          relative_attention_max_distance=16)
  return hf_reference.random_t5(hf_config, seed=0)


@pytest.fixture(scope='module')
def converted(hf_model, tmp_path_factory):
  directory = hf_reference.save_t5(hf_model, tmp_path_factory.mktemp('hf_t5'))
  hf_config, tensors = convert.load_hf_t5(directory)
  config = convert.fid_config_from_hf(hf_config)
  return make_model(config), convert.hf_to_params(hf_config, tensors, config), tensors


def jitted(model):
  """Whole-graph compiles are faster on CPU than Haiku's op-by-op dispatch of the unjitted functions."""
  decode = functools.partial(greedy_decode, model)
  return (jax.jit(model.forward, static_argnames='is_training'), jax.jit(model.encode),
          jax.jit(decode, static_argnames='max_length'))


def batch(passages, seed=0, b=2, length=20, target_len=10):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, size=(b, passages, length)).astype(np.int64)
  mask = np.ones_like(ids, bool)
  mask[0, 0, 13:] = False             # a short passage
  if passages > 2:
    mask[1, passages - 1, :] = False  # an absent passage (masked out of cross-attention in both)
  ids[~mask] = 0
  targets = rng.integers(2, VOCAB, size=(b, target_len)).astype(np.int64)
  return ids, mask, np.array(shift_right(jnp.asarray(targets)))


def hf_encode(hf_model, ids, mask):
  """HF's encoder per passage, outputs concatenated: ([B, P*L, D], [B, P*L])."""
  b, p, length = ids.shape
  with torch.no_grad():
    enc = hf_model.encoder(input_ids=torch.from_numpy(ids.reshape(b * p, length)),
                           attention_mask=torch.from_numpy(mask.reshape(b * p, length)).long())
  return enc.last_hidden_state.reshape(b, p * length, -1), torch.from_numpy(mask.reshape(b, -1)).long()


def hf_logits(hf_model, ids, mask, decoder_input_ids):
  enc, enc_mask = hf_encode(hf_model, ids, mask)
  with torch.no_grad():
    out = hf_model(encoder_outputs=(enc,), attention_mask=enc_mask,
                   decoder_input_ids=torch.from_numpy(decoder_input_ids))
  return out.logits.numpy()


def hf_greedy(hf_model, ids, mask, eos_id=1):
  """HF greedy tokens [B, MAX_NEW] (start token dropped; 0 after EOS and after an early stop)."""
  enc, enc_mask = hf_encode(hf_model, ids, mask)
  encoder_outputs = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=enc)
  # use_cache=False: transformers 5.23 sizes generate's KV cache by the encoder's num_layers and
  # fails (IndexError) when num_decoder_layers is larger, as in this fixture.
  with torch.no_grad():
    out = hf_model.generate(encoder_outputs=encoder_outputs, attention_mask=enc_mask,
                            max_new_tokens=MAX_NEW, do_sample=False, num_beams=1,
                            eos_token_id=eos_id, use_cache=False).numpy()
  assert (out[:, 0] == 0).all()
  return np.pad(out[:, 1:], ((0, 0), (0, MAX_NEW + 1 - out.shape[1])))


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_reference_lm_head_is_untied(hf_model, converted):
  assert max_abs(hf_model.lm_head.weight.detach(), hf_model.shared.weight.detach()) > 0.1
  _, params, tensors = converted
  assert 'lm_head.weight' in tensors
  np.testing.assert_array_equal(params['output_projection']['w'], tensors['lm_head.weight'].T)


def test_converted_tree_matches_model_init(converted):
  model, params, _ = converted
  ids, mask, dec_in = batch(1)
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, mask, dec_in)
  shapes = lambda tree: {(m, p): tuple(v.shape) for m, leaves in tree.items() for p, v in leaves.items()}
  assert shapes(params) == shapes(init)
  assert all(v.dtype == np.float32 for leaves in params.values() for v in leaves.values())


@pytest.mark.parametrize('passages', [1, 3], ids=['t5', 'fid'])
def test_encoder_and_logits_match_hf(hf_model, converted, passages):
  model, params, _ = converted
  forward, encode, _ = jitted(model)
  ids, mask, dec_in = batch(passages)
  enc, enc_mask = encode(params, ids, mask)
  hf_enc, hf_mask = hf_encode(hf_model, ids, mask)
  np.testing.assert_array_equal(np.asarray(enc_mask), hf_mask.numpy().astype(bool))
  valid = np.asarray(enc_mask)
  assert max_abs(np.asarray(enc)[valid], hf_enc.numpy()[valid]) <= TOL
  logits = forward(params, None, ids, mask, dec_in)
  hf = hf_logits(hf_model, ids, mask, dec_in)
  assert logits.shape == hf.shape == (2, dec_in.shape[1], VOCAB)
  assert max_abs(logits, hf) <= TOL
  assert np.abs(hf).max() > 0.5  # not a degenerate comparison


def test_plain_t5_call_matches_hf(hf_model, converted):
  """P = 1 is plain T5: HF's own forward (its encoder inside) gives the same logits."""
  model, params, _ = converted
  ids, mask, dec_in = batch(1, seed=3)
  with torch.no_grad():
    hf = hf_model(input_ids=torch.from_numpy(ids[:, 0]), attention_mask=torch.from_numpy(mask[:, 0]).long(),
                  decoder_input_ids=torch.from_numpy(dec_in)).logits.numpy()
  forward, _, _ = jitted(model)
  assert max_abs(forward(params, None, ids, mask, dec_in), hf) <= TOL


@pytest.mark.parametrize('passages', [1, 3], ids=['t5', 'fid'])
def test_greedy_decode_matches_hf_generate(hf_model, converted, passages):
  model, params, _ = converted
  ids, mask, _ = batch(passages, seed=1)

  _, _, decode = jitted(model)

  def ours(eos_id):
    out = decode(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), max_length=MAX_NEW,
                 eos_id=eos_id)
    return np.asarray(out.tokens)

  hf = hf_greedy(hf_model, ids, mask)
  np.testing.assert_array_equal(ours(1), hf)
  # Random weights rarely emit EOS: call a token row 1 emits mid-sequence "EOS" to check that both
  # stop that row there (0s after it) while the other row runs on.
  eos = int(hf[1, 3])
  hf_eos = hf_greedy(hf_model, ids, mask, eos_id=eos)
  assert (hf_eos[1, 4:] == 0).all() and (hf_eos[0] != 0).all()
  np.testing.assert_array_equal(ours(eos), hf_eos)


def test_round_trip_is_exact_and_loads_in_transformers(hf_model, converted, tmp_path):
  model, params, tensors = converted
  config = model.config
  back = convert.params_to_hf(params, config)
  assert set(back) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)

  convert.save_hf_t5(params, config, tmp_path)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  state = hf_reference.state_numpy(reloaded)
  for name, value in tensors.items():
    np.testing.assert_array_equal(state[name], value, err_msg=name)
  assert max_abs(state['lm_head.weight'], state['shared.weight']) > 0.1  # still untied
  for passages in (1, 3):
    ids, mask, _ = batch(passages, seed=2)
    np.testing.assert_array_equal(hf_greedy(reloaded, ids, mask), hf_greedy(hf_model, ids, mask))


def test_transformers5_tied_unscaled_checkpoint(tmp_path):
  """transformers>=5 saves T5.1.1 with lm_head tied to `shared` (no scaling) and omits lm_head."""
  hf_model = hf_reference.random_t5(hf_reference.tiny_t5_config(vocab_size=VOCAB), seed=5, untie=False)
  directory = hf_reference.save_t5(hf_model, tmp_path, classic=False)
  hf_config, tensors = convert.load_hf_t5(directory)
  assert 'lm_head.weight' not in tensors and hf_config['scale_decoder_outputs'] is False
  config = convert.fid_config_from_hf(hf_config)
  assert config.encoder.size == config.decoder.size == 'tiny'
  params = convert.hf_to_params(hf_config, tensors, config)
  ids, mask, dec_in = batch(3)
  forward, _, _ = jitted(make_model(config))
  logits = forward(params, None, ids, mask, dec_in)
  assert max_abs(logits, hf_logits(hf_model, ids, mask, dec_in)) <= TOL
