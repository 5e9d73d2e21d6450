"""FiDO conversion from HF T5.1.1 checkpoints (issue #6): pooling, LSA, asymmetric, report, errors, orbax.

Checkpoints are written by `save_hf_t5` from params of our own model init (no torch), except the
logit-parity test, which compares against transformers itself.
"""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from fido import convert, convert_checkpoint, convert_fido, experiment, optim, start
from fido.config import ConfigError, load_config_file
from fido.model.fid import make_model
from fido.train_step import init_train_state, make_train_step
from tests.model_fixtures import VOCAB, custom, flat, init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_checkpoint(directory, config, seed=0):
  params = init_params(config, seed)
  return convert.save_hf_t5(params, config, directory), params


def param_shapes(config):
  ids = np.zeros((1, 1, 4), np.int32)
  tree = jax.eval_shape(make_model(config).init, jax.random.PRNGKey(0), ids, ids != 0, ids[:, 0])
  return {k: tuple(v.shape) for k, v in flat(tree).items()}


@pytest.fixture(scope='module')
def deep(tmp_path_factory):
  """A 4-layer-decoder FiD checkpoint (tiny widths: 4 heads of 8)."""
  config = custom(dec_overrides=dict(num_layers=4))
  directory, params = hf_checkpoint(tmp_path_factory.mktemp('deep') / 'hf', config)
  return directory, config, params


def fido_target(source, kv=1, cross_kv=1, period=2):
  target = custom(vocab_size=source.vocab_size)
  target.encoder = ml_collections.ConfigDict(source.encoder.to_dict())
  target.decoder = ml_collections.ConfigDict(source.decoder.to_dict())
  target.decoder.update(num_kv_heads=kv, cross_num_kv_heads=cross_kv, cross_attention_period=period)
  return target


# ---------------------------------------------------------------- pooling (tests/test_kv_heads.py)


def test_multi_and_grouped_query_heads_are_mean_pooled(deep):
  directory, source, src = deep
  target = fido_target(source, kv=1, cross_kv=2, period=1)
  target.encoder.num_kv_heads = 2
  params, report = convert_fido.convert_to_fido(directory, None, target)
  assert {k: v.shape for k, v in flat(params).items()} == param_shapes(target)
  self_kv = params['decoder/~/layer_01/~/self_attention']
  assert self_kv['key'].shape == self_kv['value'].shape == (32, 8)  # MQ: [D, E], no head axis
  mean = lambda x: x.mean(axis=1, dtype=np.float64).astype(np.float32)  # the mean, correctly rounded
  np.testing.assert_array_equal(self_kv['key'], mean(src['decoder/~/layer_01/~/self_attention']['key']))
  cross = src['decoder/~/layer_02/~/cross_attention']['value']  # [D, 4, E] -> groups {0,1}, {2,3}
  np.testing.assert_array_equal(params['decoder/~/layer_02/~/cross_attention']['value'],
                                np.stack([mean(cross[:, :2]), mean(cross[:, 2:])], axis=1))
  enc_key = params['encoder/~/layer_00/~/self_attention']['key']
  assert enc_key.shape == (32, 2, 8)
  rows = {r['name']: r for r in report['params']}
  assert rows['decoder/~/layer_01/~/self_attention/key']['action'] == 'pooled'
  assert rows['decoder/~/layer_01/~/self_attention/query']['action'] == 'copied'
  hf_rows = {r['name']: r for r in report['hf_tensors']}
  assert hf_rows['decoder.block.1.layer.0.SelfAttention.k.weight']['action'] == 'pooled'
  assert hf_rows['decoder.block.1.layer.0.SelfAttention.k.weight']['to'] == [
      'decoder/~/layer_01/~/self_attention/key']


# ---------------------------------------------------------------- FiD parity with transformers


