"""Compile time of the decode loop and the train step, from abstract shapes (no weights).

`compile_times(config)` builds config.model, takes its parameter and optimizer-state shapes with
`jax.eval_shape` (nothing is materialised, so paper sizes fit on any host) and times
`jax.jit(fn).lower(abstract args)` and `.compile()` for:
  decode      greedy decoding as evaluation runs it (`fido.decoding.make_decode_fn`: the encoder
              and a while_loop over cached decode steps) at the config.bench workload (its first
              batch size, n_passages x passage_len, target_len output tokens);
  train_step  `fido.train_step.make_train_step` (forward, backward with config.train.remat, the
              config.optimizer update) at config.train.batch_size and config.data's n_passages,
              passage_len and target_len.
Seconds are wall-clock on the default backend; XLA caches nothing between the two (distinct
programs), and jax's persistent compilation cache is off unless the caller turned it on.
"""

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from fido import optim
from fido import train_step as train_step_lib
from fido.decoding import make_decode_fn
from fido.model.fid import make_model


def _timed_compile(fn: Callable, *abstract_args) -> dict[str, float]:
  """Seconds to trace + lower and to compile `jax.jit(fn)` at these abstract arguments."""
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*abstract_args)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return dict(lower_s=round(lowered_at - start, 2), compile_s=round(done - lowered_at, 2),
              total_s=round(done - start, 2))


def _abstract_batch(batch: int, n_passages: int, passage_len: int, target_len: int
                    ) -> dict[str, jax.ShapeDtypeStruct]:
  """A train batch's shapes (fido.train_step.BATCH_KEYS)."""
  passages, targets = (batch, n_passages, passage_len), (batch, target_len)
  return dict(passage_ids=jax.ShapeDtypeStruct(passages, jnp.int32),
              passage_mask=jax.ShapeDtypeStruct(passages, jnp.bool_),
              target_ids=jax.ShapeDtypeStruct(targets, jnp.int32),
              target_mask=jax.ShapeDtypeStruct(targets, jnp.bool_))


def compile_times(config: ml_collections.ConfigDict, parts: tuple[str, ...] = ('decode', 'train_step')
                  ) -> dict[str, Any]:
  """{name, layers, decode: {lower_s, compile_s, total_s, workload}, train_step: {...}}."""
  model = make_model(config.model)
  result = dict(name=config.get('name', ''),
                layers=dict(encoder=config.model.encoder.num_layers,
                            decoder=config.model.decoder.num_layers),
                cross_attention_period=config.model.decoder.cross_attention_period,
                dtype=config.model.dtype, backend=jax.default_backend())
  key = jax.random.PRNGKey(0)
  if 'decode' in parts:
    bench = config.bench
    b = bench.batch_sizes[0]
    batch = _abstract_batch(b, bench.n_passages, bench.passage_len, bench.target_len)
    params = jax.eval_shape(model.init, key, batch['passage_ids'], batch['passage_mask'],
                            batch['target_ids'])
    decode = make_decode_fn(model, max_length=bench.target_len)
    result['decode'] = dict(
        _timed_compile(decode, params, batch['passage_ids'], batch['passage_mask']),
        workload=f'batch {b}, {bench.n_passages} x {bench.passage_len} tokens, '
                 f'{bench.target_len} steps')
  if 'train_step' in parts:
    data, train = config.data, config.train
    batch = _abstract_batch(train.batch_size, data.n_passages, data.passage_len, data.target_len)
    optimizer = optim.make_optimizer(config.optimizer)
    state = jax.eval_shape(
        lambda rng, example: train_step_lib.init_train_state(model, optimizer, rng, example),
        key, batch)
    step = train_step_lib.make_train_step(model, optimizer, train)
    result['train_step'] = dict(
        _timed_compile(step, state, batch),
        workload=f'batch {train.batch_size}, {data.n_passages} x {data.passage_len} tokens, '
                 f'{data.target_len} targets, remat={train.remat}, {config.optimizer.name}')
  return result


def format_row(result: dict[str, Any]) -> str:
  """A markdown table row: model, layers, decode and train-step seconds (lower + compile)."""
  cells = [result['name'], f"{result['layers']['encoder']} / {result['layers']['decoder']}"]
  for part in ('decode', 'train_step'):
    r = result.get(part)
    cells.append(f"{r['total_s']:.1f} ({r['lower_s']:.1f} + {r['compile_s']:.1f})" if r else '')
  return '| ' + ' | '.join(cells) + ' |'
