"""Optimizers: FiDO's hybrid Adafactor/Adam, plain Adafactor and AdamW; schedules; the run-time
learning-rate cut; second-moment carry-over from pre-training into fine-tuning.

Every optimizer is an optax `chain` of library transformations (no hand-written update maths). An
update pytree has the structure and shapes of the parameter pytree; all state leaves are float32
except integer step counts.

FiDO (de Jong et al., 2022, appendix A) fine-tunes with "Adafactor" changed in three ways that make
it Adam-like: factoring off (full per-parameter second moments), the step-dependent second-moment
decay 1 - t^-0.8 replaced by a constant decay beta2, and the second moments carried over from
pre-training. Update clipping (block RMS 1.0) and parameter-scale relative updates stay as in
Adafactor; momentum is optional.

Chain layout (`name='fido_adafactor'`; 'adafactor' differs only in the first stage):

  scale_by_factored_rms   u = g / sqrt(v);  v <- d_t v + (1 - d_t) (g^2 + epsilon1)
  clip_by_block_rms       u <- u / max(1, rms(u) / clipping_threshold)        (per parameter array)
  scale_by_param_block_rms u <- u * max(epsilon2, rms(param))                 (relative step size)
  lr stage                u <- -learning_rate(count) * lr_scale * u           (inject_hyperparams)
  ema (if momentum)       m <- momentum m + (1 - momentum) u;  u <- m         (T5X: on lr-scaled u)

Second-moment decay d_t (t = the FactoredState count, 0 at the first update):
  bias_correction=True  d_t = beta2 (1 - beta2^t) / (1 - beta2^(t+1)): Adam's constant beta2 with
                        its bias correction folded in (Mesh-TF/Praxis `adafactor_decay_rate_adam`);
                        v_t is then exactly Adam's bias-corrected v_hat_t, d_0 = 0, d_t -> beta2.
  bias_correction=False d_t = beta2 for every t (a plain EMA that starts from v = 0).
We default to beta2 = 0.999 (Adam's default; the paper calls its decay "Adam-like" without quoting a
value) with the folded bias correction, so the first steps are not inflated by a v biased to zero.

Learning-rate cut: the lr stage keeps a numeric hyperparameter `lr_scale` (1.0 at init) in the
optimizer state. `scale_learning_rate(opt_state, 0.1)` multiplies it without touching any other
state, so a divergence rollback can restore a checkpoint and continue at a tenth of the learning
rate; the scale is part of `opt_state`, so it is checkpointed with it and survives a resume.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fido.config import ConfigError

OPTIMIZERS = ('fido_adafactor', 'adafactor', 'adamw')
SCHEDULES = ('constant', 'rsqrt')


def default_config() -> ml_collections.ConfigDict:
  """The `config.optimizer` section: FiDO fine-tuning (paper appendix A: constant lr 1e-3)."""
  return ml_collections.ConfigDict(dict(
      name='fido_adafactor',             # one of OPTIMIZERS
      learning_rate=1e-3,                # peak; adafactor family: relative to parameter RMS
      schedule='constant',               # 'constant' | 'rsqrt' (T5 pre-training)
      warmup_steps=10_000,               # rsqrt: lr is constant for this many steps, then decays
      second_moment_decay=0.999,         # beta2 (fido_adafactor, adamw)
      bias_correction=True,              # fido_adafactor: fold Adam's bias correction into d_t
      decay_exponent=0.8,                # adafactor: d_t = 1 - (t + 1)^-decay_exponent
      clipping_threshold=1.0,            # block-RMS update clipping (adafactor family); None = off
      multiply_by_parameter_scale=True,  # relative updates (adafactor family)
      momentum=ml_collections.config_dict.placeholder(float),  # beta1 of an EMA; None = off
      epsilon1=1e-30,                    # added to g^2 (adafactor family)
      epsilon2=1e-3,                     # minimum parameter scale (adafactor family)
      min_dim_size_to_factor=128,        # adafactor: factor only arrays with two dims >= this
      adam_b1=0.9,                       # adamw
      adam_epsilon=1e-8,                 # adamw
      weight_decay=0.0,                  # adamw: decoupled, multiplied by the learning rate
  ))  # The carry-over switch lives with the initialisation: config.init.carry_second_moments.


def pretraining_config() -> ml_collections.ConfigDict:
  """T5 pre-training recipe: lr 1e-2 for 10k warm-up steps, then 1e-2 * sqrt(10k / step)."""
  config = default_config()
  config.update(learning_rate=1e-2, schedule='rsqrt', warmup_steps=10_000)
  return config


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate as a function of the optimizer's update count (0 at the first update).

  'constant': learning_rate.  'rsqrt': learning_rate * sqrt(warmup / max(count, warmup)), i.e. T5's
  1 / sqrt(max(step, 10k)) when learning_rate = 1e-2 and warmup_steps = 10k.
  """
  if config.schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  if config.schedule == 'rsqrt':
    if config.warmup_steps < 1:
      raise ConfigError(f'config.optimizer.warmup_steps={config.warmup_steps} must be >= 1 for rsqrt')
    peak, warmup = config.learning_rate, float(config.warmup_steps)

    def rsqrt(count):
      return peak * jnp.sqrt(warmup / jnp.maximum(jnp.asarray(count, jnp.float32), warmup))

    return rsqrt
  raise ConfigError(f'config.optimizer.schedule={config.schedule!r}; expected one of {SCHEDULES}')


