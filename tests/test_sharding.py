"""Tests for fido/sharding.py.

Rules, optimizer-state mirroring and the error paths run in-process against abstract meshes (no
devices needed). The multi-device checks -- the sharded step equals the single-device step on
8x1, 4x2 and 2x4 meshes, parameters really are laid out as the rules say -- need 8 devices, which
XLA only fakes on CPU when XLA_FLAGS is set before jax initialises. Whatever this process already
did with jax (pytest-xdist workers and other test files import it first), they therefore run in
one fresh subprocess -- this file executed as a script -- that reports JSON back.
"""

import json
import os
import subprocess
import sys

if __name__ == '__main__':  # the multi-device subprocess: flags before jax is imported
  # Eight fake CPU devices; LLVM optimisation off as in tests/conftest.py: compiles are ~3x
  # cheaper, and the sharded and the single-device step are compiled alike.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8'
                             ' --xla_backend_optimization_level=0').strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from fido import multihost, optim, sharding
from fido import train_step as ts
from fido.config import model_config, validate_model_config
from fido.model.fid import make_model

VOCAB = 256
MESHES = ((8, 1), (4, 2), (2, 4), (4, 2, 'fsdp'))
AXES = {'data': 2, 'model': 4}


def small_config(**kwargs):
  """FiDO-shaped: 4 heads, d_ff 64, vocab 256 (all divisible by 4 and 8); 1 + 2 layers."""
  kwargs = dict(cross_attention_period=2, decoder_kv_heads=1, cross_kv_heads=1,
                vocab_size=VOCAB) | kwargs
  config = model_config('tiny', 'tiny', **kwargs)
  config.encoder.update(size='custom', num_layers=1)
  config.decoder.size = 'custom'
  validate_model_config(config)
  return config


def abstract_params(config):
  model = make_model(config)
  ids = jnp.zeros((1, 1, 4), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), ids, ids != 0, jnp.zeros((1, 3), jnp.int32))


def spec_table(params, **kwargs):
  specs = sharding.param_specs(params, AXES, **kwargs)
  return {sharding.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, P))}


# ------------------------------------------------------------------------ rules (in-process)


def test_rules_shard_heads_d_ff_and_vocab_and_replicate_mq_norms_and_bias():
  specs = spec_table(abstract_params(small_config()))
  enc, dec = 'encoder/~/layer_00/~/', 'decoder/~/layer_01/~/'
  assert specs['shared_embedding/embeddings'] == P('model', None)
  assert specs['output_projection/w'] == P(None, 'model')
  assert specs[dec + 'self_attention/query'] == P(None, 'model', None)
  assert specs[dec + 'cross_attention/output'] == P('model', None, None)
  assert specs[dec + 'self_attention/key'] == P(None, None)       # MQ [D, E]
  assert specs[dec + 'cross_attention/value'] == P(None, None)
  assert specs[enc + 'self_attention/key'] == P(None, 'model', None)  # MHA [D, K=4, E]
  assert specs[enc + 'mlp/wi_0'] == P(None, 'model')
  assert specs[dec + 'mlp/wo'] == P('model', None)
  assert specs[dec + 'mlp_norm/scale'] == P()
  assert specs['decoder/~/relative_position_bias/embeddings'] == P()


def test_fsdp_adds_the_data_axis_to_the_largest_free_dimension_it_divides():
  params = abstract_params(small_config())
  specs = spec_table(params, fsdp=True)  # data 2, model 4
  enc, dec = 'encoder/~/layer_00/~/', 'decoder/~/layer_01/~/'
  assert specs['shared_embedding/embeddings'] == P('model', 'data')      # [256, 32]
  assert specs[dec + 'self_attention/query'] == P('data', 'model', None)  # [32, 4, 8]: D > E
  assert specs[dec + 'self_attention/key'] == P('data', None)             # MQ [32, 8]
  assert specs[enc + 'mlp/wi_0'] == P('data', 'model')                    # [32, 64]
  assert specs[dec + 'mlp_norm/scale'] == P()  # replicated-by-rule parameters stay whole
  # A dimension the data axis does not divide is skipped for the next largest; none: replicated.
  odd = {'output_projection': {'w': np.zeros((6, 9))}, 'x_norm': {'scale': np.zeros(5)}}
  odd_specs = spec_table(odd, fsdp=True)
  assert odd_specs == {'output_projection/w': P('data', None), 'x_norm/scale': P()}
  assert spec_table(params, fsdp=False) == spec_table(params)


