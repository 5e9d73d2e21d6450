"""The training loop: fine-tuning (QA) and pre-training (span corruption) with orbax checkpoints,
exact resume, periodic dev evaluation, and divergence rollback.

  run_train(config, workdir)   `run.py --mode=train`: checks the config, prepares the workdir and
                               runs `fit` from the config's init hook (fido.start), or `uptrain`
  fit(config, workdir, init)   one run: data, model, mesh, checkpoints; resumes the workdir's last
                               checkpoint or starts from `init`; trains; evaluates on the test split
  train(run, state)            the loop: steps from `state` to config.train.steps

`workdir` receives (fido.workdir):
  config.json       the run's config (a different config in the same workdir is refused)
  checkpoints/      orbax steps: params, optimizer state, step, rng, data-iterator state, config
  metrics.jsonl     one JSON line per logged step, per evaluation and per rollback
Resuming is implicit: an existing checkpoint is continued from, including the data iterator, so an
interrupted run ends bit-identical to an uninterrupted one.

Metrics are read one step late (as nanodo): step s + 1 is dispatched before step s's metrics are
fetched, so the host never waits for the device between steps. Before a step that checkpoints or
evaluates (and the last one) the loop reads that step's own metrics, so that only healthy states
are saved.

Divergence (paper §4.3 footnote: the authors restarted XL-XXL by hand with a lower learning rate):
a non-finite loss, or a loss above `spike_factor` x its running mean, restores the last checkpoint,
deletes newer ones, and continues with the learning rate cut by `lr_cut`; at most `max_rollbacks`
times.

Uptraining from multi-head attention (`config.train.mha_steps` = N > 0; a no-op for models without
multi-query or grouped-query attention): `uptrain` runs the model's multi-head twin (every
key/value head count = its query heads) for steps [0, N) in `workdir/multi_head/`, a run of its
own, then runs config.model in `workdir` from the twin's params and optimizer state mean-pooled
(fido.model.kv_heads), with the same data stream. This is how multi-query FiDO is made from
multi-head T5 (FiDO §3.2; GQA uptraining, Ainslie et al., 2023), here within one run. The data
stream and its curriculum are fido.data.stream's.
"""

import collections
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from fido import checkpoint as checkpoint_lib
from fido import evaluate
from fido import multihost
from fido import optim
from fido import sharding
from fido import start as start_lib
from fido import train_step as train_step_lib
from fido.config import ConfigError, decoder_weights
from fido.data import features
from fido.data.sources import resolve_data
from fido.data.stream import (DataStream, StageProgress, make_train_loader, read_fid_records,
                              read_train_data, validate_curriculum)
from fido.data.tokenizer import load_tokenizer
from fido.model.fid import FiDFunctions, make_model
from fido.workdir import MetricsWriter, prepare_workdir

_LOG = logging.getLogger(__name__)
TASKS = ('finetune', 'pretrain')
MULTI_HEAD_DIR = 'multi_head'
TrainState = train_step_lib.TrainState


def default_loop_config() -> ml_collections.ConfigDict:
  """The loop's fields of `config.train` (the step's are in train_step.default_config)."""
  return ml_collections.ConfigDict(dict(
      task='finetune', steps=1000, seed=0, log_every=50, eval_every=0, eval_examples=200,
      checkpoint_every=500, keep_checkpoints=2, keep_best=1, async_checkpoints=True,
      progress=True, final_eval_split='test',
      mha_steps=0,  # > 0: train the multi-head twin this long, then mean-pool into config.model
      divergence=dict(spike_factor=5.0, min_increase=1.0, window=50, patience=3, max_rollbacks=3,
                      lr_cut=0.1),
  ))


def default_init_config() -> ml_collections.ConfigDict:
  """`config.init`: start fine-tuning from a pre-training checkpoint (FiDO appendix A)."""
  return ml_collections.ConfigDict(dict(checkpoint='', carry_second_moments=True))


# ----------------------------------------------------------------------------------- divergence