def adam_like_decay(count: jax.Array, beta2: float) -> jax.Array:
  """d_t = beta2 (1 - beta2^t) / (1 - beta2^(t+1)): constant beta2, Adam's bias correction folded in.

  With v_0 = 0, v_t = d_t v_{t-1} + (1 - d_t) g_t^2 equals Adam's v_hat = m_t / (1 - beta2^t) for
  m_t = beta2 m_{t-1} + (1 - beta2) g_t^2 (t counted from 1). d_0 = 0 and d_t -> beta2.
  """
  t = jnp.asarray(count, jnp.float32)
  return beta2 * (1.0 - beta2 ** t) / (1.0 - beta2 ** (t + 1.0))


def constant_decay(count: jax.Array, beta2: float) -> jax.Array:
  """d_t = beta2: the paper's constant decay without bias correction."""
  del count
  return jnp.asarray(beta2, jnp.float32)


def _scaled_descent(learning_rate: float, lr_scale: float) -> optax.GradientTransformation:
  return optax.scale(-learning_rate * lr_scale)


def _lr_stage(schedule: optax.Schedule) -> optax.GradientTransformation:
  """u -> -schedule(count) * lr_scale * u; both values live in the state's `hyperparams`."""
  return optax.inject_hyperparams(_scaled_descent)(learning_rate=schedule, lr_scale=1.0)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer named by `config.name` (see the module docstring for the chain layout).

  'fido_adafactor': the paper's hybrid (appendix A). 'adafactor': optax.adafactor's recipe
  (factored, d_t = 1 - (t+1)^-0.8). 'adamw': Adam with decoupled weight decay (optax.adamw).
  All three end in the same lr stage, so `scale_learning_rate` works for each.
  """
  schedule = make_schedule(config)
  if config.name == 'adamw':
    tx = [optax.scale_by_adam(b1=config.adam_b1, b2=config.second_moment_decay,
                              eps=config.adam_epsilon)]
    if config.weight_decay:
      tx.append(optax.add_decayed_weights(config.weight_decay))
    return optax.chain(*tx, _lr_stage(schedule))

  if config.name == 'fido_adafactor':
    decay_fn = adam_like_decay if config.bias_correction else constant_decay
    # Paper appendix A: factoring off, constant (Adam-like) decay instead of 1 - t^-0.8.
    second_moments = optax.scale_by_factored_rms(
        factored=False, decay_rate=config.second_moment_decay, epsilon=config.epsilon1,
        decay_rate_fn=decay_fn)
  elif config.name == 'adafactor':
    second_moments = optax.scale_by_factored_rms(
        factored=True, decay_rate=config.decay_exponent, epsilon=config.epsilon1,
        min_dim_size_to_factor=config.min_dim_size_to_factor)
  else:
    raise ConfigError(f'config.optimizer.name={config.name!r}; expected one of {OPTIMIZERS}')
  tx = [second_moments]
  if config.clipping_threshold is not None:
    tx.append(optax.clip_by_block_rms(config.clipping_threshold))
  if config.multiply_by_parameter_scale:
    tx.append(optax.scale_by_param_block_rms(config.epsilon2))
  tx.append(_lr_stage(schedule))
  if config.momentum is not None:
    tx.append(optax.ema(config.momentum, debias=False))
  return optax.chain(*tx)


# ----------------------------------------------------------------------------- learning-rate cut


def _is_lr_stage(x: Any) -> bool:
  return isinstance(x, optax.InjectStatefulHyperparamsState) and 'lr_scale' in x.hyperparams


def _lr_stage_state(opt_state: Any) -> optax.InjectStatefulHyperparamsState:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_lr_stage) if _is_lr_stage(x)]
  if len(found) != 1:
    raise ValueError(f'expected one lr stage (hyperparams with lr_scale) in the optimizer state, '
                     f'found {len(found)}; was it built by fido.optim.make_optimizer?')
  return found[0]


def get_lr_scale(opt_state: Any) -> jax.Array:
  """The current multiplier on the scheduled learning rate (1.0 unless cut)."""
  return _lr_stage_state(opt_state).hyperparams['lr_scale']


def get_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate of the last update: schedule value times lr_scale (for logging)."""
  hyperparams = _lr_stage_state(opt_state).hyperparams
  return hyperparams['learning_rate'] * hyperparams['lr_scale']


