"""The training loop: fine-tuning (QA) and pre-training (span corruption) with orbax checkpoints,
exact resume, periodic dev evaluation, and divergence rollback.

`train(config, workdir)` writes into `workdir`:
  config.json       the run's config (a different config in the same workdir is refused)
  checkpoints/      orbax steps: params, optimizer state, step, rng, data-iterator state, config
  metrics.jsonl     one JSON line per logged step, per evaluation and per rollback
and returns the final metrics. Resuming is implicit: an existing checkpoint is continued from,
including the data iterator, so an interrupted run ends bit-identical to an uninterrupted one.

Divergence (paper §4.3 footnote: the authors restarted XL-XXL by hand with a lower learning rate):
a non-finite loss, or a loss above `spike_factor` x its running mean, restores the last checkpoint
(only healthy states are ever saved), deletes newer ones, and continues with the learning rate cut
by `lr_cut`; at most `max_rollbacks` times.

Uptraining from multi-head attention (`config.train.mha_steps` = N > 0; a no-op for models without
multi-query or grouped-query attention): steps [0, N) train the model's multi-head twin (every
key/value head count = its query heads) in `workdir/multi_head/`, a run of its own; at step N its
params and optimizer state are mean-pooled into config.model's key/value heads (fido.model.kv_heads)
and the run continues in `workdir` with the same data stream. This is how multi-query FiDO is made
from multi-head T5 (FiDO §3.2; GQA uptraining, Ainslie et al., 2023), here within one run.
"""

import collections
import concurrent.futures
import json
import logging
import os
import shutil
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from fido import checkpoint as checkpoint_lib
from fido import evaluate
from fido import optim
from fido import sharding
from fido import train_step as train_step_lib
from fido.config import ConfigError
from fido.data import features, fid_format, pipeline
from fido.data.errors import DataError
from fido.data.sources import resolve_data
from fido.data.tokenizer import Tokenizer, load_tokenizer
from fido.errors import MissingInputError, WorkdirError
from fido.model import kv_heads
from fido.model.fid import make_model

_LOG = logging.getLogger(__name__)
TASKS = ('finetune', 'pretrain')


def default_loop_config() -> ml_collections.ConfigDict:
  """The loop's fields of `config.train` (the step's are in train_step.default_config)."""
  return ml_collections.ConfigDict(dict(
      task='finetune', steps=1000, seed=0, log_every=50, eval_every=0, eval_examples=200,
      checkpoint_every=500, keep_checkpoints=2, keep_best=1, async_checkpoints=True,
      progress=True, final_eval_split='test',
      mha_steps=0,  # > 0: train the multi-head twin this long, then mean-pool into config.model
      divergence=dict(spike_factor=5.0, window=50, patience=3, max_rollbacks=3, lr_cut=0.1),
      debug_nan_at_step=-1,  # fault injection for tests: poison the parameters at this step
      debug_step_delay=0.0,  # seconds to sleep per step (tests kill a run mid-way)
  ))


def default_init_config() -> ml_collections.ConfigDict:
  """`config.init`: start fine-tuning from a pre-training checkpoint (FiDO appendix A)."""
  return ml_collections.ConfigDict(dict(checkpoint='', carry_second_moments=True))


# ----------------------------------------------------------------------------------------- data


def validate_curriculum(config: ml_collections.ConfigDict) -> None:
  """config.data.curriculum: one step count per stage, all positive ints; fine-tuning only."""
  cur = config.data.curriculum
  n_passages, steps = tuple(cur.n_passages), tuple(cur.steps)
  if len(n_passages) != len(steps):
    raise ConfigError(f'config.data.curriculum: n_passages={n_passages} and steps={steps} must '
                      'have one entry per stage')
  if not steps:
    return
  if config.train.task != 'finetune':
    raise ConfigError(f'config.data.curriculum is for fine-tuning; config.train.task='
                      f'{config.train.task!r}')
  for field, values in (('n_passages', n_passages), ('steps', steps)):
    if any(not isinstance(v, int) or v < 1 for v in values):
      raise ConfigError(f'config.data.curriculum.{field}={values}: every entry must be an int >= 1')
  if sum(steps) >= config.train.steps:
    _LOG.warning('config.data.curriculum.steps=%s add up to %d >= config.train.steps=%d: this '
                 'run ends before training on config.data.n_passages=%d passages', steps,
                 sum(steps), config.train.steps, config.data.n_passages)


