"""Device mesh, parameter-path -> PartitionSpec rules, sharded train-state init and train step.

Mesh axes ('data', 'model'): the batch is split over 'data'; parameters are split over 'model'
(Megatron-style: query/wi_* by output columns -- heads, d_ff -- and output/wo by input rows) and
replicated over 'data'. The optimizer state mirrors the parameters.

FSDP (`config.sharding.fsdp=True`; ZeRO-3 / fully sharded data parallel): each parameter is also
split over 'data', along its largest dimension that the rules leave whole and that the data axis
divides (one that none divides stays replicated over 'data'), and so is its optimizer state.
Parameters and optimizer state per device shrink by the data axis size; GSPMD all-gathers each
parameter where it is used and reduce-scatters its gradient, so a step computes what the
replicated one does.

Rules are an ordered list of (regex, PartitionSpec) over Haiku parameter paths
"module/path/param_name", e.g. 'decoder/~/layer_01/~/cross_attention/query'. A rule matches a
parameter when its regex `re.search`es the path AND its spec has the parameter's rank
(PartitionSpec() means replicated and fits any rank): this is how multi-query key/value [D, E]
and grouped/multi-head key/value [D, K, E] (the layouts of fido.model.kv_heads) get different
rules. The first matching rule wins; a parameter that no rule matches is an error naming its
path -- never a silent replication.

Indivisible dimensions: a dimension whose size is not a multiple of its mesh axes' size is
replicated instead (logged as a warning naming the parameters), or, with strict=True, an error.
Replication is always correct and only costs memory, and it is what FiDO needs anyway for
grouped-query key/value heads (K) smaller than or coprime to the model axis; an error would make
e.g. T5-base's 12 heads unusable on an 8-way model axis. GSPMD could pad uneven shards instead, but
that silently wastes compute and memory on every step, so we never ask for it.

Sharded set-up (nanodo style):
  abstract = jax.eval_shape(init, rng, batch); shardings = train_state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng, batch)
  step = jax.jit(train_step, in_shardings=..., out_shardings=..., donate_argnames='state')
"""

import functools
import logging
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fido.config import ConfigError
from fido.model import kv_heads
from fido.model.fid import FiDFunctions
from fido.train_step import Batch, TrainState, init_train_state

_LOG = logging.getLogger(__name__)
DATA, MODEL = 'data', 'model'
Rules = Sequence[tuple[str, P]]

# Shapes: V vocab, D width, H heads, K kv heads, E d_kv, F d_ff, R relative-position buckets.
RULES: Rules = (
    (r'^(shared|encoder|decoder)_embedding/embeddings$', P(MODEL, None)),  # [V, D]: vocab
    (r'^output_projection/w$', P(None, MODEL)),                            # [D, V]: vocab
    (r'/relative_position_bias/embeddings$', P()),                         # [R, H]: tiny
    (r'_norm/scale$', P()),                                                # [D]
    (r'attention/query$', P(None, MODEL, None)),                           # [D, H, E]: heads
    (r'attention/output$', P(MODEL, None, None)),                          # [H, E, D]: heads
    # Key/value: kv_heads' layouts, rank-matched; MQ [D, E] replicated, GQA/MHA [D, K, E] by K.
    *((r'attention/(key|value)$', P(*(MODEL if a == 'kv_heads' else None for a in axes)))
      for axes in (kv_heads.MULTI_QUERY_AXES, kv_heads.GROUPED_AXES)),
    (r'mlp/wi_[01]$', P(None, MODEL)),                                     # [D, F]: d_ff
    (r'mlp/wo$', P(MODEL, None)),                                          # [F, D]: d_ff
)


def default_config() -> ml_collections.ConfigDict:
  """The `config.sharding` section."""
  return ml_collections.ConfigDict(dict(
      mesh=dict(data=-1, model=1),  # -1: all devices left after the model axis
      strict=False,                 # True: an indivisible parameter dimension is an error
      fsdp=False,                   # True: parameters and optimizer state also split over 'data'
      distributed=dict(             # multi-host; unset fields fall back to the environment
          enabled=False,            # True: initialise even with nothing set (JAX auto-detects
                                    # TPU pods, SLURM, ...)
          coordinator_address=ml_collections.config_dict.placeholder(str),  # 'host:port'
          num_processes=ml_collections.config_dict.placeholder(int),
          process_id=ml_collections.config_dict.placeholder(int),
      ),
  ))


# ----------------------------------------------------------------------------------------- mesh


MeshShape = Mapping[str, int] | ml_collections.ConfigDict | Sequence[int]