def test_fid_target_reproduces_hf_logits(tmp_path):
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  try:
    from tests import hf_reference  # pylint: disable=g-import-not-at-top
  except ImportError:
    import hf_reference  # pylint: disable=g-import-not-at-top
  hf_model = hf_reference.random_t5(hf_reference.tiny_t5_config(num_decoder_layers=3), seed=3)
  directory = hf_reference.save_t5(hf_model, tmp_path / 'hf')
  hf_config, tensors = convert.load_hf_t5(directory)
  target = convert.fid_config_from_hf(hf_config)
  params, report = convert_fido.convert_to_fido(directory, None, target)
  # kv_heads = heads and K = 1: the plain FiD import, bit for bit, and every tensor copied.
  reference = convert.hf_to_params(hf_config, tensors, target)
  assert flat(params).keys() == flat(reference).keys()
  for name, value in flat(reference).items():
    np.testing.assert_array_equal(params[name.rsplit('/', 1)[0]][name.rsplit('/', 1)[1]], value)
  assert report['counts'] == {'hf_tensors': {'copied': len(tensors)}, 'params': {'copied': len(flat(params))}}

  rng = np.random.default_rng(0)
  ids = rng.integers(2, 128, size=(2, 3, 12))
  mask = np.ones_like(ids, bool)
  mask[0, 1, 7:] = False
  ids[~mask] = 0
  dec_in = np.concatenate([np.zeros((2, 1), np.int64), rng.integers(2, 128, size=(2, 5))], axis=1)
  logits = jax.jit(make_model(target).forward)(params, None, ids, mask, dec_in)
  with torch.no_grad():
    enc = hf_model.encoder(input_ids=torch.from_numpy(ids.reshape(6, 12)),
                           attention_mask=torch.from_numpy(mask.reshape(6, 12)).long())
    hf = hf_model(encoder_outputs=(enc.last_hidden_state.reshape(2, 36, -1),),
                  attention_mask=torch.from_numpy(mask.reshape(2, 36)).long(),
                  decoder_input_ids=torch.from_numpy(dec_in)).logits.numpy()
  assert np.abs(hf).max() > 0.5
  assert float(np.max(np.abs(np.asarray(logits) - hf))) <= 1e-4


# ---------------------------------------------------------------- layer-sparse cross-attention


def test_lsa_drops_the_right_cross_attention_layers(deep):
  directory, source, src = deep
  target = fido_target(source, kv=4, cross_kv=4, period=2)
  params, report = convert_fido.convert_to_fido(directory, None, target)
  assert report['transforms']['cross_attention_layers'] == [2, 4]
  assert report['transforms']['dropped_cross_attention_layers'] == [1, 3]
  for i in range(4):
    has = f'decoder/~/layer_{i:02d}/~/cross_attention' in params
    assert has == (i in (1, 3))
    assert (f'decoder/~/layer_{i:02d}/~/cross_attention_norm' in params) == has
  np.testing.assert_array_equal(params['decoder/~/layer_03/~/cross_attention']['query'],
                                src['decoder/~/layer_03/~/cross_attention']['query'])
  np.testing.assert_array_equal(params['decoder/~/layer_02/~/mlp']['wi_0'],
                                src['decoder/~/layer_02/~/mlp']['wi_0'])
  hf_rows = {r['name']: r for r in report['hf_tensors']}
  for block in range(4):
    for suffix in ('EncDecAttention.q.weight', 'EncDecAttention.k.weight', 'EncDecAttention.v.weight',
                   'EncDecAttention.o.weight', 'layer_norm.weight'):
      row = hf_rows[f'decoder.block.{block}.layer.1.{suffix}']
      if block in (0, 2):
        assert row['action'] == 'dropped' and f'decoder layer {block + 1} has no cross-attention' in row['why']
      else:
        assert row['action'] == 'copied'
  assert report['counts']['hf_tensors']['dropped'] == 10


def test_period_not_dividing_the_depth_is_noted(deep):
  directory, source, _ = deep
  _, report = convert_fido.convert_to_fido(directory, None, fido_target(source, period=3))
  assert report['transforms']['cross_attention_layers'] == [3]
  assert any('last 1 layers never cross-attend' in note for note in report['notes'])


# ---------------------------------------------------------------- asymmetric


