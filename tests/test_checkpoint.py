"""Tests for fido/checkpoint.py: round trips, retention, async saves, corruption fallback, errors."""

import functools
import logging
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fido import checkpoint, optim
from fido.errors import CheckpointError


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


@functools.lru_cache(maxsize=None)
def _state(step=7, typed_key=True, w_shape=(3, 4), with_opt=True):
  rng = np.random.default_rng(step)
  params = {'enc': {'w': jnp.asarray(rng.normal(size=w_shape), jnp.float32)},
            'dec': {'b': jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16)}}
  opt_state = None
  if with_opt:
    config = optim.default_config()
    config.momentum = 0.9
    tx = optim.make_optimizer(config)
    opt_state = tx.init(params)
    _, opt_state = tx.update(jax.tree.map(lambda p: p * 0.5, params), opt_state, params)
  key = jax.random.key(step) if typed_key else jax.random.PRNGKey(step)
  return TrainState(params, opt_state, jnp.asarray(step, jnp.int32), key)


def _abstract(state):
  return jax.eval_shape(lambda: state)


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert x.dtype == y.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, steps, metrics=None, **kwargs):
  with checkpoint.Checkpointer(directory, **kwargs) as ckpt:
    for step in steps:
      ckpt.save(step, _state(step), metrics=None if metrics is None else metrics[step])


@pytest.mark.parametrize('typed_key', [True, False])
def test_round_trip_is_bit_identical(tmp_path, typed_key):
  state = _state(typed_key=typed_key)
  config = ml_collections.ConfigDict({'optimizer': optim.default_config().to_dict(), 'seed': 3})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(7, state, data_state={'epoch': 1, 'position': [3, 4]}, config=config,
                     metrics={'dev_em': np.float32(0.25)})
  restored = checkpoint.Checkpointer(tmp_path).restore(_abstract(state))  # a fresh process
  assert restored.step == 7
  assert isinstance(restored.state, TrainState)
  _assert_identical(restored.state, state)
  assert restored.data_state == {'epoch': 1, 'position': [3, 4]}
  assert restored.config == config
  assert restored.metrics == {'dev_em': 0.25}
  # The restored optimizer state is usable as-is (NamedTuples, lr hyperparameters).
  assert float(optim.get_lr_scale(restored.state.opt_state)) == 1.0


def test_bytes_data_state_and_restore_with_shardings(tmp_path):
  state = _state()
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state=b'\x00grain-state\xff')
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  abstract = _abstract(state)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = abstract._replace(
      params=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract.params),
      rng=jax.ShapeDtypeStruct(abstract.rng.shape, abstract.rng.dtype, sharding=replicated))
  restored = checkpoint.Checkpointer(tmp_path).restore(abstract)
  assert restored.data_state == b'\x00grain-state\xff'
  assert restored.config is None
  assert restored.state.params['enc']['w'].sharding == sharding
  assert restored.state.rng.sharding == replicated
  _assert_identical(restored.state, state)


def test_keep_last_n(tmp_path):
  _save_steps(tmp_path, range(1, 6), keep_last=2)
  assert checkpoint.Checkpointer(tmp_path).all_steps() == [4, 5]


@pytest.mark.parametrize('mode,best', [('max', 2), ('min', 3)])
def test_keep_best_and_last(tmp_path, mode, best):
  metrics = {1: {'em': 0.2}, 2: {'em': 0.9}, 3: {'em': 0.1}, 4: {'em': 0.3}, 5: {'em': 0.25}}
  kwargs = dict(keep_last=1, keep_best=1, best_metric='em', best_mode=mode)
  _save_steps(tmp_path, range(1, 6), metrics, **kwargs)
  ckpt = checkpoint.Checkpointer(tmp_path, **kwargs)
  assert ckpt.all_steps() == sorted({best, 5})
  assert ckpt.best_step() == best
  with pytest.raises(ValueError, match='best_metric'):
    ckpt.save(6, _state(6), metrics={'loss': 1.0})


def test_async_save_then_restore(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=True)
  states = {step: _state(step) for step in (1, 2)}
  for step, state in states.items():
    ckpt.save(step, state)
  restored = ckpt.restore(_abstract(states[2]))  # waits for the pending save
  _assert_identical(restored.state, states[2])
  _assert_identical(ckpt.restore(_abstract(states[1]), step=1).state, states[1])
  ckpt.close()