def mesh_shape(shape: MeshShape, num_devices: int) -> tuple[int, int]:
  """(data, model) from `config.sharding.mesh` (or a mapping) or a pair; data=-1 takes the rest."""
  if isinstance(shape, (Mapping, ml_collections.ConfigDict)):
    data, model = shape['data'], shape['model']
  else:
    data, model = tuple(shape)
  valid_data = isinstance(data, int) and (data >= 1 or data == -1)
  if not (isinstance(model, int) and model >= 1) or not valid_data:
    raise ConfigError(f'mesh shape (data={data}, model={model}) is invalid: model must be >= 1 and '
                      'data >= 1 or -1 (all remaining devices)')
  if data == -1:
    if num_devices % model:
      raise ConfigError(f'mesh shape (data=-1, model={model}) does not fit {num_devices} devices: '
                        f'{num_devices} is not divisible by model={model}')
    data = num_devices // model
  if data * model != num_devices:
    raise ConfigError(f'mesh shape (data={data}, model={model}) needs {data * model} devices but '
                      f'{num_devices} are available; use data=-1 or pass devices=')
  return data, model


def make_mesh(shape: MeshShape, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all), shaped by `shape` (see mesh_shape)."""
  devices = jax.devices() if devices is None else list(devices)
  dims = mesh_shape(shape, len(devices))
  return Mesh(mesh_utils.create_device_mesh(dims, devices), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --------------------------------------------------------------------------------- parameters


def path_str(path: Sequence[Any]) -> str:
  """A Haiku parameter's key path -> 'module/path/param_name'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _axis_size(entry: str | tuple[str, ...] | None, axis_sizes: Mapping[str, int]) -> int:
  names = (entry,) if isinstance(entry, str) else (entry or ())
  return int(np.prod([axis_sizes[n] for n in names]))


def spec_for(path: str, shape: Sequence[int], rules: Rules) -> P:
  """The spec of the first rule matching `path` at rank len(shape); ValueError if none does."""
  for regex, spec in rules:
    if re.search(regex, path) and (len(spec) == 0 or len(spec) == len(shape)):
      return spec
  matched = [regex for regex, _ in rules if re.search(regex, path)]
  detail = (f'rules {matched} match its path but none has rank {len(shape)}' if matched
            else 'no rule matches its path')
  raise ConfigError(f'no sharding rule for parameter {path} with shape {tuple(shape)}: {detail}. '
                    'Add a (regex, PartitionSpec) rule; unmatched parameters are never replicated '
                    'silently.')


def _with_data_axis(entries: list, shape: Sequence[int], data: int) -> list:
  """FSDP: the largest dimension of `shape` with no mesh axis that `data` divides gets 'data'."""
  free = [d for d, entry in enumerate(entries) if entry is None and shape[d] % data == 0]
  if data > 1 and free:
    entries[max(free, key=lambda d: shape[d])] = DATA
  return entries


def param_specs(params: Any, axis_sizes: Mapping[str, int], rules: Rules = RULES,
                strict: bool = False, fsdp: bool = False) -> Any:
  """PartitionSpecs (a tree like `params`, arrays or ShapeDtypeStructs) from `rules`, and with
  `fsdp` the data axis on each parameter's largest free dimension it divides.

  Dimensions not divisible by their mesh axes are replicated (one warning listing them), or
  raise with strict=True.
  """
  indivisible = []

  def one(path, leaf):
    name, shape = path_str(path), np.shape(leaf)
    spec = spec_for(name, shape, rules)
    entries = list(spec)
    for dim, entry in enumerate(entries):
      size = _axis_size(entry, axis_sizes)
      if size > 1 and shape[dim] % size:
        indivisible.append(f'{name} dim {dim} (size {shape[dim]}) over {entry!r} (size {size})')
        entries[dim] = None
    if fsdp:
      entries = _with_data_axis(entries, shape, axis_sizes.get(DATA, 1))
    return P(*entries)

  specs = jax.tree_util.tree_map_with_path(one, params)
  if indivisible:
    message = ('parameter dimensions not divisible by their mesh axes: ' + '; '.join(indivisible))
    if strict:
      raise ConfigError(message + ' (strict sharding)')
    _LOG.warning('%s; replicating those dimensions', message)
  return specs