class DivergenceMonitor:
  """Non-finite losses, and spikes: `patience` losses in a row above `spike_factor` x the mean of
  the `window` losses before them and at least `min_increase` (nats per token) above it.

  One hard batch is not a divergence: late in training a single batch can cost 5x the running mean
  (measured on the embedded FiD: 0.6 against a mean of 0.11), and after a rollback the restored
  data iterator replays that same batch, so a one-step criterion rolls back again and again
  whatever the learning rate. A diverging run stays high; spikes are kept out of the running mean.
  Near convergence a ratio alone misfires: three batches at 0.22 nats against a mean of 0.04 rolled
  embedded runs back (cutting their learning rate tenfold) and ended one that had no checkpoint.
  """

  def __init__(self, spike_factor: float, window: int, patience: int = 3,
               min_increase: float = 0.0):
    self.spike_factor, self.patience, self.min_increase = spike_factor, patience, min_increase
    self.recent = collections.deque(maxlen=window)
    self.streak = 0

  def diverged(self, loss: float, is_finite: bool) -> str | None:
    if not is_finite or not np.isfinite(loss):
      return f'non-finite loss {loss}'
    if len(self.recent) == self.recent.maxlen:
      mean = float(np.mean(self.recent))
      if loss > max(self.spike_factor * mean, mean + self.min_increase):
        self.streak += 1
        if self.streak >= self.patience:
          return (f'loss {loss:.4g} > {self.spike_factor} x running mean {mean:.4g} (and > mean '
                  f'+ {self.min_increase}) for {self.streak} steps in a row')
        return None
    self.streak = 0
    self.recent.append(loss)
    return None

  def reset(self) -> None:
    self.recent.clear()
    self.streak = 0


# ------------------------------------------------------------- uptraining from multi-head attention


def _has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return False
  with checkpoint_lib.Checkpointer(directory, read_only=True) as ckpt:
    return ckpt.latest_step() is not None


def uptrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or finds finished) the multi-head twin of `config` in workdir/multi_head,
  then `config` in `workdir` from the twin's pooled final state. A workdir with a checkpoint of
  its own is past the twin: it resumes."""
  start_time = time.perf_counter()
  twin_dir = os.path.join(workdir, MULTI_HEAD_DIR)
  if not _has_checkpoint(workdir):
    twin = start_lib.multi_head_twin(config)
    prepare_workdir(twin, twin_dir, overwrite=False)
    fit(twin, twin_dir, start_lib.default_init(twin))
  result = fit(config, workdir, start_lib.pooled_twin(twin_dir))
  result['mha_steps'] = config.train.mha_steps
  if 'train_seconds' in result:  # the twin's training included
    result['train_seconds'] = round(time.perf_counter() - start_time, 1)
  return result


# ------------------------------------------------------------------------------------------ run


def run_train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
              ) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final metrics."""
  multihost.maybe_initialize_distributed(config.sharding.distributed)
  if config.train.task not in TASKS:
    raise ConfigError(f'config.train.task={config.train.task!r}; expected one of {TASKS}')
  train_step_lib.validate_train_config(config.train)
  if decoder_weights(config.model) != 'float32':
    raise ConfigError(f'config.model.decoder_weights={decoder_weights(config.model)!r}: training '
                      'keeps float32 weights; bfloat16 or int8 decoder weights are for inference '
                      '(--mode=eval, --mode=bench), made from the float32 checkpoint')
  validate_curriculum(config)
  start_lib.validate_mha_steps(config)
  prepare_workdir(config, workdir, overwrite)
  if start_lib.uptrains(config):
    return uptrain(config, workdir)
  return fit(config, workdir, start_lib.default_init(config))


class Run(NamedTuple):
  """A run as `fit` sets it up for the loop."""
  config: ml_collections.ConfigDict   # data resolved
  model: FiDFunctions
  mesh: jax.sharding.Mesh
  stream: DataStream
  dev_eval: Callable[[Any], dict[str, float]] | None  # params -> dev metrics; None: no dev eval
  ckpt: checkpoint_lib.Checkpointer
  writer: MetricsWriter
  step_fn: Callable


def compile_step(model: FiDFunctions, optimizer: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, state_shardings, mesh) -> Callable:
  """The jitted, sharded, donated step (state, batch) -> (state, metrics); tests wrap it."""
  return sharding.make_sharded_train_step(
      train_step_lib.make_train_step(model, optimizer, config.train), state_shardings, mesh)


def _host_batch(batch: dict) -> dict:
  return {k: batch[k] for k in train_step_lib.BATCH_KEYS}


def evaluate_on(config, model, params, tokenizer, records) -> dict[str, float]:
  metrics, _ = evaluate.evaluate_records(
      model, params, records, tokenizer, n_passages=config.data.n_passages,
      passage_len=config.data.passage_len, target_len=config.data.target_len,
      batch_size=config.eval.batch_size, beam_size=config.eval.beam_size, alpha=config.eval.alpha,
      progress=False)
  return metrics


