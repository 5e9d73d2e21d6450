"""HF T5 conversion without a reference model: files, errors, coverage of every tensor and parameter.

Checkpoints here are written by `save_hf_t5` from random params, so these tests need no torch; the
numerical comparison with transformers lives in test_hf_parity.py.
"""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fido import convert
from fido.config import SIZES, model_config
from fido.model.fid import make_model

VOCAB = 96


def tiny(**kwargs):
  kwargs.setdefault('vocab_size', VOCAB)
  return model_config(kwargs.pop('encoder', 'tiny'), kwargs.pop('decoder', None), **kwargs)


def random_params(config, seed=0):
  """Random float32 params with the model's own tree (shapes from `jax.eval_shape`, no compute)."""
  ids = np.zeros((1, 1, 4), np.int32)
  tree = jax.eval_shape(make_model(config).init, jax.random.PRNGKey(0), ids, ids != 0, ids[:, 0])
  rng = np.random.default_rng(seed)
  return {m: {p: rng.standard_normal(s.shape).astype(np.float32) for p, s in leaves.items()}
          for m, leaves in tree.items()}


@pytest.fixture
def checkpoint(tmp_path):
  config = tiny()
  params = random_params(config)
  return convert.save_hf_t5(params, config, tmp_path / 'ckpt'), config, params


def edit_config(directory, **changes):
  path = directory / 'config.json'
  hf_config = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      hf_config.pop(key, None)
    else:
      hf_config[key] = value
  path.write_text(json.dumps(hf_config))


def assert_same_params(a, b):
  assert a.keys() == b.keys()
  for module in a:
    assert a[module].keys() == b[module].keys(), module
    for name in a[module]:
      np.testing.assert_array_equal(a[module][name], b[module][name], err_msg=f'{module}/{name}')


# ---------------------------------------------------------------- files


def test_save_load_round_trip(checkpoint):
  directory, config, params = checkpoint
  assert sorted(p.name for p in directory.iterdir()) == ['config.json', 'model.safetensors']
  hf_config, tensors = convert.load_hf_t5(directory)
  assert hf_config['feed_forward_proj'] == 'gated-gelu' and hf_config['tie_word_embeddings'] is False
  back = convert.fid_config_from_hf(hf_config)
  assert back.to_dict() == {**config.to_dict(), 'dropout_rate': back.dropout_rate}
  assert_same_params(convert.hf_to_params(hf_config, tensors, config), params)


def test_sharded_checkpoint(checkpoint, tmp_path):
  directory, config, params = checkpoint
  tensors = load_file(str(directory / 'model.safetensors'))
  names = sorted(tensors)
  sharded = tmp_path / 'sharded'
  sharded.mkdir()
  (sharded / 'config.json').write_text((directory / 'config.json').read_text())
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    shard = f'model-{i + 1:05d}-of-00002.safetensors'
    save_file({n: tensors[n] for n in part}, str(sharded / shard), metadata={'format': 'pt'})
    weight_map.update({n: shard for n in part})
  (sharded / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  hf_config, loaded = convert.load_hf_t5(sharded)
  assert_same_params(convert.hf_to_params(hf_config, loaded, config), params)
  (sharded / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='model-00002-of-00002.safetensors'):
    convert.load_hf_t5(sharded)


def test_bfloat16_checkpoint(checkpoint, tmp_path):
  """numpy has no bfloat16; such tensors are read via ml_dtypes and converted to float32."""
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file as torch_save_file  # pylint: disable=g-import-not-at-top
  directory, config, _ = checkpoint
  tensors = load_file(str(directory / 'model.safetensors'))
  bf16 = {n: torch.from_numpy(t).bfloat16() for n, t in tensors.items()}
  out = tmp_path / 'bf16'
  out.mkdir()
  (out / 'config.json').write_text((directory / 'config.json').read_text())
  torch_save_file(bf16, str(out / 'model.safetensors'), metadata={'format': 'pt'})
  hf_config, loaded = convert.load_hf_t5(out)
  params = convert.hf_to_params(hf_config, loaded, config)
  np.testing.assert_array_equal(params['shared_embedding']['embeddings'],
                                bf16['shared.weight'].float().numpy())


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    convert.load_hf_t5(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match=f'no config.json in {tmp_path}'):
    convert.load_hf_t5(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(convert.hf_config_from_fid(tiny())))
  with pytest.raises(FileNotFoundError,
                     match=f'no model.safetensors or model.safetensors.index.json in {tmp_path}$'):
    convert.load_hf_t5(tmp_path)
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='found pytorch_model.bin'):
    convert.load_hf_t5(tmp_path)