def param_shardings(params: Any, mesh: Mesh, rules: Rules = RULES, strict: bool = False,
                    fsdp: bool = False) -> Any:
  """NamedShardings (a tree like `params`: arrays or jax.eval_shape output) from `rules`."""
  specs = param_specs(params, dict(mesh.shape), rules, strict, fsdp)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def mirror_params(opt_state: Any, params: Any, param_tree: Any, other: Any) -> Any:
  """Maps `opt_state`'s leaves: inside every sub-tree with the parameters' tree structure, a leaf
  with its parameter's shape gets that parameter's entry of `param_tree`; every other leaf
  (counts, hyperparameters, factored or placeholder moments) gets `other`.

  Optax states hold parameter-shaped sub-trees (Adam's mu/nu, Adafactor's unfactored v) next to
  scalars; matching tree structure and then shape covers every optax state without a list of
  state types. Factored Adafactor statistics (v_row/v_col) are vectors and end up replicated.
  """
  params_def = jax.tree.structure(params)

  def is_params_like(x):
    return x is not None and jax.tree.structure(x) == params_def

  def per_leaf(leaf, param, target):
    return target if np.shape(leaf) == np.shape(param) else other

  def per_subtree(x):
    if is_params_like(x):
      return jax.tree.map(per_leaf, x, params, param_tree)
    return other

  return jax.tree.map(per_subtree, opt_state, is_leaf=is_params_like)


def train_state_shardings(abstract_state: TrainState, mesh: Mesh, rules: Rules = RULES,
                          strict: bool = False, fsdp: bool = False) -> TrainState:
  """Shardings for a TrainState (e.g. jax.eval_shape of init): params by rules (and FSDP),
  optimizer state mirroring them, step and rng replicated."""
  params = param_shardings(abstract_state.params, mesh, rules, strict, fsdp)
  opt_state = mirror_params(abstract_state.opt_state, abstract_state.params, params,
                            replicated(mesh))
  return TrainState(params=params, opt_state=opt_state, step=replicated(mesh),
                    rng=replicated(mesh))


# -------------------------------------------------------------------------------------- batch


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Every batch array splits its leading (batch) axis over 'data'."""
  return NamedSharding(mesh, P(DATA))


def check_batch_size(batch_size: int, mesh: Mesh, gradient_accumulation_steps: int = 1) -> None:
  """ValueError unless each (micro-)batch splits evenly over the data axis."""
  data = mesh.shape[DATA]
  micro = batch_size // gradient_accumulation_steps
  if batch_size % gradient_accumulation_steps or micro % data:
    accum = (f' / gradient_accumulation_steps={gradient_accumulation_steps} = {micro}'
             if gradient_accumulation_steps > 1 else '')
    raise ConfigError(f'batch size {batch_size}{accum} is not divisible by the mesh data axis '
                      f'size {data} (mesh {dict(mesh.shape)})')


def make_global_batch(local_batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays sharded over 'data' from this process's rows (all rows in a single process).

  Every process passes its own [B / num_processes, ...] slice, in process order.
  """
  sharding = batch_sharding(mesh)
  sizes = {k: np.shape(v)[0] for k, v in local_batch.items()}
  if len(set(sizes.values())) != 1:
    raise ConfigError(f'batch arrays disagree on the batch size: {sizes}')
  check_batch_size(next(iter(sizes.values())) * jax.process_count(), mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ------------------------------------------------------------------------ sharded init and step


def abstract_train_state(model: FiDFunctions, optimizer: optax.GradientTransformation,
                         example_batch: Batch, mesh: Mesh, rules: Rules = RULES,
                         strict: bool = False, fsdp: bool = False) -> TrainState:
  """The train state's shapes, dtypes and shardings (jax.ShapeDtypeStructs), e.g. to restore into."""
  abstract = jax.eval_shape(functools.partial(init_train_state, model, optimizer),
                            jax.random.PRNGKey(0), example_batch)
  shardings = train_state_shardings(abstract, mesh, rules, strict, fsdp)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                      shardings)


def init_sharded_train_state(model: FiDFunctions, optimizer: optax.GradientTransformation,
                             rng: jax.Array, example_batch: Batch, mesh: Mesh,
                             rules: Rules = RULES, strict: bool = False, fsdp: bool = False
                             ) -> tuple[TrainState, TrainState]:
  """(state, its shardings): every array is created directly in its shards."""
  abstract = abstract_train_state(model, optimizer, example_batch, mesh, rules, strict, fsdp)
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  init = functools.partial(init_train_state, model, optimizer)
  return jax.jit(init, out_shardings=shardings)(rng, example_batch), shardings


def make_sharded_train_step(train_step: Callable, state_shardings: TrainState,
                            mesh: Mesh) -> Callable:
  """train_step jitted once: state in its shardings (donated), batch over 'data', metrics replicated.

  Call it positionally, step(state, batch), with a batch from make_global_batch.
  """
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnames='state')
