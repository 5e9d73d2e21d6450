"""A thin orbax `CheckpointManager` wrapper for fido training state.

A training state is any NamedTuple (or dict) with fields `params`, `opt_state` (may be None), and
further small fields such as `step` and `rng` (train.py's TrainState). One checkpoint step
directory holds these orbax items:

  params        StandardSave of the parameter pytree
  opt_state     StandardSave of the optax state (absent when state.opt_state is None)
  train         StandardSave of {every other field}: step, rng, ... Typed PRNG keys
                (jax.random.key) are stored as their uint32 key data plus the impl name.
  data_iterator JsonSave of the data-iterator state (a dict, or bytes from grain's get_state())
  config        JsonSave of the experiment ConfigDict (restored as a ConfigDict)
and, in orbax's step metadata (written when the step is finalised): metrics and our list of items.

Retention: the last `keep_last` steps, plus the `keep_best` steps with the best `best_metric`
(e.g. dev exact match, `best_mode='max'`). Saves are asynchronous: `save` returns once arrays are
copied off the device; `wait()`/`close()` (or leaving the `with` block) block until written.

Restoring into `abstract_state`, a pytree of jax.ShapeDtypeStruct (with `.sharding` to place
restored arrays on a mesh; `jax.eval_shape(init)` gives one), checks shapes first and raises
CheckpointMismatchError naming the first mismatching path. With `step=None` a latest step that
cannot be read -- killed during save (truncated/deleted files, a missing item, missing step
metadata) -- is skipped with a warning naming it and the error, falling back to older steps.
(An orbax save killed before finalisation leaves only a `*.orbax-checkpoint-tmp-*` directory,
which orbax never lists as a step.)
"""

import base64
import logging
import os
from typing import Any, Mapping, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from fido.config import ConfigError
from fido.errors import CheckpointError, UserError

_LOG = logging.getLogger(__name__)
_TREE_ITEMS = ('params', 'opt_state', 'train')
_JSON_ITEMS = ('data_iterator', 'config')
_BYTES_KEY = '__bytes_base64__'


class CheckpointMismatchError(UserError, ValueError):
  """The checkpoint cannot fill the requested target (shapes, missing item); not a corruption."""


class Restored(NamedTuple):
  step: int                                   # the checkpoint's step
  state: Any                                  # same type/structure as the requested target
  data_state: Mapping[str, Any] | bytes | None
  config: ml_collections.ConfigDict | None
  metrics: Mapping[str, float] | None


def _fields(state: Any) -> dict[str, Any]:
  fields = state._asdict() if hasattr(state, '_asdict') else dict(state)
  if 'params' not in fields:
    raise TypeError(f'state needs a params field; got fields {sorted(fields)}')
  return fields


def _rebuild(like: Any, fields: dict[str, Any]) -> Any:
  return like._replace(**fields) if hasattr(like, '_replace') else type(like)(fields)


def _is_typed_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key)


def _path_str(path) -> str:
  """keystr with NamedTuple fields written as dict keys, as orbax's metadata tree has them."""
  return ''.join(f'[{k.name!r}]' if isinstance(k, jax.tree_util.GetAttrKey) else
                 jax.tree_util.keystr((k,)) for k in path)