def fit(config: ml_collections.ConfigDict, workdir: str, init: start_lib.Init) -> dict[str, Any]:
  """Trains `config` in the prepared `workdir` from its last checkpoint, or else from `init`;
  evaluates the result on config.train.final_eval_split; returns the final metrics."""
  start_time = time.perf_counter()
  config = ml_collections.ConfigDict(config.to_dict())
  config.data = resolve_data(config.data)
  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'the tokenizer {config.data.tokenizer} needs vocab_size '
                      f'{tokenizer.vocab_size} > config.model.vocab_size={config.model.vocab_size}')
  model, optimizer = make_model(config.model), optim.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  sharding.check_batch_size(config.train.batch_size, mesh, config.train.gradient_accumulation_steps)

  reports = {}
  stream = DataStream(config, tokenizer, read_train_data(config, reports))
  finetune = config.train.task == 'finetune'
  dev_records = (read_fid_records(config, 'dev', config.train.eval_examples, reports)
                 if finetune and config.train.eval_every else [])
  final_split = config.train.final_eval_split if finetune else ''
  final_records = read_fid_records(config, final_split, reports=reports) if final_split else []
  for records in (dev_records, final_records) if config.data.source != 'tfds' else ():
    features.check_records_fit(tokenizer, records, config.data.n_passages, config.data.passage_len)
  if reports and jax.process_index() == 0:
    with open(os.path.join(workdir, 'data_report.json'), 'w') as f:
      json.dump(reports, f, indent=1)
  example = _host_batch(next(iter(make_train_loader(config, tokenizer, stream.examples))))
  state, state_shardings = sharding.init_sharded_train_state(
      model, optimizer, jax.random.PRNGKey(config.train.seed), example, mesh,
      strict=config.sharding.strict, fsdp=config.sharding.get('fsdp', False))
  keep_best = config.train.keep_best if dev_records else 0
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep_last=config.train.keep_checkpoints,
      keep_best=keep_best, best_metric='dev_exact_match' if keep_best else None,
      async_save=config.train.async_checkpoints)
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(start_lib.abstract(state))
    state = restored.state
    stream.set_state(restored.step, restored.data_state)
    _LOG.info('resumed from %s step %d', ckpt.directory, restored.step)
  else:
    state = init(start_lib.Start(config, state, optimizer, stream, example, mesh))
    if int(state.step):  # a start past step 0 (uptraining): rollbacks and resumes start from it
      ckpt.save(int(state.step), state, data_state=stream.get_state(), config=config, force=True)

  dev_eval = ((lambda params: evaluate_on(config, model, params, tokenizer, dev_records))
              if dev_records else None)
  run = Run(config, model, mesh, stream, dev_eval, ckpt, MetricsWriter(workdir),
            compile_step(model, optimizer, config, state_shardings, mesh))
  first_step = int(state.step)
  state, rollbacks = train(run, state)
  stream.close()
  ckpt.wait()
  ckpt.close()
  step = int(state.step)
  result = dict(workdir=workdir, step=step, task=config.train.task, rollbacks=rollbacks)
  if step > first_step:
    result['train_seconds'] = round(time.perf_counter() - start_time, 1)
  else:
    result['already_trained'] = True  # a finished run, run again: nothing was trained
  if final_split:
    test_metrics = run.writer.find(step=step, event=f'{final_split}_eval')
    if test_metrics is None:
      eval_start = time.perf_counter()
      test_metrics = evaluate_on(config, model, state.params, tokenizer, final_records)
      run.writer.write(step=step, event=f'{final_split}_eval', **test_metrics)
      result[f'{final_split}_seconds'] = round(time.perf_counter() - eval_start, 1)
    result.update({f'{final_split}_{k}': v for k, v in test_metrics.items()})
  return result


# ----------------------------------------------------------------------------------------- loop


class Dispatched(NamedTuple):
  """A step whose metrics are still on the device."""
  step: int            # steps done after it
  metrics: dict
  n_passages: int      # passages per example of its batch
  new_stage: bool      # its batch began a curriculum stage


def read_metrics(dispatched: Dispatched) -> dict[str, Any]:
  """The host copy of a dispatched step's metrics (waits for that step, not later ones)."""
  return jax.device_get(dispatched.metrics)


