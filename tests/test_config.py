"""Configs: the paper's variants, config-time validation errors, argument parsing."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from fido import config as fido_config
from fido.config import ConfigError, load_config_file, model_config, parse_arg, validate_model_config
from fido.model.fid import make_model


def param_count(config):
  model = make_model(config.model)
  ids = jnp.zeros((1, 1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids > 0, jnp.zeros((1, 2), jnp.int32))
  return sum(x.size for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize('variant, encoder, decoder', [
    ('small-large', 'small', 'large'), ('base-xl', 'base', 'xl'), ('large-xxl', 'large', 'xxl'),
    ('xl-xxl', 'xl', 'xxl')])
def test_fido_variants_are_the_papers(variant, encoder, decoder):
  config = load_config_file(f'experiments/fido.py:{variant}')
  model = config.model
  assert (model.encoder.size, model.decoder.size) == (encoder, decoder)
  assert model.decoder.cross_attention_period == 6  # LSA-6: layers 6, 12, 18, 24
  assert model.decoder.num_kv_heads == model.decoder.cross_num_kv_heads == 1  # MQ
  assert model.encoder.num_kv_heads == model.encoder.num_heads  # the encoder keeps MHA
  assert model.vocab_size == 32128


def test_fid_variants_and_parameter_counts():
  base = load_config_file('experiments/fid.py:base')
  assert base.model.decoder.cross_attention_period == 1
  assert base.model.decoder.num_kv_heads == 12
  # T5.1.1-base has 247.6M parameters (untied output layer, vocab 32128).
  assert param_count(base) == 247_577_856
  fido_base = load_config_file('experiments/fido.py:base')
  # LSA removes 10 of 12 cross-attention blocks; MQ shrinks the remaining key/value projections.
  assert param_count(fido_base) < param_count(base) - 10 * 4 * 768 * 768
  light = load_config_file('experiments/fid.py:base,light=6')
  assert light.model.fid_light_k == 6


@pytest.mark.parametrize('mutate, field', [
    (lambda c: setattr(c.decoder, 'cross_attention_period', 0), 'decoder.cross_attention_period'),
    (lambda c: setattr(c.decoder, 'cross_attention_period', 13), 'decoder.cross_attention_period'),
    (lambda c: setattr(c.decoder, 'num_kv_heads', 5), 'decoder.num_kv_heads'),
    (lambda c: setattr(c.decoder, 'cross_num_kv_heads', 7), 'decoder.cross_num_kv_heads'),
    (lambda c: setattr(c.encoder, 'd_model', 1000), 'encoder.size'),
    (lambda c: setattr(c.encoder, 'size', 'huge'), 'encoder.size'),
    (lambda c: setattr(c.encoder, 'num_heads', 0), 'encoder.num_heads'),
    (lambda c: setattr(c, 'fid_light_k', 0), 'fid_light_k'),
    (lambda c: setattr(c, 'dtype', 'float16'), 'dtype'),
    (lambda c: setattr(c, 'dropout_rate', 1.5), 'dropout_rate'),
])
def test_invalid_configs_fail_naming_the_field(mutate, field):
  config = model_config('base')
  mutate(config)
  with pytest.raises(ConfigError, match=f'config.model.{field}'):
    validate_model_config(config)
  with pytest.raises(ConfigError, match=f'config.model.{field}'):
    make_model(config)


def test_unknown_size_name_and_custom_sizes():
  with pytest.raises(ConfigError, match="unknown model size 'huge'"):
    model_config('huge')
  config = model_config('base')
  config.encoder.size = 'custom'
  config.encoder.d_model = 1000  # custom shapes are allowed when declared
  validate_model_config(config)
  # T5.1.1-small's attention width (6 x 64) differs from d_model (512): valid.
  validate_model_config(model_config('small', 'large'))


def test_parse_arg_and_config_file_errors(tmp_path):
  parsed = parse_arg('base-xl,lsa=3,mq=false', variant='x', lsa=6, mq=True)
  assert (parsed.variant, parsed.lsa, parsed.mq) == ('base-xl', 3, False)
  with pytest.raises(ConfigError, match="unknown config argument 'nope'"):
    parse_arg('base,nope=1', variant='x')
  with pytest.raises(ConfigError, match=r"unknown config argument 'lsaa' .*\(did you mean 'lsa'\?\)"):
    parse_arg('base,lsaa=2', variant='x', lsa=1)
  with pytest.raises(ConfigError, match=r"unknown variant 'bse' \(did you mean 'base'\?\)"):
    parse_arg('bse', variants=('small', 'base'), variant='base')
  with pytest.raises(ConfigError, match=r"config argument lsa='x': expected int"):
    parse_arg('base,lsa=x', variant='x', lsa=1)
  with pytest.raises(ConfigError, match='does not exist'):
    load_config_file('experiments/missing.py:base')
  empty = tmp_path / 'empty.py'
  empty.write_text('x = 1\n')
  with pytest.raises(ConfigError, match='has no get_config'):
    load_config_file(str(empty))
  with pytest.raises(ConfigError, match="fid.py:giant: unknown variant 'giant'; expected one of"):
    load_config_file('experiments/fid.py:giant')


def test_config_diff_names_fields_and_treats_tuples_as_saved_json():
  old = ml_collections.ConfigDict(dict(model=dict(d=(1, 2), size='a'), train=dict(steps=3)))
  new = {'model': {'d': [1, 2], 'size': 'b'}, 'eval': {'split': 'dev'}}
  assert fido_config.config_diff(old, new) == [
      ('config.eval.split', fido_config.MISSING, 'dev'), ('config.model.size', 'a', 'b'),
      ('config.train.steps', 3, fido_config.MISSING)]
  assert fido_config.config_diff(old, new, ignore=lambda n: not n.startswith('config.model')) == [
      ('config.model.size', 'a', 'b')]
  assert repr(fido_config.MISSING) == 'nothing'