def scale_learning_rate(opt_state: Any, factor: float) -> Any:
  """`opt_state` with its lr_scale multiplied by `factor` (0.1 = the paper's 10x cut); pure.

  Only that scalar hyperparameter changes: moments, counts and the schedule position are kept, so
  the call can follow a checkpoint restore without re-initialising the optimizer. Cuts compound.
  """
  stage = _lr_stage_state(opt_state)
  old = jnp.asarray(stage.hyperparams['lr_scale'])
  hyperparams = {**stage.hyperparams, 'lr_scale': (old * factor).astype(old.dtype)}
  new_stage = stage._replace(hyperparams=hyperparams)
  return jax.tree.map(lambda x: new_stage if _is_lr_stage(x) else x, opt_state, is_leaf=_is_lr_stage)


# ----------------------------------------------------------------------- second-moment carry-over


def _is_factored(x: Any) -> bool:
  return isinstance(x, optax.FactoredState)


def _find_factored_state(opt_state: Any, name: str) -> optax.FactoredState:
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_factored) if _is_factored(x)]
  if len(found) != 1:
    kinds = sorted({type(x).__name__ for x in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, tuple) and hasattr(x, '_fields'))})
    raise ValueError(
        f'{name} has {len(found)} Adafactor second-moment states (optax.FactoredState), expected '
        f'exactly one; its state types are {kinds or "none (an empty or plain-dict state)"}. '
        'Carry-over needs an fido_adafactor/adafactor state restored into its NamedTuple '
        'structure (restore with abstract_state=jax.eval_shape(optimizer.init, params)).')
  return found[0]


def _check_same_shapes(src: Any, dst: Any, what: str) -> None:
  """Raises ValueError naming the first path whose presence or shape differs between trees."""
  src_leaves = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(src))
  dst_leaves = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(dst))
  for path in sorted(src_leaves.keys() | dst_leaves.keys()):
    if path not in src_leaves or path not in dst_leaves:
      where = 'fine-tuning' if path not in src_leaves else 'pre-training'
      raise ValueError(f'{what}: parameter {path} exists only in the {where} optimizer state; '
                       'the parameter trees must match')
    if jnp.shape(src_leaves[path]) != jnp.shape(dst_leaves[path]):
      raise ValueError(f'{what}: parameter {path} has shape {jnp.shape(src_leaves[path])} in the '
                       f'pre-training state but {jnp.shape(dst_leaves[path])} in the fine-tuning '
                       'state')


def carry_over_second_moments(pretrained_opt_state: Any, fresh_opt_state: Any) -> Any:
  """`fresh_opt_state` with the pre-training second moments (FiDO appendix A) swapped in.

  Copied from the pre-training state's optax.FactoredState: `v` (and `v_row`/`v_col`) and its
  `count`. The count must come along because the second-moment decay is a function of it:
  with a fresh count 0 the first fine-tuning update would use d_0 = 0 (Adam-like and 1 - t^-0.8
  alike) and overwrite the carried v with g^2, discarding it. With the pre-training count, d_t is
  already at beta2 and the carried v keeps its weight. Everything else stays fresh: the lr stage's
  own counter (so fine-tuning's schedule starts at step 0), lr_scale (1.0) and momentum (zeros).

  Both states must come from the same optimizer family (fido_adafactor <-> fido_adafactor, or
  adafactor <-> adafactor) over the same parameter tree. Raises ValueError naming the problem if
  the pre-training state has no FactoredState (e.g. adamw, an empty state, or a checkpoint
  restored without a target) or the moment trees differ (first mismatching path, both shapes).
  """
  src = _find_factored_state(pretrained_opt_state, 'pretrained_opt_state')
  dst = _find_factored_state(fresh_opt_state, 'fresh_opt_state')
  for field in ('v', 'v_row', 'v_col'):
    _check_same_shapes(getattr(src, field), getattr(dst, field), f'second moments ({field})')
  carried = dst._replace(count=jnp.asarray(src.count, jnp.asarray(dst.count).dtype),
                         v=src.v, v_row=src.v_row, v_col=src.v_col)
  return jax.tree.map(lambda x: carried if _is_factored(x) else x, fresh_opt_state,
                      is_leaf=_is_factored)