@pytest.mark.parametrize('changes, message', [
    (dict(feed_forward_proj='relu'), "feed_forward_proj='relu'"),
    (dict(feed_forward_proj=None), "feed_forward_proj='relu'"),  # HF's default is v1.0's ReLU
    (dict(tie_word_embeddings=True), 'tie_word_embeddings=true'),
    (dict(tie_word_embeddings=None), 'tie_word_embeddings=true'),  # old default: tied and scaled
    (dict(tie_word_embeddings=True, scale_decoder_outputs=True), 'logit scaling'),
    (dict(model_type='bart'), "model_type='bart'"),
    (dict(decoder_start_token_id=2), 'decoder_start_token_id=2'),
])
def test_unsupported_architecture(checkpoint, changes, message):
  directory, _, _ = checkpoint
  edit_config(directory, **changes)
  with pytest.raises(convert.ConversionError, match=f'config.json: unsupported architecture: .*{message}'):
    convert.load_hf_t5(directory)


def test_transformers5_style_config_is_accepted(checkpoint):
  """transformers>=5 writes tie_word_embeddings=true plus scale_decoder_outputs=false for T5.1.1."""
  directory, config, params = checkpoint
  edit_config(directory, tie_word_embeddings=True, scale_decoder_outputs=False)
  hf_config, tensors = convert.load_hf_t5(directory)
  assert_same_params(convert.hf_to_params(hf_config, tensors, config), params)
  # ...and omits lm_head.weight, which is then the (unscaled) shared embedding.
  del tensors['lm_head.weight']
  converted = convert.hf_to_params(hf_config, tensors, config)
  np.testing.assert_array_equal(converted['output_projection']['w'], tensors['shared.weight'].T)


# ---------------------------------------------------------------- mismatches and coverage


@pytest.mark.parametrize('overrides, tensor, got, want', [
    (dict(d_ff=80), 'encoder.block.0.layer.1.DenseReluDense.wi_0.weight', (64, 32), (80, 32)),
    (dict(vocab_size=100), 'shared.weight', (VOCAB, 32), (100, 32)),
    (dict(num_heads=2, d_kv=16), 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
     (32, 4), (32, 2)),
])
def test_shape_mismatch_names_the_tensor(checkpoint, overrides, tensor, got, want):
  directory, _, _ = checkpoint
  hf_config, tensors = convert.load_hf_t5(directory)
  config = tiny(vocab_size=overrides.pop('vocab_size', VOCAB))
  for stack in (config.encoder, config.decoder):
    stack.size = 'custom'
    stack.update(overrides)
    stack.num_kv_heads = stack.num_heads
  config.decoder.cross_num_kv_heads = config.decoder.num_heads
  with pytest.raises(convert.ConversionError,
                     match=rf'HF tensor {tensor} has shape \({got[0]}, {got[1]}\), expected '
                           rf'\({want[0]}, {want[1]}\)'):
    convert.hf_to_params(hf_config, tensors, config)


def test_layer_count_mismatch(checkpoint):
  directory, _, _ = checkpoint
  hf_config, tensors = convert.load_hf_t5(directory)
  deeper = tiny()
  deeper.encoder.size = 'custom'
  deeper.encoder.num_layers = 3
  with pytest.raises(convert.ConversionError, match=r'lacks 9 tensors.*encoder\.block\.2\.layer\.0'):
    convert.hf_to_params(hf_config, tensors, deeper)
  shallower = tiny()
  shallower.decoder.size = 'custom'
  shallower.decoder.num_layers = 1
  with pytest.raises(convert.ConversionError, match=r'14 tensors .*no place for.*decoder\.block\.1\.'):
    convert.hf_to_params(hf_config, tensors, shallower)