def rollback(run: Run, state: TrainState, step: int, reason: str, rollbacks: int) -> TrainState:
  """The last checkpoint's state with the learning rate cut by lr_cut, after the metrics of step
  `step` showed `reason` (the `rollbacks`-th time); newer checkpoints are deleted and the stream
  rewound. Raises FloatingPointError past max_rollbacks or before the first checkpoint."""
  divergence = run.config.train.divergence
  if rollbacks > divergence.max_rollbacks:
    raise FloatingPointError(f'training diverged at step {step} ({reason}) after '
                             f'{rollbacks - 1} rollbacks; giving up')
  run.ckpt.wait()
  if run.ckpt.latest_step() is None:
    raise FloatingPointError(f'training diverged at step {step} ({reason}) before the '
                             'first checkpoint; nothing to roll back to')
  restored = run.ckpt.restore(start_lib.abstract(state))
  run.ckpt.delete_after(restored.step)
  lr_scale = optim.get_lr_scale(state.opt_state) * divergence.lr_cut
  state = restored.state._replace(opt_state=optim.scale_learning_rate(
      restored.state.opt_state, lr_scale / optim.get_lr_scale(restored.state.opt_state)))
  run.stream.set_state(restored.step, restored.data_state)
  _LOG.warning('step %d: %s; rolled back to step %d, learning rate x%g', step, reason,
               restored.step, lr_scale)
  run.writer.write(step=step, event='rollback', reason=reason, to_step=restored.step,
                   lr_scale=lr_scale)
  return state


def _evaluate_and_save(run: Run, state: TrainState, step: int, bar: StageProgress) -> None:
  train_config, dev_metrics = run.config.train, None
  if run.dev_eval and (step % train_config.eval_every == 0 or step == train_config.steps):
    dev_metrics = run.dev_eval(state.params)
    run.writer.write(step=step, event='dev_eval', **dev_metrics)
    bar.write(f'step {step}: dev exact match {dev_metrics["exact_match"]:.3f}')
  if step % train_config.checkpoint_every == 0 or step == train_config.steps:
    run.ckpt.save(step, state, data_state=run.stream.get_state(), config=run.config,
                  metrics={'dev_exact_match': dev_metrics['exact_match']} if dev_metrics else None,
                  force=True)


def train(run: Run, state: TrainState) -> tuple[TrainState, int]:
  """Trains from `state` to config.train.steps; returns the final state and the rollback count."""
  config = run.config.train
  monitor = DivergenceMonitor(config.divergence.spike_factor, config.divergence.window,
                              config.divergence.patience, config.divergence.min_increase)
  step, rollbacks, pending = int(state.step), 0, None
  bar = StageProgress(run.config, step)
  window_start, window_steps, tokens = time.perf_counter(), 0, 0.0
  while step < config.steps:
    stage = run.stream.current_stage
    host_batch = _host_batch(run.stream.next(step))
    state, metrics = run.step_fn(state, sharding.make_global_batch(host_batch, run.mesh))
    step += 1
    bar.update(step)
    dispatched = Dispatched(step, metrics, host_batch['passage_ids'].shape[1],
                            run.stream.current_stage != stage)
    syncs = (step % config.checkpoint_every == 0 or step == config.steps
             or (run.dev_eval is not None and step % config.eval_every == 0))
    ready = [d for d in (pending, dispatched if syncs else None) if d is not None]
    pending = None if syncs else dispatched
    for done in ready:  # the previous step's (this one was dispatched first), then a syncing one
      values = read_metrics(done)
      if done.new_stage:
        monitor.reset()  # more passages per example: a higher loss is expected, not a divergence
      reason = monitor.diverged(float(values['loss']), bool(values['is_finite']))
      if reason:
        rollbacks += 1
        state = rollback(run, state, done.step, reason, rollbacks)
        step, pending = int(state.step), None
        monitor.reset()
        bar.goto(step)
        break
      window_steps += 1
      tokens += float(values['num_tokens'])
      if done.step % config.log_every == 0 or done.step == config.steps:
        seconds = time.perf_counter() - window_start
        record = {k: float(v) for k, v in values.items() if k != 'is_finite'}
        record.update(step=done.step, n_passages=done.n_passages,
                      examples_per_second=window_steps * config.batch_size / seconds,
                      target_tokens_per_second=tokens / seconds)
        run.writer.write(**record)
        bar.set_postfix(loss=f'{record["loss"]:.3f}', ex_s=f'{record["examples_per_second"]:.1f}')
        window_start, window_steps, tokens = time.perf_counter(), 0, 0.0
    else:  # no rollback
      if syncs:
        _evaluate_and_save(run, state, step, bar)
  bar.close()
  return state, rollbacks
