"""Tests for fido/optim.py against hand-written numpy references of the paper's optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fido import optim

BETA2 = 0.999
EPS1, EPS2 = 1e-30, 1e-3


def _params():
  rng = np.random.default_rng(0)
  # 'b' has rms < epsilon2, so its updates are scaled by epsilon2, not by its own scale.
  return {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(1e-5 * rng.normal(size=(5,)), jnp.float32)}


def _grads(step):
  rng = np.random.default_rng(100 + step)
  scale = 10.0 ** step  # growing gradients push rms(g / sqrt(v)) above 1, exercising the clip
  return {'w': jnp.asarray(scale * rng.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(scale * rng.normal(size=(5,)), jnp.float32)}


def _config(**overrides):
  config = optim.default_config()
  config.update(overrides)
  return config


def _run(tx, params, steps, state=None, first_step=0):
  state = tx.init(params) if state is None else state
  update = jax.jit(tx.update)
  for step in range(first_step, first_step + steps):
    updates, state = update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _rms(x):
  return np.sqrt(np.mean(np.square(x)))


def _reference_fido(params, steps, lr, bias_correction, momentum, first_step=0,
                    m=None, t0=0, v_hat=None):
  """Paper appendix A in numpy (float64): Adam-style v, clip to block rms 1, relative step.

  m: raw Adam accumulator beta2 m + (1 - beta2)(g^2 + eps1); v_hat = m / (1 - beta2^t) when bias
  correction is on. `t0`/`v_hat` start from a carried-over, bias-corrected estimate at step t0.
  """
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  if v_hat is not None:  # recover the raw accumulator behind a bias-corrected estimate
    m = {k: np.asarray(v, np.float64) * (1 - BETA2 ** t0) for k, v in v_hat.items()}
  m = m or {k: np.zeros_like(v) for k, v in params.items()}
  mom = {k: np.zeros_like(v) for k, v in params.items()}
  for i, step in enumerate(range(first_step, first_step + steps)):
    t = t0 + i + 1
    for k, g in _grads(step).items():
      g = np.asarray(g, np.float64)
      m[k] = BETA2 * m[k] + (1 - BETA2) * (g ** 2 + EPS1)
      v = m[k] / (1 - BETA2 ** t) if bias_correction else m[k]
      u = g / np.sqrt(v)
      u = u / max(1.0, _rms(u) / 1.0)
      u = u * max(EPS2, _rms(params[k]))
      u = -lr * u
      if momentum is not None:
        mom[k] = momentum * mom[k] + (1 - momentum) * u
        u = mom[k]
      params[k] = params[k] + u
  return params


@pytest.mark.parametrize('bias_correction', [True, False])
@pytest.mark.parametrize('momentum', [None, 0.9])
def test_fido_adafactor_matches_numpy_reference(bias_correction, momentum):
  params = _params()
  config = _config(learning_rate=0.1, bias_correction=bias_correction, momentum=momentum)
  got, _ = _run(optim.make_optimizer(config), params, steps=3)
  want = _reference_fido(params, 3, 0.1, bias_correction, momentum)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-9, err_msg=k)
  assert not np.allclose(got['w'], params['w'])


def test_second_moment_decay_is_constant_not_adafactors():
  params = {'w': jnp.ones((4, 3))}
  g = {'w': jnp.full((4, 3), 2.0)}
  states = {}
  for name, bias_correction in [('fido_adafactor', False), ('adafactor', True)]:
    tx = optim.make_optimizer(_config(name=name, bias_correction=bias_correction))
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
      _, state = update(g, state, params)
    states[name] = optim._find_factored_state(state, name).v['w']
  # Constant decay from v=0: v_3 = (1 - beta2^3) g^2; Adafactor's d_0 = 0 gives v_3 = g^2.
  np.testing.assert_allclose(states['fido_adafactor'], (1 - BETA2 ** 3) * 4.0, rtol=1e-4)
  np.testing.assert_allclose(states['adafactor'], 4.0, rtol=1e-5)
  # The bias-corrected decay tends to beta2 (Adafactor's 1 - t^-0.8 tends to 1).
  assert optim.adam_like_decay(jnp.asarray(0), BETA2) == 0.0
  np.testing.assert_allclose(optim.adam_like_decay(jnp.asarray(10 ** 6), BETA2), BETA2, rtol=1e-6)
  np.testing.assert_allclose(optim.constant_decay(jnp.asarray(7), BETA2), BETA2)


def test_adafactor_and_adamw_match_optax_references():
  rng = np.random.default_rng(1)
  params = {'big': jnp.asarray(rng.normal(size=(128, 130)), jnp.float32), **_params()}

  def grads(step):
    return jax.tree.map(lambda p: jnp.sin(p * (step + 1)) + 0.1, params)

  for config, reference in [
      (_config(name='adafactor', learning_rate=0.01), optax.adafactor(0.01)),
      (_config(name='adamw', learning_rate=0.01, weight_decay=0.1),
       optax.adamw(0.01, weight_decay=0.1)),
  ]:
    results = []
    for tx in (optim.make_optimizer(config), reference):
      p, state, update = params, tx.init(params), jax.jit(tx.update)
      for step in range(3):
        updates, state = update(grads(step), state, p)
        p = optax.apply_updates(p, updates)
      results.append(p)
    for k in params:
      np.testing.assert_allclose(results[0][k], results[1][k], rtol=1e-6, atol=1e-7,
                                 err_msg=config.name)


def test_schedules():
  const = optim.make_schedule(_config())
  rsqrt = optim.make_schedule(optim.pretraining_config())
  np.testing.assert_allclose(const(0), 1e-3)
  np.testing.assert_allclose(const(50_000), 1e-3)
  np.testing.assert_allclose(rsqrt(0), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(rsqrt(5_000), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(rsqrt(10_000), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(rsqrt(40_000), 5e-3, rtol=1e-6)  # 1e-2 * sqrt(10k / 40k)
  np.testing.assert_allclose(rsqrt(40_000), 1 / np.sqrt(40_000), rtol=1e-6)  # T5: 1/sqrt(step)
  with pytest.raises(ValueError, match='schedule'):
    optim.make_schedule(_config(schedule='cosine'))
  with pytest.raises(ValueError, match='name'):
    optim.make_optimizer(_config(name='sgd'))


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_learning_rate_cut_scales_the_update(name):
  params = _params()
  tx = optim.make_optimizer(_config(name=name, learning_rate=0.01))
  _, state = _run(tx, params, steps=2)
  update = jax.jit(tx.update)
  base, _ = update(_grads(2), state, params)
  cut_state = optim.scale_learning_rate(state, 0.1)
  assert float(optim.get_lr_scale(cut_state)) == pytest.approx(0.1)
  cut, next_state = update(_grads(2), cut_state, params)
  for k in params:
    np.testing.assert_allclose(cut[k], 0.1 * base[k], rtol=1e-5, atol=1e-12)
  # The cut persists through updates, compounds, and touches nothing else.
  assert float(optim.get_lr_scale(next_state)) == pytest.approx(0.1)
  assert float(optim.get_learning_rate(next_state)) == pytest.approx(1e-3)
  halved = optim.scale_learning_rate(next_state, 0.5)
  assert float(optim.get_lr_scale(halved)) == pytest.approx(0.05)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), state, cut_state)
  assert sum(jax.tree.leaves(changed)) == 1


def _pretrain(params, steps=5):
  tx = optim.make_optimizer(_config(learning_rate=0.01, schedule='rsqrt', warmup_steps=2,
                                    momentum=0.9))
  return _run(tx, params, steps)


def test_carry_over_second_moments():
  params = _params()
  _, pre_state = _pretrain(params)
  fine_tx = optim.make_optimizer(_config(learning_rate=0.1))
  fresh = fine_tx.init(params)
  carried = optim.carry_over_second_moments(pre_state, fresh)

  pre_v = optim._find_factored_state(pre_state, 'pre')
  got_v = optim._find_factored_state(carried, 'carried')
  assert int(got_v.count) == 5  # the count the bias-corrected decay needs
  for k in params:
    np.testing.assert_array_equal(got_v.v[k], pre_v.v[k])
  # The fine-tuning schedule's counter and lr_scale stay fresh.
  is_inject = lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)
  [lr_stage] = [x for x in jax.tree.leaves(carried, is_leaf=is_inject) if is_inject(x)]
  assert int(lr_stage.count) == 0
  assert float(optim.get_lr_scale(carried)) == 1.0

  after_carry, _ = _run(fine_tx, params, steps=1, state=carried, first_step=5)
  after_fresh, _ = _run(fine_tx, params, steps=1, state=fresh, first_step=5)
  want = _reference_fido(params, 1, 0.1, True, None, first_step=5, t0=5, v_hat=pre_v.v)
  fresh_want = _reference_fido(params, 1, 0.1, True, None, first_step=5)
  for k in params:
    np.testing.assert_allclose(after_carry[k], want[k], rtol=2e-5, atol=1e-9, err_msg=k)
    np.testing.assert_allclose(after_fresh[k], fresh_want[k], rtol=2e-5, atol=1e-9, err_msg=k)
    assert not np.allclose(after_carry[k], after_fresh[k]), k


def test_carry_over_errors():
  params = _params()
  fresh = optim.make_optimizer(_config()).init(params)
  adamw_state = optim.make_optimizer(_config(name='adamw')).init(params)
  for bad in (adamw_state, optax.identity().init(params), {'v': params}):
    with pytest.raises(ValueError, match='second-moment'):
      optim.carry_over_second_moments(bad, fresh)
  with pytest.raises(ValueError, match='second-moment'):
    optim.carry_over_second_moments(fresh, adamw_state)

  wider = dict(params, w=jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(3, 5\).*\(3, 4\)"):
    optim.carry_over_second_moments(optim.make_optimizer(_config()).init(wider), fresh)
  extra = dict(params, extra=jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"\['extra'\] exists only in the pre-training"):
    optim.carry_over_second_moments(optim.make_optimizer(_config()).init(extra), fresh)