def test_every_tensor_is_consumed(checkpoint):
  directory, config, _ = checkpoint
  hf_config, tensors = convert.load_hf_t5(directory)
  extra = dict(tensors, **{'encoder.block.0.layer.0.SelfAttention.extra.weight': np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError, match='SelfAttention.extra.weight'):
    convert.hf_to_params(hf_config, extra, config)
  # Tied input-embedding copies (older checkpoints) and HF's own ignored tensor are accepted ...
  benign = dict(tensors, **{'encoder.embed_tokens.weight': tensors['shared.weight'],
                            'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight':
                                np.zeros((32, 4), np.float32)})
  convert.hf_to_params(hf_config, benign, config)
  # ... but untied input embeddings are not.
  untied = dict(tensors, **{'decoder.embed_tokens.weight': tensors['shared.weight'] + 1})
  with pytest.raises(convert.ConversionError, match='decoder.embed_tokens.weight'):
    convert.hf_to_params(hf_config, untied, config)


def test_tensor_map_covers_every_param_once():
  for config in (tiny(), tiny(encoder='mini')):
    specs = convert.tensor_map(config)
    tree = random_params(config)
    assert len({s.hf_name for s in specs}) == len(specs)
    assert sorted((s.module, s.param) for s in specs) == sorted(
        (m, p) for m, leaves in tree.items() for p in leaves)
    for spec in specs:
      assert tree[spec.module][spec.param].shape == spec.shape
      assert np.prod(spec.shape) == np.prod(spec.hf_shape)


def test_hf_layouts():
  """q/k/v [H*E, D], o [D, H*E], wi [F, D], lm_head [V, D]: torch Linear weights are [out, in]."""
  config = tiny()
  params = random_params(config)
  tensors = convert.params_to_hf(params, config)
  attn = params['encoder/~/layer_01/~/self_attention']
  q = tensors['encoder.block.1.layer.0.SelfAttention.q.weight']
  np.testing.assert_array_equal(q[2 * 8 + 5], attn['query'][:, 2, 5])  # head 2, feature 5
  o = tensors['encoder.block.1.layer.0.SelfAttention.o.weight']
  np.testing.assert_array_equal(o[:, 3 * 8 + 1], attn['output'][3, 1])
  np.testing.assert_array_equal(tensors['decoder.block.0.layer.2.DenseReluDense.wo.weight'],
                                params['decoder/~/layer_00/~/mlp']['wo'].T)
  np.testing.assert_array_equal(tensors['lm_head.weight'], params['output_projection']['w'].T)


# ---------------------------------------------------------------- configs


def t5_1_1_config(size, **overrides):
  dims = SIZES[size]
  return {**dict(model_type='t5', feed_forward_proj='gated-gelu', tie_word_embeddings=False,
                  vocab_size=32128, **dims._asdict()), **overrides}


def test_fid_config_from_hf_sizes():
  config = convert.fid_config_from_hf(t5_1_1_config('base'))
  assert config.encoder.size == config.decoder.size == 'base'
  assert config.decoder.cross_attention_period == 1 and config.fid_light_k == 1
  assert config.decoder.num_kv_heads == config.decoder.cross_num_kv_heads == 12
  custom = convert.fid_config_from_hf(t5_1_1_config('base', num_decoder_layers=4, d_ff=1000))
  assert (custom.encoder.size, custom.decoder.size) == ('custom', 'custom')
  assert (custom.encoder.num_layers, custom.decoder.num_layers) == (12, 4)


def test_fid_config_from_hf_t5_1_1_small():
  """T5.1.1 small has an attention width (6 x 64 = 384) different from d_model (512)."""
  assert convert.fid_config_from_hf(t5_1_1_config('small')).encoder.size == 'small'


@pytest.mark.parametrize('kwargs, field', [
    (dict(cross_attention_period=2), 'cross_attention_period=2'),
    (dict(decoder_kv_heads=1), 'decoder.num_kv_heads=1'),
    (dict(cross_kv_heads=2), 'decoder.cross_num_kv_heads=2'),
    (dict(decoder='mini'), 'decoder.d_model=128 != encoder.d_model=32'),
])
def test_fido_configs_are_rejected(kwargs, field):
  config = tiny(**kwargs)
  params = random_params(config)
  with pytest.raises(convert.ConversionError, match=f'FiD configs only.*{field}'):
    convert.params_to_hf(params, config)
  with pytest.raises(convert.ConversionError, match='FiD configs only'):
    convert.hf_config_from_fid(config)


def test_params_mismatch(tmp_path):
  config = tiny()
  params = random_params(config)
  del params['decoder/~/layer_01/~/mlp']['wi_1']
  with pytest.raises(convert.ConversionError, match=r"missing \[\('decoder/~/layer_01/~/mlp', 'wi_1'\)\]"):
    convert.save_hf_t5(params, config, tmp_path)
  params = random_params(config)
  params['encoder/~/final_norm']['scale'] = np.ones(16, np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r'encoder/~/final_norm/scale has shape \(16,\), expected \(32,\)'):
    convert.params_to_hf(params, config)
  assert not (tmp_path / 'config.json').exists()


def test_non_shape_config_mismatch(checkpoint):
  """Fields that leave no trace in tensor shapes are compared with the checkpoint's config.json."""
  directory, config, _ = checkpoint
  hf_config, tensors = convert.load_hf_t5(directory)
  config.relative_attention_max_distance = 64
  with pytest.raises(convert.ConversionError, match='relative_attention_max_distance=128 but'):
    convert.hf_to_params(hf_config, tensors, config)
  with pytest.raises(convert.ConversionError, match=r"config.json lacks \['d_ff'\]"):
    convert.fid_config_from_hf({k: v for k, v in hf_config.items() if k != 'd_ff'})