def test_rules_cover_fid_and_asymmetric_models():
  for config in (model_config('tiny', vocab_size=VOCAB),
                 model_config('tiny', 'mini', cross_attention_period=2, decoder_kv_heads=1,
                              cross_kv_heads=1, vocab_size=VOCAB)):
    specs = spec_table(abstract_params(config))
    assert len(specs) == len(jax.tree.leaves(abstract_params(config)))


def test_gqa_key_value_shard_on_k_only_when_divisible(caplog):
  params = abstract_params(small_config(decoder_kv_heads=2))  # K = 2 on a model axis of 4
  with caplog.at_level(logging.WARNING, logger='fido.sharding'):
    specs = spec_table(params)
  assert specs['decoder/~/layer_00/~/self_attention/key'] == P(None, None, None)
  assert 'decoder/~/layer_00/~/self_attention/key dim 1 (size 2)' in caplog.text
  assert specs['encoder/~/layer_00/~/self_attention/key'] == P(None, 'model', None)  # K = 4
  with pytest.raises(ValueError, match=r'self_attention/key dim 1 .*\(strict sharding\)'):
    spec_table(params, strict=True)


def test_unmatched_parameter_is_an_error_naming_it():
  params = dict(abstract_params(small_config()))
  params['decoder/~/adapter'] = {'w': jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  with pytest.raises(ValueError, match='decoder/~/adapter/w .*no rule matches'):
    spec_table(params)
  # A rule that matches the path but not the rank is no match either.
  rank_4 = jax.ShapeDtypeStruct((4, 2, 2, 2), jnp.float32)
  bad_rank = {'encoder/~/layer_00/~/self_attention': {'key': rank_4}}
  with pytest.raises(ValueError, match='self_attention/key .*none has rank 4'):
    spec_table(bad_rank)


@pytest.mark.parametrize('name', ['fido_adafactor', 'adafactor', 'adamw'])
def test_optimizer_state_mirrors_params(name):
  params = abstract_params(small_config())
  config = optim.default_config()
  config.name = name
  opt_state = jax.eval_shape(optim.make_optimizer(config).init, params)
  param_specs = spec_table(params)
  opt_specs = sharding.mirror_params(opt_state, params, sharding.param_specs(params, AXES), P())
  mirrored = 0
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(opt_state),
                                jax.tree.leaves(opt_specs, is_leaf=lambda x: isinstance(x, P))):
    key = sharding.path_str(path[-2:])  # the module path and parameter name
    if key in param_specs and leaf.shape == params[path[-2].key][path[-1].key].shape:
      assert spec == param_specs[key], (path, spec)
      mirrored += 1
    else:
      assert spec == P(), (path, leaf.shape)  # counts, hyperparameters, factored statistics
  # fido_adafactor: v; adafactor: v for the arrays it does not factor; adamw: mu and nu.
  assert mirrored == {'fido_adafactor': 1, 'adafactor': 1, 'adamw': 2}[name] * len(param_specs)


# ---------------------------------------------------------------- mesh and batch (in-process)


def test_mesh_shape_fills_data_and_rejects_what_does_not_fit():
  assert sharding.mesh_shape((-1, 2), 8) == (4, 2)
  assert sharding.mesh_shape({'data': 2, 'model': 4}, 8) == (2, 4)
  assert sharding.mesh_shape(sharding.default_config().mesh, 8) == (8, 1)
  with pytest.raises(ValueError, match=r'\(data=3, model=2\) needs 6 devices but 8'):
    sharding.mesh_shape((3, 2), 8)
  with pytest.raises(ValueError, match=r'\(data=-1, model=3\) does not fit 8 devices'):
    sharding.mesh_shape((-1, 3), 8)
  with pytest.raises(ValueError, match='invalid'):
    sharding.mesh_shape((0, 1), 8)