def _truncate_params(step_dir):
  for root, _, files in os.walk(step_dir / 'params'):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    'truncated_files': _truncate_params,
    'deleted_item': lambda step_dir: shutil.rmtree(step_dir / 'opt_state'),
    'deleted_array_data': lambda step_dir: [p.unlink() for p in (step_dir / 'params/d').iterdir()],
    'missing_step_metadata': lambda step_dir: (step_dir / '_CHECKPOINT_METADATA').unlink(),
}


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, corruption):
  _save_steps(tmp_path, (1, 2))
  CORRUPTIONS[corruption](tmp_path / '2')
  with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
    restored = checkpoint.Checkpointer(tmp_path).restore(_abstract(_state(1)))
  assert restored.step == 1
  _assert_identical(restored.state, _state(1))
  warnings = [r.getMessage() for r in caplog.records if r.name == checkpoint.__name__]
  assert len(warnings) == 1 and str(tmp_path / '2') in warnings[0], warnings


def test_unfinalised_save_is_ignored(tmp_path):
  _save_steps(tmp_path, (1, 2))
  os.rename(tmp_path / '2', tmp_path / '2.orbax-checkpoint-tmp-1234')  # killed before the rename
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 1
  assert ckpt.restore(_abstract(_state(1))).step == 1


def test_no_restorable_checkpoint(tmp_path):
  _save_steps(tmp_path, (1, 2))
  for step in (1, 2):
    shutil.rmtree(tmp_path / str(step) / 'params')
  with pytest.raises(CheckpointError, match='no restorable checkpoint'):
    checkpoint.Checkpointer(tmp_path).restore(_abstract(_state(1)))


def test_missing_directory_and_no_checkpoints(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint found under .*missing'):
    checkpoint.Checkpointer(tmp_path / 'missing', read_only=True)
  with pytest.raises(FileNotFoundError, match='no checkpoint found under'):
    checkpoint.Checkpointer(tmp_path / 'empty').restore(_abstract(_state()))
  _save_steps(tmp_path / 'one', (1,))
  with pytest.raises(FileNotFoundError, match='no checkpoint for step 5'):
    checkpoint.Checkpointer(tmp_path / 'one').restore(_abstract(_state()), step=5)


def test_shape_mismatch_names_the_path(tmp_path):
  _save_steps(tmp_path, (1, 2))
  wrong = _abstract(_state(w_shape=(3, 5)))
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"params\['enc'\]\['w'\] has shape \(3, 4\).*expects \(3, 5\)"):
    ckpt.restore(wrong)  # a mismatch is not corruption: no fallback to step 1
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"opt_state\[0\]\['v'\]\['enc'\]"):
    ckpt.restore_optimizer_state(wrong.opt_state)


def test_missing_optimizer_state(tmp_path):
  params_only = _state(with_opt=False)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, params_only)
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  with pytest.raises(checkpoint.CheckpointMismatchError, match='no optimizer state'):
    ckpt.restore(_abstract(_state()))
  with pytest.raises(checkpoint.CheckpointMismatchError, match='no optimizer state'):
    ckpt.restore_optimizer_state(_abstract(_state()).opt_state)
  restored = ckpt.restore(_abstract(params_only))  # opt_state=None in the target: fine
  assert restored.state.opt_state is None
  _assert_identical(restored.state.params, params_only.params)


def test_fine_tuning_initialisation_from_pretraining_checkpoint(tmp_path):
  pre = _state(step=9)
  _save_steps(tmp_path, (9,))
  ckpt = checkpoint.Checkpointer(tmp_path, read_only=True)
  step, params = ckpt.restore_params_only(_abstract(pre.params))
  assert step == 9
  _assert_identical(params, pre.params)
  _, pre_opt = ckpt.restore_optimizer_state(_abstract(pre.opt_state))
  _assert_identical(pre_opt, pre.opt_state)
  fresh = optim.make_optimizer(optim.default_config()).init(params)
  carried = optim.carry_over_second_moments(pre_opt, fresh)
  np.testing.assert_array_equal(carried[0].v['enc']['w'], pre.opt_state[0].v['enc']['w'])


def test_delete_after_allows_resaving_after_rollback(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step))
    assert not ckpt.save(2, _state(2))  # orbax skips steps <= latest
    ckpt.delete_after(1)
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, _state(20))
  _assert_identical(checkpoint.Checkpointer(tmp_path).restore(_abstract(_state(20))).state,
                    _state(20))


def test_relative_directories_work(tmp_path, monkeypatch):
  """orbax refuses relative paths; run.py's default workdir is relative."""
  monkeypatch.chdir(tmp_path)
  with checkpoint.Checkpointer('workdirs/run/checkpoints') as ckpt:
    ckpt.save(1, _state(1))
  restored = checkpoint.Checkpointer('workdirs/run/checkpoints').restore(_abstract(_state(1)))
  _assert_identical(restored.state, _state(1))
  assert (tmp_path / 'workdirs/run/checkpoints/1').is_dir()