@pytest.fixture(scope='module')
def asymmetric(tmp_path_factory):
  """Encoder checkpoint 32 wide; decoder checkpoint 64 wide whose *encoder* is the 32-wide encoder
  embedded in 64 dims (zero-padded, norm scales / sqrt 2): its encoder output is [enc(x), 0]."""
  root = tmp_path_factory.mktemp('asym')
  small_config = custom('tiny')
  small_dir, small = hf_checkpoint(root / 'small', small_config, seed=1)
  wide_config = custom('tiny', enc_overrides=dict(d_model=64), dec_overrides=dict(d_model=64))
  wide = init_params(wide_config, seed=2)
  pad = lambda x, axis: np.concatenate([x, np.zeros_like(x)], axis=axis)
  for module, leaves in small.items():
    if module.startswith('encoder/'):
      for name, value in leaves.items():
        wide[module][name] = {'scale': lambda v: pad(v / np.sqrt(2), 0), 'embeddings': lambda v: v,
                              'output': lambda v: pad(v, 2), 'wo': lambda v: pad(v, 1)}.get(
                                  name, lambda v: pad(v, 0))(value)
  wide['shared_embedding']['embeddings'] = pad(small['shared_embedding']['embeddings'], 1)
  wide_dir = convert.save_hf_t5(wide, wide_config, root / 'wide')
  target = custom('tiny', enc_overrides=None, dec_overrides=dict(d_model=64), cross_attention_period=2,
                  decoder_kv_heads=1, cross_kv_heads=1)
  return small_dir, small, wide_dir, wide, target


def test_asymmetric_takes_each_stack_from_its_checkpoint(asymmetric):
  small_dir, small, wide_dir, wide, target = asymmetric
  params, report = convert_fido.convert_to_fido(small_dir, wide_dir, target, cross_kv_init='random',
                                                seed=7)
  assert {k: v.shape for k, v in flat(params).items()} == param_shapes(target)
  np.testing.assert_array_equal(params['encoder_embedding']['embeddings'],
                                small['shared_embedding']['embeddings'])
  np.testing.assert_array_equal(params['decoder_embedding']['embeddings'],
                                wide['shared_embedding']['embeddings'])
  np.testing.assert_array_equal(params['encoder/~/layer_01/~/mlp']['wo'], small['encoder/~/layer_01/~/mlp']['wo'])
  np.testing.assert_array_equal(params['decoder/~/layer_01/~/mlp']['wo'], wide['decoder/~/layer_01/~/mlp']['wo'])
  np.testing.assert_array_equal(params['output_projection']['w'], wide['output_projection']['w'])
  np.testing.assert_array_equal(params['decoder/~/layer_01/~/cross_attention']['query'],
                                wide['decoder/~/layer_01/~/cross_attention']['query'])
  # New cross K/V: T5 init N(0, d_enc**-0.5) with d_enc = 32, [32, E] (multi-query).
  key = params['decoder/~/layer_01/~/cross_attention']['key']
  assert key.shape == (32, 8) and abs(key.std() - 32**-0.5) < 0.03
  init = report['transforms']['cross_kv_init']
  assert init['method'] == 'random' and init['std'] == 32**-0.5 and 'T5 init' in init['why']
  rows = {r['name']: r for r in report['params']}
  assert rows['decoder/~/layer_01/~/cross_attention/key']['action'] == 'initialized'
  assert rows['decoder/~/layer_01/~/cross_attention/key']['init'] == 'random'
  assert any('cannot read the encoder; newly initialised (random)' in n for n in report['notes'])
  hf_rows = {(r['checkpoint'], r['name']): r for r in report['hf_tensors']}
  row = hf_rows[('decoder', 'decoder.block.1.layer.1.EncDecAttention.k.weight')]
  assert row['action'] == 'dropped' and 're-initialised (random)' in row['why']
  assert hf_rows[('encoder', 'decoder.block.1.layer.2.DenseReluDense.wo.weight')]['action'] == 'dropped'
  assert hf_rows[('decoder', 'encoder.block.0.layer.0.SelfAttention.q.weight')]['action'] == 'dropped'
  assert hf_rows[('encoder', 'shared.weight')]['to'] == ['encoder_embedding/embeddings']


def test_aligned_cross_kv_init_recovers_the_decoder_checkpoints_keys(asymmetric):
  """The wide checkpoint's encoder output is [enc(x), 0]: the fitted alignment is [I; 0], so the new
  keys/values are the first 32 input rows of its (pooled) cross-attention projections."""
  small_dir, _, wide_dir, wide, target = asymmetric
  ids, mask = convert_fido.random_alignment_ids(VOCAB, 24, 16, seed=0)
  params, report = convert_fido.convert_to_fido(small_dir, wide_dir, target, alignment_ids=ids,
                                                alignment_mask=mask, ridge=1e-9)
  fit = report['transforms']['cross_kv_init']['fit']
  assert report['transforms']['cross_kv_init']['method'] == 'aligned'
  assert fit['tokens'] == 24 * 16 and fit['r2'] > 0.999999
  for name in ('key', 'value'):
    want = wide['decoder/~/layer_01/~/cross_attention'][name][:32].mean(axis=1)
    np.testing.assert_allclose(params['decoder/~/layer_01/~/cross_attention'][name], want, atol=2e-4)
  hf_rows = {(r['checkpoint'], r['name']): r for r in report['hf_tensors']}
  row = hf_rows[('decoder', 'decoder.block.1.layer.1.EncDecAttention.v.weight')]
  assert row['action'] == 'projected' and row['to'] == ['decoder/~/layer_01/~/cross_attention/value']