def data_stage(config: ml_collections.ConfigDict, step: int) -> int:
  """The curriculum stage that feeds training step `step` (0-based); len(stages) = the last one."""
  return int(np.searchsorted(np.cumsum(config.data.curriculum.steps), step, side='right'))


def stage_plan(config: ml_collections.ConfigDict) -> list[tuple[int, int, str]]:
  """(first step, end step, label) of each stage of the run: the curriculum's, then the rest."""
  ends = [int(e) for e in np.cumsum(config.data.curriculum.steps)] + [config.train.steps]
  passages = list(config.data.curriculum.n_passages) + [config.data.n_passages]
  plan, start = [], 0
  for end, n in zip(ends, passages):
    end = min(end, config.train.steps)
    if end > start:
      what = f'{n} passage{"s" * (n != 1)}' if config.train.task == 'finetune' else 'pre-training'
      plan.append((start, end, what))
    start = max(start, end)
  return plan


class StageProgress:
  """One tqdm bar per stage of `stage_plan`, so that each bar's rate and ETA describe steps of
  one cost (a 10-passage step costs several 1-passage ones); `update(step)` after each step."""

  def __init__(self, config: ml_collections.ConfigDict, step: int, file=None):
    self.plan, self.disable, self.file = stage_plan(config), not config.train.progress, file
    self.bar, self.stage = None, None
    self.goto(step)

  def goto(self, step: int) -> None:
    """Shows the stage that trains step `step` (0-based), `step` minus its start steps done."""
    stage = next((i for i, (_, end, _) in enumerate(self.plan) if step < end), len(self.plan) - 1)
    start, end, what = self.plan[stage]
    if self.bar is not None:
      self.bar.close()
    self.stage = stage
    self.bar = tqdm.tqdm(total=end - start, initial=min(step, end) - start, unit='step',
                         desc=f'stage {stage + 1}/{len(self.plan)} ({what})', file=self.file,
                         disable=self.disable, dynamic_ncols=True)

  def update(self, step: int) -> None:
    """Counts the step that made `step` steps done; moves on to the next stage's bar at its start."""
    self.bar.update(1)
    if step == self.plan[self.stage][1] and self.stage + 1 < len(self.plan):
      self.goto(step)

  def set_postfix(self, **values) -> None:
    self.bar.set_postfix(**values)

  def write(self, message: str) -> None:
    self.bar.write(message, file=self.file)

  def close(self) -> None:
    self.bar.close()


def read_fid_records(config: ml_collections.ConfigDict, split: str, limit: int = 0,
                     reports: dict[str, Any] | None = None) -> list[dict]:
  """The normalized records of `config.data[split]` (the first `limit`; all when 0).

  Bad records raise DataError, or with `config.data.on_error='skip'` are counted by reason: the
  count is logged and, when `reports` is given, stored there under the split's name.
  """
  path = config.data[split]
  records, report = fid_format.read_fid_file(path, n_passages=config.data.n_passages,
                                             on_error=config.data.get('on_error', 'raise'))
  _LOG.info('%s data: %s', split, report.summary())
  if reports is not None:
    reports[split] = dict(path=path, read=report.read, kept=report.kept,
                          skipped=dict(report.skipped), warnings=dict(report.warnings))
  return records[:limit] if limit else records


def read_train_data(config: ml_collections.ConfigDict,
                    reports: dict[str, Any] | None = None) -> list:
  """Fine-tuning: the normalized FiD records; pre-training: the corpus documents.

  Raises DataError when there are fewer than one batch (config.train.batch_size) of them.
  """
  data = config.data
  if config.train.task == 'finetune':
    records, source = read_fid_records(config, 'train', reports=reports), data.train
  else:
    if not data.corpus or not os.path.isfile(data.corpus):
      raise MissingInputError(f'config.data.corpus={data.corpus!r}: pre-training needs a text '
                              'corpus (one document per line)')
    with open(data.corpus, encoding='utf-8') as f:
      records, source = [line.strip() for line in f if line.strip()], data.corpus
  if len(records) < config.train.batch_size:
    raise DataError(f'{source}: {len(records)} usable records cannot fill one batch of '
                    f'config.train.batch_size={config.train.batch_size}')
  return records


