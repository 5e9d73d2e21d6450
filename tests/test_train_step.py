"""Tests for fido/train_step.py: loss maths, padding, accumulation, remat, dropout keys, learning.

Compiles dominate the run time, so there are five: the initial state, the train step and its
remat twin over one dropout model, and two gradient functions (accumulation off and on).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fido import optim
from fido import train_step as ts
from fido.config import model_config, validate_model_config
from fido.model.fid import make_model

VOCAB = 32
EOS = 1
B, P, L, T = 4, 2, 6, 5


def small_model(dropout_rate):
  """FiDO-shaped (LSA period 2, multi-query decoder) with 1 encoder and 2 decoder layers."""
  config = model_config('tiny', 'tiny', cross_attention_period=2, decoder_kv_heads=1,
                        cross_kv_heads=1, vocab_size=VOCAB, dropout_rate=dropout_rate)
  config.encoder.update(size='custom', num_layers=1)
  config.decoder.size = 'custom'
  validate_model_config(config)
  return make_model(config)


def train_config(**overrides):
  config = ts.default_config()
  config.update(batch_size=B, **overrides)
  return config


def copy_batch(seed=0):
  """Target = the first T - 1 tokens of passage 0, then EOS; ragged target lengths, some padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, VOCAB, size=(B, P, L)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, 1, 3:] = False
  ids[~mask] = 0
  lengths = np.array([T, 2, 4, 3])  # tokens incl. EOS; row 1 has one token + EOS
  target_ids = np.zeros((B, T), np.int32)
  for b, n in enumerate(lengths):
    target_ids[b, :n - 1] = ids[b, 0, :n - 1]
    target_ids[b, n - 1] = EOS
  target_mask = np.arange(T)[None] < lengths[:, None]
  return dict(passage_ids=ids, passage_mask=mask, target_ids=target_ids, target_mask=target_mask)


OPTIMIZER = optim.make_optimizer(optim.pretraining_config())  # lr 1e-2: visible progress in steps


@pytest.fixture(scope='module')
def dropout_model():
  return small_model(0.1)


@pytest.fixture(scope='module')
def state(dropout_model):
  """One initial state; parameter trees do not depend on the dropout rate."""
  init = jax.jit(functools.partial(ts.init_train_state, dropout_model, OPTIMIZER))
  return init(jax.random.key(0), copy_batch())


@pytest.fixture(scope='module')
def step_fn(dropout_model):
  return jax.jit(ts.make_train_step(dropout_model, OPTIMIZER, train_config()))


def gradient_fn(model, **overrides):
  return jax.jit(ts.make_gradient_fn(model, train_config(**overrides)))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


# ----------------------------------------------------------------------------------------- loss


def test_token_sums_match_a_hand_computation():
  logits = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, 9.0, 9.0]]], np.float32)
  targets = np.array([[0, 1, 2]], np.int32)
  mask = np.array([[True, True, False]])
  sums = jax.jit(ts.token_sums, static_argnums=3)(logits, targets, mask, 1e-4)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))[0]
  ce = (log_z[0] - 2.0) + (log_z[1] - 0.5)
  np.testing.assert_allclose(sums['cross_entropy'], ce, rtol=1e-6)
  np.testing.assert_allclose(sums['z_loss'], 1e-4 * (log_z[0]**2 + log_z[1]**2), rtol=1e-6)
  assert sums['correct'] == 1.0  # position 0 right, position 1 wrong, position 2 padding
  assert sums['num_tokens'] == 2.0


def test_step_reports_the_mean_token_loss_with_z_loss(step_fn, state):
  batch = copy_batch()
  _, metrics = step_fn(state, batch)
  assert metrics['num_tokens'] == batch['target_mask'].sum()
  np.testing.assert_allclose(metrics['loss'], metrics['cross_entropy'] + metrics['z_loss'], rtol=1e-6)
  assert 0.0 < metrics['z_loss'] < 1e-4 * 100.0  # 1e-4 * (log Z)^2 with log Z ~ a few
  np.testing.assert_allclose(metrics['learning_rate'], 1e-2, rtol=1e-6)
  assert metrics['is_finite'] and metrics['grad_norm'] > 0.0