def test_indivisible_batch_is_an_error_naming_both_sizes():
  mesh = AbstractMesh((4, 2), ('data', 'model'))
  sharding.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match='batch size 6 is not divisible by the mesh data axis size 4'):
    sharding.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match='8 / gradient_accumulation_steps=4 = 2 .* size 4'):
    sharding.check_batch_size(8, mesh, gradient_accumulation_steps=4)


def test_distributed_initialises_only_when_configured(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  config = sharding.default_config().distributed
  assert not multihost.maybe_initialize_distributed(config) and not calls
  assert not multihost.maybe_initialize_distributed(None) and not calls
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '2')
  config.coordinator_address = '10.0.0.1:1234'
  assert multihost.maybe_initialize_distributed(config)
  assert calls == [dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2)]


# --------------------------------------------------------------------- multi-device (subprocess)


def _batch(seed, batch_size=8):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, size=(batch_size, 2, 6)).astype(np.int32)
  ids[1, 1, 3:] = 0
  targets = np.concatenate([ids[:, 0, :4], np.ones((batch_size, 1), np.int32)], axis=1)
  mask = np.ones_like(targets, bool)
  mask[::3, 3:] = False
  return dict(passage_ids=ids, passage_mask=ids != 0, target_ids=np.where(mask, targets, 0),
              target_mask=mask)


def multi_device_checks() -> dict:
  """Runs in the 8-device subprocess; returns JSON-able results for
  test_sharded_training_on_8_devices.

  Dropout is off: JAX defines random bits independently of sharding, and every compile with it
  costs ~2x here. The three-line sharded init runs on the 2x4 mesh; the other meshes place the
  reference's initial state with the same shardings (sparing two compiles). The 4x2 run also
  accumulates 2 micro-batches with per-layer remat: the same update, now split across devices.
  """
  assert jax.device_count() == 8, jax.devices()
  model = make_model(small_config())
  optimizer = optim.make_optimizer(optim.pretraining_config())
  step = ts.make_train_step(model, optimizer, ts.default_config())
  rng, batches = jax.random.key(0), [_batch(1), _batch(2)]
  init = functools.partial(ts.init_train_state, model, optimizer)

  initial = jax.jit(init)(rng, batches[0])
  reference_step, reference = jax.jit(step), initial
  for batch in batches:
    reference, _ = reference_step(reference, batch)
  reference_params = jax.device_get(reference.params)

  results = {'meshes': {}}
  for *shape, layout in (m if len(m) == 3 else (*m, '') for m in MESHES):
    shape, fsdp = tuple(shape), layout == 'fsdp'
    mesh = sharding.make_mesh(shape)
    if shape == (2, 4):
      state, shardings = sharding.init_sharded_train_state(model, optimizer, rng, batches[0], mesh)
      init_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(initial.params)))
      results['sharded_init_max_diff'] = init_diff
    else:
      shardings = sharding.train_state_shardings(jax.eval_shape(init, rng, batches[0]), mesh,
                                                 fsdp=fsdp)
      state = jax.device_put(jax.tree.map(jnp.copy, initial), shardings)  # the step donates it
    if shape == (4, 2) and not fsdp:
      config = ts.default_config()
      config.update(batch_size=8, gradient_accumulation_steps=2, remat='layer')
      sharding.check_batch_size(config.batch_size, mesh, config.gradient_accumulation_steps)
      mesh_step = ts.make_train_step(model, optimizer, config)
    else:
      mesh_step = step
    sharded_step = sharding.make_sharded_train_step(mesh_step, shardings, mesh)
    for batch in batches:
      state, metrics = sharded_step(state, sharding.make_global_batch(batch, mesh))
    max_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(reference_params)))
    layouts = {}
    for name, leaf in (('query', state.params['decoder/~/layer_01/~/cross_attention']['query']),
                       ('mq_key', state.params['decoder/~/layer_00/~/self_attention']['key']),
                       ('mha_key', state.params['encoder/~/layer_00/~/self_attention']['key']),
                       ('embeddings', state.params['shared_embedding']['embeddings']),
                       ('wo', state.params['decoder/~/layer_01/~/mlp']['wo'])):
      layouts[name] = [list(leaf.sharding.spec), list(leaf.addressable_shards[0].data.shape)]
    opt_v = [x for x in jax.tree.leaves(state.opt_state) if x.shape == (32, 4, 8)]
    results['meshes']['x'.join(map(str, shape)) + '-fsdp' * fsdp] = dict(
        max_param_diff=max_diff, step=int(state.step), loss=float(metrics['loss']),
        layouts=layouts, opt_specs=sorted({str(tuple(x.sharding.spec)) for x in opt_v}))
  try:
    sharding.make_mesh((3, 2))
  except ValueError as e:
    results['bad_mesh_error'] = str(e)
  try:
    sharding.make_global_batch(_batch(3, batch_size=6), sharding.make_mesh((4, 2)))
  except ValueError as e:
    results['bad_batch_error'] = str(e)
  return results


