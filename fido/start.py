"""How a training run starts: one init hook per route, each a function of the fresh state.

fido.train builds a run's fresh sharded state and, when the workdir holds no checkpoint to resume,
hands it to the run's init hook:
  fresh                the random initialisation
  from_pretrained      config.init.checkpoint's params and second moments (FiDO appendix A)
  pooled_twin(dir)     the final state of the multi-head twin trained in `dir` (`multi_head_twin`),
                       key/value heads mean-pooled into config.model's (fido.model.kv_heads):
                       uptraining (FiDO §3.2; GQA, Ainslie et al., 2023)
"""

import logging
import os
from typing import Callable, NamedTuple

import jax
import ml_collections
import optax

from fido import checkpoint as checkpoint_lib
from fido import optim
from fido import sharding
from fido.config import ConfigError
from fido.data.stream import DataStream
from fido.model import kv_heads
from fido.model.fid import make_model
from fido.train_step import TrainState

_LOG = logging.getLogger(__name__)


class Start(NamedTuple):
  """What an init hook reads: the run's config (data resolved), its fresh sharded state, ..."""
  config: ml_collections.ConfigDict
  state: TrainState
  optimizer: optax.GradientTransformation
  stream: DataStream
  example: dict       # one host batch: the shapes of abstract train states
  mesh: jax.sharding.Mesh


Init = Callable[[Start], TrainState]


def abstract(tree):
  """Shapes, dtypes and shardings of a tree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def fresh(start: Start) -> TrainState:
  return start.state


def from_pretrained(start: Start) -> TrainState:
  return init_from_pretrained(start.config, start.state, start.optimizer)


def default_init(config: ml_collections.ConfigDict) -> Init:
  """config.init.checkpoint's state if it names one, else the random initialisation."""
  return from_pretrained if config.init.checkpoint else fresh


def init_from_pretrained(config: ml_collections.ConfigDict, state: TrainState, optimizer
                         ) -> TrainState:
  """Loads `config.init.checkpoint`'s params and, unless switched off, its second moments.

  FiDO appendix A: fine-tuning keeps the pre-training Adafactor second-moment estimates rather than
  re-estimating them from scratch (the first fine-tuning updates are then well scaled).
  """
  directory = config.init.checkpoint
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  source = checkpoint_lib.Checkpointer(directory, read_only=True)
  restored = source.restore({'params': abstract(state.params)})
  state = state._replace(params=restored.state['params'])
  if config.init.carry_second_moments:
    if restored.config is None or 'optimizer' not in restored.config:
      raise checkpoint_lib.CheckpointMismatchError(
          f'{directory}: step {restored.step} has no saved optimizer config, so its optimizer '
          'state cannot be read; set config.init.carry_second_moments=False')
    pre_optimizer = optim.make_optimizer(restored.config.optimizer)
    abstract_opt = jax.eval_shape(pre_optimizer.init, state.params)
    try:
      _, pre_opt_state = source.restore_optimizer_state(abstract_opt, restored.step)
    except checkpoint_lib.CheckpointMismatchError as e:
      raise checkpoint_lib.CheckpointMismatchError(
          f'{directory}: cannot carry second moments over: {e}') from e
    opt_state = optim.carry_over_second_moments(pre_opt_state, state.opt_state)
    state = state._replace(opt_state=jax.device_put(opt_state, jax.tree.map(
        lambda x: x.sharding, state.opt_state)))
  _LOG.info('initialised from %s step %d (second moments %s)', directory, restored.step,
            'carried over' if config.init.carry_second_moments else 'fresh')
  source.close()
  return state


def pooled_twin(twin_dir: str) -> Init:
  """The final state of the multi-head twin trained in `twin_dir`, its key/value heads
  mean-pooled into the shapes and shardings of the fresh state (params, second moments,
  momentum; step, rng, counters and learning-rate scale as they were); positions the stream where
  the twin's stopped."""
  def init(start: Start) -> TrainState:
    twin = multi_head_twin(start.config)
    abstract = sharding.abstract_train_state(
        make_model(twin.model), optim.make_optimizer(twin.optimizer), start.example, start.mesh,
        strict=start.config.sharding.strict, fsdp=start.config.sharding.get('fsdp', False))
    with checkpoint_lib.Checkpointer(os.path.join(twin_dir, 'checkpoints'),
                                     read_only=True) as source:
      restored = source.restore(abstract, step=twin.train.steps)
    start.stream.set_state(restored.step, restored.data_state)
    _LOG.info('step %d: mean-pooled the key/value heads of %s into config.model', restored.step,
              twin_dir)
    twin_state, state = restored.state, start.state
    return TrainState(params=kv_heads.pool_kv_heads(twin_state.params, state.params),
                      opt_state=kv_heads.pool_kv_heads(twin_state.opt_state, state.opt_state),
                      step=jax.device_put(twin_state.step, state.step.sharding),
                      rng=jax.device_put(twin_state.rng, state.rng.sharding))
  return init


# ------------------------------------------------------------- uptraining from multi-head attention


def multi_head_twin(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The run before uptraining: config.model with every attention multi-head, trained for
  config.train.mha_steps steps (with the same data, optimizer and seed), no final evaluation."""
  twin = ml_collections.ConfigDict(config.to_dict())
  twin.model = kv_heads.multi_head(config.model)
  twin.train.update(steps=config.train.mha_steps, mha_steps=0, final_eval_split='')
  return twin


def validate_mha_steps(config: ml_collections.ConfigDict) -> None:
  mha_steps, steps = config.train.mha_steps, config.train.steps
  if not isinstance(mha_steps, int) or not 0 <= mha_steps < steps:
    raise ConfigError(f'config.train.mha_steps={mha_steps!r} must be an int in [0, '
                      f'config.train.steps={steps}): the steps trained with multi-head attention '
                      'before uptraining into config.model (0 = off)')


def uptrains(config: ml_collections.ConfigDict) -> bool:
  """Whether the run starts as its multi-head twin: mha_steps > 0 and config.model has multi-query
  or grouped-query attention somewhere (for an all-multi-head model, mha_steps changes nothing)."""
  return bool(config.train.mha_steps) and kv_heads.multi_head(config.model) != config.model