def make_train_loader(config: ml_collections.ConfigDict, tokenizer: Tokenizer, examples: list,
                      stage: int = 0):
  """The training loader of curriculum stage `stage` over read_train_data's `examples`."""
  data, train = config.data, config.train
  per_process = train.batch_size // jax.process_count()
  if train.task == 'finetune':
    cur = data.curriculum
    warmup = stage < len(cur.steps)
    return pipeline.qa_train_loader(
        examples, tokenizer, batch_size=per_process,
        n_passages=cur.n_passages[stage] if warmup else data.n_passages,
        passage_len=data.passage_len, target_len=data.target_len, seed=train.seed + stage,
        answer_choice=data.answer_choice, answer_first=warmup and cur.answer_first)
  return pipeline.span_corruption_loader(
      examples, tokenizer, batch_size=per_process, seed=train.seed,
      inputs_length=data.inputs_length, qa_shaped=True)


class DataStream:
  """Training batches across curriculum stages; get_state/set_state resume exactly at any step.

  The batch of step s + 1 is prepared in a background thread while step s trains (tokenization
  is Python; the train step releases the GIL). Each batch comes with the iterator state after it,
  so get_state() is the state after the last batch handed out, whatever was prefetched since.
  A checkpoint after `step` steps stores the iterator of the stage that fed step `step - 1`; if
  step `step` starts a new stage, resuming starts that stage's loader afresh.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, examples: list):
    self.config, self.tokenizer, self.examples = config, tokenizer, examples
    self.stage, self.iterator, self.state = None, None, None
    self.current_stage = None  # the stage of the last batch handed out
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending = None  # (step, future of (stage, batch, state after it))

  def _start(self, stage: int) -> None:
    self.stage = stage
    self.iterator = iter(make_train_loader(self.config, self.tokenizer, self.examples, stage))

  def _fetch(self, step: int) -> tuple[int, dict, Any]:
    stage = data_stage(self.config, step)
    if stage != self.stage:
      self._start(stage)
    batch = next(self.iterator)
    return stage, batch, self.iterator.get_state()

  def _drain(self) -> None:
    if self._pending is not None:
      self._pending[1].result()
      self._pending = None

  def next(self, step: int) -> dict:
    """The batch of training step `step` (0-based); starts preparing step `step + 1`'s."""
    if self._pending is not None and self._pending[0] == step:
      result = self._pending[1].result()
      self._pending = None
    else:
      self._drain()
      result = self._fetch(step)
    stage, batch, self.state = result
    self.current_stage = stage
    self._pending = (step + 1, self._executor.submit(self._fetch, step + 1))
    return batch

  def get_state(self):
    return self.state

  def set_state(self, step: int, state) -> None:
    """Positions the stream after `step` steps, from the state saved at that step."""
    self._drain()
    self._start(data_stage(self.config, max(step - 1, 0)))
    if state is not None:
      self.iterator.set_state(state)
    self.state = self.iterator.get_state()
    self.current_stage = self.stage

  def close(self) -> None:
    self._drain()
    self._executor.shutdown()


# ---------------------------------------------------------------------------------- bookkeeping


def _comparable(config: ml_collections.ConfigDict) -> dict:
  """The parts of a config that define a run (not its length, logging or evaluation)."""
  d = config.to_dict()
  for section, fields in (('train', ('steps', 'log_every', 'eval_every', 'eval_examples',
                                     'progress', 'checkpoint_every', 'debug_nan_at_step',
                                     'debug_step_delay')),
                          ('eval', None), ('bench', None)):
    if fields is None:
      d.pop(section, None)
    else:
      for field in fields:
        d.get(section, {}).pop(field, None)
  return json.loads(json.dumps(d, default=str))


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  """Refuses to mix two different runs in one workdir; `overwrite` wipes it (a fresh start).

  Only a workdir holding a run's config.json is ever wiped (never, say, a mistyped `--workdir=.`).
  """
  path = os.path.join(workdir, 'config.json')
  if overwrite and os.path.exists(path):
    shutil.rmtree(workdir)
  elif os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != _comparable(config):
      changed = sorted(k for k in set(previous) | set(_comparable(config))
                       if previous.get(k) != _comparable(config).get(k))
      raise WorkdirError(f'workdir {workdir!r} holds a different run (config sections differ: '
                         f'{changed}); use another --workdir or pass --overwrite to replace it')
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(_comparable(config), f, indent=1, sort_keys=True)


