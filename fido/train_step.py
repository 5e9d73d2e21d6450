"""Train state and the train step: token cross-entropy (+ z-loss), gradient accumulation, remat.

Shape glossary: B batch, A gradient-accumulation steps, M = B / A micro-batch, P passages,
L passage length, T target length, V vocabulary.

Batch (numpy or jax dict): passage_ids int32 [B, P, L] (0 pad), passage_mask bool [B, P, L],
target_ids int32 [B, T] (answer + EOS, 0 pad), target_mask bool [B, T]. The decoder reads
`shift_right(target_ids)` (teacher forcing).

Loss: the mean over all non-padding target tokens of the batch of
  cross_entropy = log Z - logit[target]   plus   z_loss * (log Z)^2   (T5X; Z = sum_v exp logit_v).
Micro-batches are summed, not averaged: each micro-batch's token sums are divided by the token
count of the whole batch, so A accumulated micro-batches give the big-batch gradient up to float
error whatever their token counts.

Dropout: step s uses the key fold_in(state.rng, s) (micro-batch a: fold_in of that, a), so a run
resumed from a checkpoint draws the same masks; state.rng itself never changes.

Remat ('none' | 'layer' | 'layer_dots'): each encoder and decoder layer's `__call__` runs under
`hk.remat`, installed from here with a scoped `hk.intercept_methods` so the model code needs no
option. 'layer' keeps only each layer's inputs for the backward pass and recomputes the rest;
'layer_dots' also keeps matmul outputs that have no dot batch dimension (the weight projections:
q/k/v/o, MLP) and recomputes attention scores, softmax, GELU and norms.

No NaN guard here: the loop decides what to do about divergence; `is_finite` is in the metrics.
"""

import functools
from typing import Any, Callable, Mapping, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fido import optim
from fido.config import ConfigError
from fido.model.decoder import DecoderLayer
from fido.model.encoder import EncoderLayer
from fido.model.fid import FiDFunctions, shift_right

Batch = Mapping[str, Any]
REMAT = ('none', 'layer', 'layer_dots')
BATCH_KEYS = ('passage_ids', 'passage_mask', 'target_ids', 'target_mask')
SUMS = ('cross_entropy', 'z_loss', 'correct', 'num_tokens')


class TrainState(NamedTuple):
  params: hk.Params
  opt_state: optax.OptState
  step: jax.Array  # int32 [], the number of optimizer updates applied
  rng: jax.Array   # PRNG key; never advanced: step s draws from fold_in(rng, s)


def default_config() -> ml_collections.ConfigDict:
  """The `config.train` section: what the step needs (the loop adds its own fields)."""
  return ml_collections.ConfigDict(dict(
      batch_size=64,                   # global examples per optimizer step (paper fine-tuning: 64)
      gradient_accumulation_steps=1,   # A: micro-batches of batch_size / A, scanned
      z_loss=1e-4,                     # T5X's coefficient on (log Z)^2; 0 = off
      remat='none',                    # one of REMAT
  ))


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  accum = config.gradient_accumulation_steps
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f'config.train.gradient_accumulation_steps={accum!r} must be an integer >= 1')
  if config.batch_size % accum:
    raise ConfigError(f'config.train.batch_size={config.batch_size} is not divisible by '
                      f'gradient_accumulation_steps={accum}')
  if config.remat not in REMAT:
    raise ConfigError(f'config.train.remat={config.remat!r}; expected one of {REMAT}')
  if config.z_loss < 0:
    raise ConfigError(f'config.train.z_loss={config.z_loss!r} must be >= 0')


# ----------------------------------------------------------------------------------------- loss


def token_sums(logits_BxTxV: jax.Array, target_ids_BxT: jax.Array, target_mask_BxT: jax.Array,
               z_loss: float) -> dict[str, jax.Array]:
  """Sums over non-padding target tokens: cross_entropy, z_loss, correct, num_tokens (float32)."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  mask_BxT = target_mask_BxT.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, target_ids_BxT[..., None], axis=-1)[..., 0]
  correct_BxT = jnp.argmax(logits_BxTxV, axis=-1) == target_ids_BxT
  return dict(
      cross_entropy=jnp.sum((log_z_BxT - target_logit_BxT) * mask_BxT),
      z_loss=jnp.sum(z_loss * jnp.square(log_z_BxT) * mask_BxT),
      correct=jnp.sum(correct_BxT * mask_BxT),
      num_tokens=jnp.sum(mask_BxT),
  )


def _remat_layers(policy: Callable | None):
  """A Haiku method interceptor running every Encoder/DecoderLayer.__call__ under hk.remat."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, (EncoderLayer, DecoderLayer)):
      # Keyword arguments (is_training: a Python bool) stay static: closed over, not traced.
      return hk.remat(lambda *a: next_fun(*a, **kwargs), policy=policy)(*args)
    return next_fun(*args, **kwargs)

  return interceptor