def test_report_lists_every_tensor_and_param_exactly_once(asymmetric, tmp_path):
  small_dir, _, wide_dir, _, target = asymmetric
  params, report = convert_fido.convert_to_fido(small_dir, wide_dir, target, cross_kv_init='random')
  listed = [(r['checkpoint'], r['name']) for r in report['hf_tensors']]
  files = [(role, name) for role, d in (('encoder', small_dir), ('decoder', wide_dir))
           for name in convert.load_hf_t5(d)[1]]
  assert len(listed) == len(set(listed)) and sorted(listed) == sorted(files)
  names = [r['name'] for r in report['params']]
  assert len(names) == len(set(names)) and sorted(names) == sorted(flat(params))
  assert sum(report['counts']['params'].values()) == len(names)
  assert sum(report['counts']['hf_tensors'].values()) == len(listed)
  assert all(r['action'] in ('copied', 'pooled', 'projected', 'dropped') for r in report['hf_tensors'])
  assert all(r['why'] for r in report['hf_tensors'] if r['action'] == 'dropped')
  assert all(r['action'] in ('copied', 'pooled', 'initialized') for r in report['params'])
  json.dumps(report)  # serialisable as is


def test_two_checkpoints_of_equal_width_are_allowed(deep, tmp_path):
  directory, source, src = deep
  other_dir, other = hf_checkpoint(tmp_path / 'other', source, seed=5)
  target = fido_target(source)
  params, report = convert_fido.convert_to_fido(directory, other_dir, target,
                                                shared_embedding='decoder')
  np.testing.assert_array_equal(params['encoder/~/final_norm']['scale'], src['encoder/~/final_norm']['scale'])
  np.testing.assert_array_equal(params['decoder/~/final_norm']['scale'], other['decoder/~/final_norm']['scale'])
  np.testing.assert_array_equal(params['shared_embedding']['embeddings'],
                                other['shared_embedding']['embeddings'])
  hf_rows = {(r['checkpoint'], r['name']): r for r in report['hf_tensors']}
  assert 'taken from the decoder checkpoint' in hf_rows[('encoder', 'shared.weight')]['why']
  assert report['transforms']['cross_kv_init'] is None


# ---------------------------------------------------------------- errors


def test_sizes_must_match_the_checkpoints(deep, asymmetric):
  directory, source, _ = deep
  target = fido_target(source)
  target.decoder.update(size='custom', d_ff=80)
  with pytest.raises(convert.ConversionError,
                     match=r'config.model.decoder.d_ff=80 but .* has decoder d_ff=64'):
    convert_fido.convert_to_fido(directory, None, target)
  target = fido_target(source)
  target.decoder.update(size='custom', num_layers=2)
  with pytest.raises(convert.ConversionError, match=r'decoder.num_layers=2 but .* num_layers=4'):
    convert_fido.convert_to_fido(directory, None, target)
  small_dir, _, wide_dir, _, asym_target = asymmetric
  with pytest.raises(convert.ConversionError, match=r'decoder.d_model=64 but .*small has decoder d_model=32'):
    convert_fido.convert_to_fido(small_dir, None, asym_target)  # one checkpoint cannot be asymmetric
  target = fido_target(source, period=5)
  with pytest.raises(ConfigError, match='cross_attention_period=5'):
    convert_fido.convert_to_fido(directory, None, target)


def test_vocabulary_mismatch_between_checkpoints(deep, tmp_path):
  directory, source, _ = deep
  other = custom(dec_overrides=dict(num_layers=4), vocab_size=128)
  other_dir, _ = hf_checkpoint(tmp_path / 'vocab', other)
  with pytest.raises(convert.ConversionError, match=r'the checkpoints differ in vocab_size: 96 .* vs 128'):
    convert_fido.convert_to_fido(directory, other_dir, fido_target(source))