def test_padded_target_tokens_change_nothing(step_fn, state):
  batch = copy_batch()
  garbage = dict(batch, target_ids=np.where(batch['target_mask'], batch['target_ids'],
                                            np.int32(VOCAB - 1)))
  assert (garbage['target_ids'] != batch['target_ids']).any()
  new_state, metrics = step_fn(state, batch)
  new_state_garbage, metrics_garbage = step_fn(state, garbage)
  assert_trees_close(metrics, metrics_garbage, rtol=1e-6, atol=0.0)
  assert_trees_close(new_state.params, new_state_garbage.params, rtol=1e-6, atol=0.0)


# --------------------------------------------------------------------------------------- steps


def test_loss_falls_on_a_copy_task(step_fn, state):
  batch = copy_batch()
  losses = []
  for _ in range(12):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics['cross_entropy']))
  assert int(state.step) == 12
  assert np.mean(losses[-3:]) < 0.6 * losses[0], losses  # dropout 0.1 makes single steps noisy


def test_dropout_key_differs_per_step_and_repeats_within_one(step_fn, state):
  batch = copy_batch()
  after_0, at_0 = step_fn(state, batch)
  _, at_0_again = step_fn(state, batch)
  _, at_1 = step_fn(state._replace(step=jnp.ones([], jnp.int32)), batch)  # same params
  assert at_0['loss'] == at_0_again['loss']
  assert abs(float(at_0['loss']) - float(at_1['loss'])) > 1e-4
  # The base key is never advanced (step s folds s in), so a resumed run replays the same masks.
  np.testing.assert_array_equal(jax.random.key_data(after_0.rng), jax.random.key_data(state.rng))
  assert int(after_0.step) == 1


def test_a_blow_up_is_reported_not_guarded(step_fn, state):
  poisoned = state._replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  new_state, metrics = step_fn(poisoned, copy_batch())
  assert not metrics['is_finite']
  assert int(new_state.step) == 1  # the loop decides what to do (roll back), not the step


def test_gradient_accumulation_equals_the_full_batch(state):
  model = small_model(0.0)
  batch = copy_batch()
  full_grads, full_sums = gradient_fn(model)(state.params, state.rng, batch)
  accum_grads, accum_sums = gradient_fn(model, gradient_accumulation_steps=2)(
      state.params, state.rng, batch)
  assert_trees_close(accum_sums, full_sums)
  assert_trees_close(accum_grads, full_grads, rtol=1e-4, atol=1e-7)
  # Unequal token counts per micro-batch (9 vs 5): a mean of micro-batch means would differ.
  rows = batch['target_mask'].sum(1)
  assert rows[0::2].sum() != rows[1::2].sum()


def test_remat_gives_the_same_steps(dropout_model, step_fn, state):
  """Two steps with dropout on (hk.remat must replay the same masks); the second update depends
  on the first step's gradient magnitudes through the second moments, not only on signs."""
  remat_step = jax.jit(ts.make_train_step(dropout_model, OPTIMIZER, train_config(remat='layer')))
  batch = copy_batch()
  plain, remat = state, state
  for _ in range(2):
    plain, plain_metrics = step_fn(plain, batch)
    remat, remat_metrics = remat_step(remat, batch)
    assert_trees_close(remat_metrics, plain_metrics, rtol=1e-5)
  assert_trees_close(remat.params, plain.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('remat,policy', [
    ('layer', 'None'), ('layer_dots', 'DotsSaveable(only_if_no_batch_dims=True)')])
def test_remat_wraps_each_layer(dropout_model, state, remat, policy):
  jaxpr = str(jax.make_jaxpr(ts.make_gradient_fn(dropout_model, train_config(remat=remat)))(
      state.params, state.rng, copy_batch()))
  found = re.findall(r'\b(?:remat2?|checkpoint)\[.*?policy=(\S+)', jaxpr, flags=re.S)
  assert len(found) == 3, found  # 1 encoder + 2 decoder layers
  assert all(policy in p for p in found), found


def test_invalid_train_config_is_rejected():
  with pytest.raises(ValueError, match='remat'):
    ts.validate_train_config(train_config(remat='everything'))
  with pytest.raises(ValueError, match='not divisible by gradient_accumulation_steps=3'):
    ts.validate_train_config(train_config(gradient_accumulation_steps=3))