class MetricsWriter:
  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, **record: Any) -> None:
    if jax.process_index() == 0:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record, default=float) + '\n')

  def find(self, step: int, event: str) -> dict[str, Any] | None:
    """The fields (less step and event) of the last record of `event` at `step`, if any."""
    found = None
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          record = json.loads(line)
          if record.get('step') == step and record.get('event') == event:
            found = {k: v for k, v in record.items() if k not in ('step', 'event')}
    return found


class DivergenceMonitor:
  """Non-finite losses, and spikes: `patience` losses in a row above `spike_factor` x the mean of
  the `window` losses before them.

  One hard batch is not a divergence: late in training a single batch can cost 5x the running mean
  (measured on the embedded FiD: 0.6 against a mean of 0.11), and after a rollback the restored
  data iterator replays that same batch, so a one-step criterion rolls back again and again
  whatever the learning rate. A diverging run stays high; spikes are kept out of the running mean.
  """

  def __init__(self, spike_factor: float, window: int, patience: int = 3):
    self.spike_factor, self.patience = spike_factor, patience
    self.recent = collections.deque(maxlen=window)
    self.streak = 0

  def diverged(self, loss: float, is_finite: bool) -> str | None:
    if not is_finite or not np.isfinite(loss):
      return f'non-finite loss {loss}'
    if len(self.recent) == self.recent.maxlen:
      mean = float(np.mean(self.recent))
      if loss > self.spike_factor * mean:
        self.streak += 1
        if self.streak >= self.patience:
          return (f'loss {loss:.4g} > {self.spike_factor} x running mean {mean:.4g} for '
                  f'{self.streak} steps in a row')
        return None
    self.streak = 0
    self.recent.append(loss)
    return None

  def reset(self) -> None:
    self.recent.clear()
    self.streak = 0


# -------------------------------------------------------------------------------- initialisation


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def init_from_pretrained(config: ml_collections.ConfigDict, state: train_step_lib.TrainState,
                         optimizer) -> train_step_lib.TrainState:
  """Loads `config.init.checkpoint`'s params and, unless switched off, its second moments.

  FiDO appendix A: fine-tuning keeps the pre-training Adafactor second-moment estimates rather than
  re-estimating them from scratch (the first fine-tuning updates are then well scaled).
  """
  directory = config.init.checkpoint
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  source = checkpoint_lib.Checkpointer(directory, read_only=True)
  restored = source.restore({'params': _abstract(state.params)})
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


# ------------------------------------------------------------- uptraining from multi-head attention

MULTI_HEAD_DIR = 'multi_head'


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


def train_then_pool_multi_head(config: ml_collections.ConfigDict, workdir: str,
                               state: train_step_lib.TrainState, stream: DataStream, example: dict,
                               mesh) -> train_step_lib.TrainState:
  """Trains (or resumes, or finds finished) the multi-head twin of `config` (as the user gave it,
  so that the twin's workdir always holds the same config) in `workdir/multi_head`, then
  returns its final state with key/value heads mean-pooled into the shapes and shardings of `state`
  (params, second moments, momentum; step, rng, counters and learning-rate scale as they were) and
  positions `stream` where the twin's data stream stopped."""
  twin = multi_head_twin(config)
  twin_dir = os.path.join(workdir, MULTI_HEAD_DIR)
  train(twin, twin_dir)
  abstract = sharding.abstract_train_state(
      make_model(twin.model), optim.make_optimizer(twin.optimizer), example, mesh,
      strict=config.sharding.strict)
  with checkpoint_lib.Checkpointer(os.path.join(twin_dir, 'checkpoints'), read_only=True) as source:
    restored = source.restore(abstract, step=twin.train.steps)
  stream.set_state(restored.step, restored.data_state)
  twin_state = restored.state
  _LOG.info('step %d: mean-pooled the key/value heads of %s into config.model', restored.step,
            twin_dir)
  return train_step_lib.TrainState(
      params=kv_heads.pool_kv_heads(twin_state.params, state.params),
      opt_state=kv_heads.pool_kv_heads(twin_state.opt_state, state.opt_state),
      step=jax.device_put(twin_state.step, state.step.sharding),
      rng=jax.device_put(twin_state.rng, state.rng.sharding))