def _check_shapes(item: str, saved: Any, abstract: Any, step_dir: epath.Path) -> None:
  saved_shapes = {_path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    name = _path_str(path)
    if name not in saved_shapes:
      raise CheckpointMismatchError(f'{step_dir}: {item}{name} is not in the checkpoint')
    if saved_shapes[name] != tuple(leaf.shape):
      raise CheckpointMismatchError(
          f'{step_dir}: {item}{name} has shape {saved_shapes[name]} in the checkpoint but the '
          f'target expects {tuple(leaf.shape)}')


def _key_data_target(key: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The uint32 key-data target of a typed-key target, on the same sharding."""
  data = jax.eval_shape(jax.random.key_data, key)
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(key, 'sharding', None))


class Checkpointer:
  """Saves and restores training state under `directory` (one sub-directory per step)."""

  def __init__(self, directory: str | epath.Path, *, keep_last: int = 3, keep_best: int = 0,
               best_metric: str | None = None, best_mode: str = 'max', async_save: bool = True,
               read_only: bool = False):
    directory = os.fspath(directory)
    # orbax needs absolute paths; keep URLs (gs://...) as they are.
    self.directory = epath.Path(directory if '://' in directory else os.path.abspath(directory))
    if read_only and not self.directory.exists():
      raise CheckpointError(f'no checkpoint found under {self.directory} (no such directory)')
    if keep_best and not best_metric:
      raise ConfigError('keep_best > 0 needs best_metric (e.g. "dev_exact_match")')
    self.best_metric = best_metric
    best_fn = (lambda metrics: float(metrics[best_metric])) if best_metric else None
    keep = [policies.LatestN(n=keep_last)]
    if keep_best:
      keep.append(policies.BestN(get_metric_fn=best_fn, reverse=best_mode == 'min', n=keep_best,
                                 keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode, enable_async_checkpointing=async_save,
        preservation_policy=policies.AnyPreservationPolicy(keep), read_only=read_only)
    handlers = {**{k: ocp.StandardCheckpointHandler() for k in _TREE_ITEMS},
                **{k: ocp.JsonCheckpointHandler() for k in _JSON_ITEMS}}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  # --------------------------------------------------------------------------------------- save

  def save(self, step: int, state: Any, *, data_state: Mapping[str, Any] | bytes | None = None,
           config: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
           metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` as checkpoint `step`; returns whether it saves.

    orbax skips (returns False) a step <= the latest saved step: after a rollback, call
    `delete_after(step)` first. `metrics` is a flat dict of scalars (must include best_metric
    when one is set); `force` saves even where the save policy would not.
    """
    fields = _fields(state)
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
      if self.best_metric and self.best_metric not in metrics:
        raise ValueError(f'metrics {sorted(metrics)} lack best_metric {self.best_metric!r}')
    train, key_impls = {}, {}
    for name, value in fields.items():
      if name in ('params', 'opt_state') or value is None:
        continue
      if _is_typed_key(value):
        key_impls[name] = str(jax.random.key_impl(value))
        value = jax.random.key_data(value)
      train[name] = value
    items = {'params': ocp.args.StandardSave(fields['params']),
             'train': ocp.args.StandardSave(train)}
    if fields.get('opt_state') is not None:
      items['opt_state'] = ocp.args.StandardSave(fields['opt_state'])
    if data_state is not None:
      if isinstance(data_state, bytes):
        data_state = {_BYTES_KEY: base64.b64encode(data_state).decode('ascii')}
      items['data_iterator'] = ocp.args.JsonSave(dict(data_state))
    if config is not None:
      items['config'] = ocp.args.JsonSave(
          config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config))
    # Metrics also go into our metadata: orbax records them only when a best_fn is set.
    fido_meta = {'items': sorted(items), 'key_impls': key_impls, 'metrics': metrics}
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=force, custom_metadata={'fido': fido_meta})

  # ------------------------------------------------------------------------------------ restore

  def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
    """Restores a full training state (plus data state, config, metrics) shaped like the target.

    `abstract_state` has the training state's type; its `opt_state` may be None to skip it.
    `step=None` means the latest readable step (falls back past corrupt ones, with a warning).
    """
    fields = _fields(abstract_state)
    return self._restore(fields, step, like=abstract_state)

  def restore_params_only(self, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
    """(step, params): e.g. to initialise fine-tuning from a pre-training checkpoint."""
    restored = self._restore({'params': abstract_params}, step, like=None)
    return restored.step, restored.state['params']

  def restore_optimizer_state(self, abstract_opt_state: Any,
                              step: int | None = None) -> tuple[int, Any]:
    """(step, opt_state), e.g. the pre-training state for optim.carry_over_second_moments.

    The target must have the saving optimizer's structure, e.g.
    jax.eval_shape(optim.make_optimizer(saved_config.optimizer).init, params).
    """
    restored = self._restore({'opt_state': abstract_opt_state}, step, like=None)
    return restored.step, restored.state['opt_state']

  def _restore(self, fields: dict[str, Any], step: int | None, like: Any) -> Restored:
    self.wait()
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'no checkpoint found under {self.directory}')
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'no checkpoint for step {step} under {self.directory}; '
                              f'available steps: {sorted(steps)}')
      return self._restore_step(step, fields, like)
    errors = []
    for candidate in steps:
      try:
        return self._restore_step(candidate, fields, like)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except -- any unreadable step falls back
        _LOG.warning('checkpoint %s is unreadable (%s: %s); falling back to an older step',
                     self.directory / str(candidate), type(e).__name__, e)
        errors.append(f'step {candidate}: {type(e).__name__}: {e}')
    raise CheckpointError(f'no restorable checkpoint under {self.directory}:\n' + '\n'.join(errors))

  def _restore_step(self, step: int, fields: dict[str, Any], like: Any) -> Restored:
    step_dir = self.directory / str(step)
    step_metadata = self._manager.metadata(step)
    fido_meta = step_metadata.custom_metadata.get('fido')
    if fido_meta is None:
      raise CheckpointError(f'{step_dir} has no step metadata (save was not finalised)')
    saved = set(fido_meta['items'])
    missing = [item for item in saved if not (step_dir / item).exists()]
    if missing:
      raise CheckpointError(f'{step_dir} lacks saved items {missing}')
    if fields.get('opt_state') is not None and 'opt_state' not in saved:
      raise CheckpointMismatchError(
          f'{step_dir} holds no optimizer state (saved with opt_state=None)')

    trees = {k: v for k, v in fields.items() if k in ('params', 'opt_state') and v is not None}
    train_target = {}
    for name, value in fields.items():
      if name not in ('params', 'opt_state') and value is not None:
        train_target[name] = _key_data_target(value) if _is_typed_key(value) else value
    if train_target:
      trees['train'] = train_target
    item_metadata = self._manager.item_metadata(step)
    for item, target in trees.items():
      _check_shapes(item, item_metadata[item].tree, target, step_dir)

    args = {k: ocp.args.StandardRestore(v) for k, v in trees.items()}
    args.update({k: ocp.args.JsonRestore() for k in _JSON_ITEMS if k in saved and like is not None})
    out = self._manager.restore(step, args=ocp.args.Composite(**args))

    state = {k: out[k] for k in ('params', 'opt_state') if k in trees}
    for name, value in (out['train'] if 'train' in trees else {}).items():
      if _is_typed_key(fields[name]):  # saved as key data; the impl name is in our metadata
        impl = fido_meta['key_impls'].get(name, 'threefry2x32')
        value = jax.random.wrap_key_data(value, impl=impl)
      state[name] = value
    if like is None:
      return Restored(step, state, None, None, None)
    state = {name: state.get(name) for name in fields}
    data_state = out['data_iterator'] if 'data_iterator' in saved else None
    if data_state is not None and _BYTES_KEY in data_state:
      data_state = base64.b64decode(data_state[_BYTES_KEY])
    config = ml_collections.ConfigDict(out['config']) if 'config' in saved else None
    return Restored(step, _rebuild(like, state), data_state, config, fido_meta.get('metrics'))

  # ------------------------------------------------------------------------------- bookkeeping

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the best best_metric (the latest step if no best_metric is set)."""
    return self._manager.best_step()

  def delete_after(self, step: int) -> None:
    """Deletes every checkpoint newer than `step` (after a divergence rollback to `step`)."""
    self.wait()
    for newer in [s for s in self._manager.all_steps() if s > step]:
      self._manager.delete(newer)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