def test_missing_files_and_unsupported_architecture(deep, tmp_path):
  directory, source, _ = deep
  broken = tmp_path / 'broken'
  shutil.copytree(directory, broken)
  (broken / 'model.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match=f'no model.safetensors or model.safetensors.index.json in {broken}'):
    convert_fido.convert_to_fido(broken, None, fido_target(source))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    convert_fido.convert_to_fido(directory, tmp_path / 'nowhere', fido_target(source))
  v1_0 = tmp_path / 'v1_0'
  shutil.copytree(directory, v1_0)
  hf_config = json.loads((v1_0 / 'config.json').read_text())
  hf_config['feed_forward_proj'] = 'relu'
  (v1_0 / 'config.json').write_text(json.dumps(hf_config))
  with pytest.raises(convert.ConversionError,
                     match="unsupported architecture: feed_forward_proj='relu' .*T5.1.1 is \"gated-gelu\""):
    convert_fido.convert_to_fido(v1_0, None, fido_target(source))


# ---------------------------------------------------------------- orbax checkpoint -> training


def test_checkpoint_restores_and_fine_tuning_starts_from_it(deep, tmp_path):
  directory, source, _ = deep
  target = fido_target(source)
  params, report = convert_fido.convert_to_fido(directory, None, target)
  saved = experiment.default_config()
  out = convert_fido.write_fido_checkpoint(params, target, tmp_path / 'fido', report, config=saved)
  assert json.loads((out / 'conversion_report.json').read_text())['counts'] == report['counts']
  with pytest.raises(FileExistsError, match='already holds a checkpoint'):
    convert_fido.write_fido_checkpoint(params, target, out, report, config=saved)

  config = load_config_file(os.path.join(REPO, 'experiments/embedded.py:fido,smoke'))
  config.model = target
  config.optimizer.name = 'fido_adafactor'
  config.init.update(checkpoint=str(out), carry_second_moments=False)
  model, optimizer = make_model(target), optim.make_optimizer(config.optimizer)
  batch = {'passage_ids': np.full((2, 2, 6), 5, np.int32), 'passage_mask': np.ones((2, 2, 6), bool),
           'target_ids': np.full((2, 3), 7, np.int32), 'target_mask': np.ones((2, 3), bool)}
  fresh = jax.jit(lambda: init_train_state(model, optimizer, jax.random.PRNGKey(0), batch))()
  state = start.init_from_pretrained(config, fresh, optimizer)
  for name, value in flat(params).items():
    module, param = name.rsplit('/', 1)
    np.testing.assert_array_equal(np.asarray(state.params[module][param]), value)
  state, metrics = jax.jit(make_train_step(model, optimizer, config.train))(state, batch)
  assert int(state.step) == 1 and np.isfinite(float(metrics['loss']))
  config.init.carry_second_moments = True  # a converted checkpoint has no optimizer state
  with pytest.raises(ValueError, match='cannot carry second moments over: .*no optimizer state'):
    start.init_from_pretrained(config, fresh, optimizer)


def test_run_convert_with_the_uptrain_config(deep, tmp_path):
  directory, source, _ = deep
  config = load_config_file(os.path.join(REPO, f'experiments/uptrain.py:convert,smoke,root={tmp_path}'))
  config.model = fido_target(source)
  config.convert.encoder_checkpoint = str(directory)
  summary = convert_checkpoint.run_convert(config)
  assert summary['out_dir'] == str(tmp_path / 'converted')
  assert summary['counts']['params'] == {'copied': 58, 'pooled': 12}
  up = load_config_file(os.path.join(REPO, f'experiments/uptrain.py:uptrain,smoke,root={tmp_path}'))
  fine = load_config_file(os.path.join(REPO, f'experiments/uptrain.py:finetune,smoke,root={tmp_path}'))
  assert up.init.checkpoint == summary['out_dir'] and not up.init.carry_second_moments
  assert fine.init.checkpoint == str(tmp_path / 'uptrain') and fine.init.carry_second_moments
  assert up.model.to_dict() == {**fine.model.to_dict(), 'dropout_rate': 0.0}
  with pytest.raises(ValueError, match='set config.convert.encoder_checkpoint'):
    convert_checkpoint.run_convert(load_config_file(os.path.join(REPO, 'experiments/embedded.py:fid')))