# ---------------------------------------------------------------------------------------- loop


def _host_batch(batch: dict) -> dict:
  return {k: batch[k] for k in train_step_lib.BATCH_KEYS}


def dev_eval(config, model, params, tokenizer, records) -> dict[str, float]:
  metrics, _ = evaluate.evaluate_records(
      model, params, records, tokenizer, n_passages=config.data.n_passages,
      passage_len=config.data.passage_len, target_len=config.data.target_len,
      batch_size=config.eval.batch_size, beam_size=config.eval.beam_size, alpha=config.eval.alpha,
      progress=False)
  return metrics


def train(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
          ) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final metrics."""
  start_time = time.perf_counter()
  sharding.maybe_initialize_distributed(config.sharding.distributed)
  if config.train.task not in TASKS:
    raise ConfigError(f'config.train.task={config.train.task!r}; expected one of {TASKS}')
  train_step_lib.validate_train_config(config.train)
  prepare_workdir(config, workdir, overwrite)
  requested, config = config, ml_collections.ConfigDict(config.to_dict())
  config.data = resolve_data(config.data)
  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'the tokenizer {config.data.tokenizer} needs vocab_size '
                      f'{tokenizer.vocab_size} > config.model.vocab_size={config.model.vocab_size}')
  model = make_model(config.model)
  optimizer = optim.make_optimizer(config.optimizer)
  mesh = sharding.make_mesh(dict(config.sharding.mesh))
  sharding.check_batch_size(config.train.batch_size, mesh, config.train.gradient_accumulation_steps)

  validate_curriculum(config)
  validate_mha_steps(config)
  uptraining = uptrains(config)
  reports = {}
  stream = DataStream(config, tokenizer, read_train_data(config, reports))
  finetune = config.train.task == 'finetune'
  dev_records = (read_fid_records(config, 'dev', config.train.eval_examples, reports)
                 if finetune and config.train.eval_every else [])
  final_split = config.train.final_eval_split if finetune else ''
  final_records = read_fid_records(config, final_split, reports=reports) if final_split else []
  for records in (dev_records, final_records):
    features.check_records_fit(tokenizer, records, config.data.n_passages, config.data.passage_len)
  if reports and jax.process_index() == 0:
    with open(os.path.join(workdir, 'data_report.json'), 'w') as f:
      json.dump(reports, f, indent=1)
  example = _host_batch(next(iter(make_train_loader(config, tokenizer, stream.examples))))
  state, state_shardings = sharding.init_sharded_train_state(
      model, optimizer, jax.random.PRNGKey(config.train.seed), example, mesh,
      strict=config.sharding.strict)
  keep_best = config.train.keep_best if finetune and config.train.eval_every else 0
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep_last=config.train.keep_checkpoints,
      keep_best=keep_best, best_metric='dev_exact_match' if keep_best else None,
      async_save=config.train.async_checkpoints)
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(_abstract(state))
    state = restored.state
    stream.set_state(restored.step, restored.data_state)
    _LOG.info('resumed from %s step %d', ckpt.directory, restored.step)
  elif uptraining:
    state = train_then_pool_multi_head(requested, workdir, state, stream, example, mesh)
    # A checkpoint of the pooled state: rollbacks and resumes after this point start from it.
    ckpt.save(int(state.step), state, data_state=stream.get_state(), config=config, force=True)
  elif config.init.checkpoint:
    state = init_from_pretrained(config, state, optimizer)

  step_fn = sharding.make_sharded_train_step(
      train_step_lib.make_train_step(model, optimizer, config.train), state_shardings, mesh)
  writer = MetricsWriter(workdir)
  divergence = config.train.divergence
  monitor = DivergenceMonitor(divergence.spike_factor, divergence.window, divergence.patience)
  rollbacks, poisoned = 0, False
  step = first_step = int(state.step)
  total = config.train.steps
  examples_per_step = config.train.batch_size
  bar = StageProgress(config, step)
  window_start, window_steps, tokens = time.perf_counter(), 0, 0.0
  while step < total:
    if step == config.train.debug_nan_at_step and not poisoned:
      poisoned = True  # simulate a blow-up: the next update sees NaN parameters
      state = state._replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    stage = stream.current_stage
    host_batch = _host_batch(stream.next(step))
    if stream.current_stage != stage:
      monitor.reset()  # more passages per example: a higher loss is expected, not a divergence
    batch = sharding.make_global_batch(host_batch, mesh)
    state, metrics = step_fn(state, batch)
    if config.train.debug_step_delay:
      time.sleep(config.train.debug_step_delay)
    metrics = jax.device_get(metrics)
    reason = monitor.diverged(float(metrics['loss']), bool(metrics['is_finite']))
    if reason:
      rollbacks += 1
      if rollbacks > config.train.divergence.max_rollbacks:
        raise FloatingPointError(f'training diverged at step {step + 1} ({reason}) after '
                                 f'{rollbacks - 1} rollbacks; giving up')
      ckpt.wait()
      if ckpt.latest_step() is None:
        raise FloatingPointError(f'training diverged at step {step + 1} ({reason}) before the '
                                 'first checkpoint; nothing to roll back to')
      restored = ckpt.restore(_abstract(state))
      ckpt.delete_after(restored.step)
      lr_scale = optim.get_lr_scale(state.opt_state) * config.train.divergence.lr_cut
      state = restored.state._replace(opt_state=optim.scale_learning_rate(
          restored.state.opt_state, lr_scale / optim.get_lr_scale(restored.state.opt_state)))
      stream.set_state(restored.step, restored.data_state)
      monitor.reset()
      _LOG.warning('step %d: %s; rolled back to step %d, learning rate x%g', step + 1, reason,
                   restored.step, lr_scale)
      writer.write(step=step + 1, event='rollback', reason=reason, to_step=restored.step,
                   lr_scale=lr_scale)
      step = restored.step
      bar.goto(step)
      continue
    step += 1
    bar.update(step)
    window_steps += 1
    tokens += float(metrics['num_tokens'])
    if step % config.train.log_every == 0 or step == total:
      seconds = time.perf_counter() - window_start
      record = {k: float(v) for k, v in metrics.items() if k != 'is_finite'}
      record.update(step=step, n_passages=host_batch['passage_ids'].shape[1],
                    examples_per_second=window_steps * examples_per_step / seconds,
                    target_tokens_per_second=tokens / seconds)
      writer.write(**record)
      bar.set_postfix(loss=f'{record["loss"]:.3f}', ex_s=f'{record["examples_per_second"]:.1f}')
      window_start, window_steps, tokens = time.perf_counter(), 0, 0.0
    dev_metrics = None
    if dev_records and (step % config.train.eval_every == 0 or step == total):
      dev_metrics = dev_eval(config, model, state.params, tokenizer, dev_records)
      writer.write(step=step, event='dev_eval', **dev_metrics)
      bar.write(f'step {step}: dev exact match {dev_metrics["exact_match"]:.3f}')
    if step % config.train.checkpoint_every == 0 or step == total:
      ckpt.save(step, state, data_state=stream.get_state(), config=config,
                metrics={'dev_exact_match': dev_metrics['exact_match']} if dev_metrics else None,
                force=True)
  bar.close()
  stream.close()
  ckpt.wait()
  ckpt.close()
  result = dict(workdir=workdir, step=step, task=config.train.task, rollbacks=rollbacks)
  if step > first_step:
    result['train_seconds'] = round(time.perf_counter() - start_time, 1)
  else:
    result['already_trained'] = True  # a finished run, run again: nothing was trained
  if uptraining:
    result['mha_steps'] = config.train.mha_steps
  if final_split:
    test_metrics = writer.find(step=step, event=f'{final_split}_eval')
    if test_metrics is None:
      eval_start = time.perf_counter()
      test_metrics = dev_eval(config, model, state.params, tokenizer, final_records)
      writer.write(step=step, event=f'{final_split}_eval', **test_metrics)
      result[f'{final_split}_seconds'] = round(time.perf_counter() - eval_start, 1)
    result.update({f'{final_split}_{k}': v for k, v in test_metrics.items()})
  return result