def run_multi_device_checks() -> dict:
  """This file as a script in a fresh 8-device process; its JSON results."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get('PYTHONPATH')])))
  env.pop('XLA_FLAGS', None)  # the script sets its own
  # Share the persistent compilation cache if tests/conftest.py (or the user) configured one.
  if jax.config.jax_compilation_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = str(
        jax.config.jax_persistent_cache_min_compile_time_secs)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_training_on_8_devices():
  """One test, so that pytest-xdist never starts the (compile-heavy) subprocess twice."""
  results = run_multi_device_checks()
  # The sharded step equals the single-device step on every mesh (params after 2 steps), FSDP too.
  for shape in ('8x1', '4x2', '2x4', '4x2-fsdp'):
    result = results['meshes'][shape]
    assert result['step'] == 2, shape
    assert result['max_param_diff'] < 1e-5, (shape, result)
  assert results['sharded_init_max_diff'] == 0.0  # the three-line init makes the same params

  # Parameters are laid out as the rules say: query [32, 4, 8] on heads, MQ key [32, 8] whole,
  # MHA key [32, 4, 8] on kv heads, embeddings [256, 32] on vocab, wo [64, 32] on d_ff.
  layouts = results['meshes']['2x4']['layouts']
  assert layouts['query'] == [[None, 'model', None], [32, 1, 8]]
  assert layouts['mq_key'] == [[None, None], [32, 8]]
  assert layouts['mha_key'] == [[None, 'model', None], [32, 1, 8]]
  assert layouts['embeddings'] == [['model', None], [64, 32]]
  assert layouts['wo'] == [['model', None], [16, 32]]
  # The optimizer's query/key-shaped second moments follow their parameters onto the mesh.
  assert results['meshes']['2x4']['opt_specs'] == ["(None, 'model', None)"]
  # FSDP: each parameter's largest free dimension also over 'data' (4): query [32, 4, 8] by D and
  # heads, MQ key [32, 8] by D, wo [64, 32] by d_ff (model) and D (data); optimizer state alike.
  layouts = results['meshes']['4x2-fsdp']['layouts']
  assert layouts['query'] == [['data', 'model', None], [8, 2, 8]]
  assert layouts['mq_key'] == [['data', None], [8, 8]]
  assert layouts['wo'] == [['model', 'data'], [32, 8]]
  assert layouts['embeddings'] == [['model', 'data'], [128, 8]]
  assert results['meshes']['4x2-fsdp']['opt_specs'] == ["('data', 'model', None)"]
  # 8x1: the model axis has size 1, so every parameter is whole on every device.
  assert results['meshes']['8x1']['layouts']['query'][1] == [32, 4, 8]

  # Errors against real devices.
  assert '(data=3, model=2) needs 6 devices but 8 are available' in results['bad_mesh_error']
  assert 'batch size 6 is not divisible by the mesh data axis size 4' in results['bad_batch_error']


if __name__ == '__main__':
  print(json.dumps(multi_device_checks()))