def loss_fn(params: hk.Params, rng: jax.Array | None, batch: Batch, *, model: FiDFunctions,
            z_loss: float = 0.0, normalizer: jax.Array | float = 1.0, remat: str = 'none',
            is_training: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(cross-entropy + z-loss token sums / normalizer, token sums) for one (micro-)batch.

  With `normalizer` = the whole batch's target-token count, the gradients of the micro-batches
  add up to the gradient of the batch's mean token loss.
  """
  decoder_input_ids = shift_right(batch['target_ids'])

  def forward():
    return model.forward(params, rng, batch['passage_ids'], batch['passage_mask'],
                         decoder_input_ids, is_training=is_training)

  if remat == 'none':
    logits_BxTxV = forward()
  else:
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == 'layer_dots' else None
    with hk.intercept_methods(_remat_layers(policy)):
      logits_BxTxV = forward()
  sums = token_sums(logits_BxTxV, batch['target_ids'], batch['target_mask'], z_loss)
  return (sums['cross_entropy'] + sums['z_loss']) / normalizer, sums


# ------------------------------------------------------------------------------------ the step


def _micro_batches(batch: Batch, accum: int) -> Batch:
  """[B, ...] -> [A, M, ...], micro-batch a = rows a, a + A, a + 2A, ...

  Strided rather than contiguous: with the batch sharded over 'data', every micro-batch keeps
  an equal share of each device's rows, so the split needs no communication.
  """
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by '
                       f'gradient_accumulation_steps={accum}')
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

  return {k: split(jnp.asarray(batch[k])) for k in BATCH_KEYS}


def make_gradient_fn(model: FiDFunctions, train_config: ml_collections.ConfigDict
                     ) -> Callable[[hk.Params, jax.Array, Batch], tuple[Any, dict[str, jax.Array]]]:
  """gradient_fn(params, rng, batch) -> (gradient of the mean token loss, token sums of the batch).

  With A = gradient_accumulation_steps > 1, a `lax.scan` over A micro-batches (micro-batch a uses
  the key fold_in(rng, a)) sums their gradients, each normalised by the whole batch's token count.
  """
  validate_train_config(train_config)
  accum = train_config.gradient_accumulation_steps
  grad_fn = jax.grad(functools.partial(loss_fn, model=model, z_loss=train_config.z_loss,
                                       remat=train_config.remat), has_aux=True)

  def gradient_fn(params, rng, batch):
    normalizer = jnp.maximum(jnp.sum(jnp.asarray(batch['target_mask'], jnp.float32)), 1.0)
    if accum == 1:
      return grad_fn(params, rng, batch, normalizer=normalizer)

    def micro_step(carry, inputs):
      index, micro_batch = inputs
      grads, sums = grad_fn(params, jax.random.fold_in(rng, index), micro_batch,
                            normalizer=normalizer)
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = (jax.tree.map(jnp.zeros_like, params),
             dict.fromkeys(SUMS, jnp.zeros([], jnp.float32)))
    (grads, sums), _ = jax.lax.scan(micro_step, zeros,
                                    (jnp.arange(accum), _micro_batches(batch, accum)))
    return grads, sums

  return gradient_fn


def make_train_step(model: FiDFunctions, optimizer: optax.GradientTransformation,
                    train_config: ml_collections.ConfigDict
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The pure train_step(state, batch) -> (state, metrics); jit it once (sharding.py does).

  Metrics (float32 scalars; is_finite bool): loss (cross-entropy + z-loss, per token),
  cross_entropy, z_loss, accuracy (token), num_tokens, grad_norm (global L2), learning_rate (of
  this update), is_finite (loss and gradient norm).
  """
  gradient_fn = make_gradient_fn(model, train_config)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    grads, sums = gradient_fn(state.params, jax.random.fold_in(state.rng, state.step), batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    normalizer = jnp.maximum(sums['num_tokens'], 1.0)
    loss = (sums['cross_entropy'] + sums['z_loss']) / normalizer
    grad_norm = optax.tree.norm(grads)
    metrics = dict(
        loss=loss,
        cross_entropy=sums['cross_entropy'] / normalizer,
        z_loss=sums['z_loss'] / normalizer,
        accuracy=sums['correct'] / normalizer,
        num_tokens=sums['num_tokens'],
        grad_norm=grad_norm,
        learning_rate=jnp.asarray(optim.get_learning_rate(opt_state), jnp.float32),
        is_finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    )
    return TrainState(params, opt_state, state.step + 1, state.rng), metrics

  return train_step


def init_train_state(model: FiDFunctions, optimizer: optax.GradientTransformation,
                     rng: jax.Array, example_batch: Batch) -> TrainState:
  """Fresh parameters (shapes from `example_batch`; its size does not matter), optimizer state,
  step 0, and a dropout key derived from `rng`."""
  params_rng, dropout_rng = jax.random.split(rng)
  params = model.init(params_rng, jnp.asarray(example_batch['passage_ids']),
                      jnp.asarray(example_batch['passage_mask']),
                      shift_right(jnp.asarray(example_batch['target_ids'])))
  return TrainState(params=params, opt_state=optimizer.init(params),
                    step=jnp.zeros([], jnp.int32), rng=dropout_rng)
