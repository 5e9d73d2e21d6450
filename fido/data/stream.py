"""The training data stream: the passage curriculum, the training loader of each stage, and a
resumable, prefetching stream of batches across stages (fido.train's input).

  config.data.curriculum   n_passages[i], steps[i]: stage i trains steps[i] steps on n_passages[i]
                           passages per example (the gold passage first when answer_first), after
                           FiD's practice of training on fewer passages before many; then
                           config.data.n_passages until config.train.steps. Fine-tuning only.
  DataStream               the batch of each step, across stages; get_state/set_state resume
                           exactly at any step (the state goes into every checkpoint)
  StageProgress            one progress bar per stage
"""

import concurrent.futures
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from fido.config import ConfigError
from fido.data import fid_format, pipeline, tfds_builders
from fido.data.errors import DataError
from fido.data.tokenizer import Tokenizer
from fido.errors import MissingInputError

_LOG = logging.getLogger(__name__)


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
  # A curriculum may fill the run exactly (train on its stages, evaluate on data.n_passages); one
  # longer than the run is cut, which is worth a word.
  if sum(steps) > config.train.steps:
    _LOG.warning('config.data.curriculum.steps=%s add up to %d > config.train.steps=%d: this '
                 'run ends inside the curriculum, before training on config.data.n_passages=%d '
                 'passages', steps, sum(steps), config.train.steps, config.data.n_passages)


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
                     reports: dict[str, Any] | None = None) -> Sequence[dict]:
  """The normalized records of `config.data[split]` (the first `limit`; all when 0).

  source='tfds': a random-access view of the prepared split (records are read when used; bad
  ones were dealt with when it was prepared). Otherwise the file, read whole: bad records raise
  DataError, or with `config.data.on_error='skip'` are counted by reason: the count is logged
  and, when `reports` is given, stored there under the split's name.
  """
  if config.data.source == 'tfds':
    source = tfds_builders.load_fid_source(config.data.tfds.dir, config.data.tfds.name, split)
    return tfds_builders.head(source, limit) if limit else source
  path = config.data[split]
  records, report = fid_format.read_fid_file(path, n_passages=config.data.n_passages,
                                             on_error=config.data.get('on_error', 'raise'))
  _LOG.info('%s data: %s', split, report.summary())
  if reports is not None:
    reports[split] = dict(path=path, read=report.read, kept=report.kept,
                          skipped=dict(report.skipped), warnings=dict(report.warnings))
  return records[:limit] if limit else records


def read_train_data(config: ml_collections.ConfigDict,
                    reports: dict[str, Any] | None = None) -> Sequence:
  """Fine-tuning: the normalized FiD records; pre-training: the corpus documents (a list, or
  with source='tfds' a random-access view of the prepared data).

  Raises DataError when there are fewer than one batch (config.train.batch_size) of them.
  """
  data = config.data
  if data.source == 'tfds':
    records = (read_fid_records(config, 'train') if config.train.task == 'finetune' else
               tfds_builders.load_text_source(data.tfds.dir, data.tfds.corpus
                                              or f'{tfds_builders.TEXT_BUILDER}/{data.tfds.name}'))
    source = repr(records)
  elif config.train.task == 'finetune':
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


def per_process_batch(config: ml_collections.ConfigDict) -> int:
  """This process's rows of each training batch: config.train.batch_size / process count."""
  return config.train.batch_size // jax.process_count()


def make_train_loader(config: ml_collections.ConfigDict, tokenizer: Tokenizer, examples: Sequence,
                      stage: int = 0):
  """The training loader of curriculum stage `stage` over read_train_data's `examples`."""
  data, train = config.data, config.train
  per_process = per_process_batch(config)
  if train.task == 'finetune':
    cur = data.curriculum
    warmup = stage < len(cur.steps)
    return pipeline.qa_train_loader(
        examples, tokenizer, batch_size=per_process,
        n_passages=cur.n_passages[stage] if warmup else data.n_passages,
        passage_len=data.passage_len, target_len=data.target_len, seed=train.seed + stage,
        answer_choice=data.answer_choice, answer_first=warmup and cur.answer_first,
        worker_count=data.get('worker_count', 0))
  return pipeline.span_corruption_loader(
      examples, tokenizer, batch_size=per_process, seed=train.seed,
      inputs_length=data.inputs_length, qa_shaped=True, worker_count=data.get('worker_count', 0))


def stage_start(config: ml_collections.ConfigDict, stage: int) -> int:
  """The first training step of curriculum stage `stage`."""
  return int(sum(config.data.curriculum.steps[:stage]))


class DataStream:
  """Training batches across curriculum stages; get_state/set_state resume exactly at any step.

  The batch of step s is the (s - start of its stage)-th batch of its stage's loader, so the
  stream's position is a function of the step; its state, {'stage', 'batches' (handed out in that
  stage)}, holds no process's own reader position and resumes on any number of processes (each
  process's loader is sought to that many batches, `pipeline.seek`). With grain workers
  (config.data.worker_count > 0) the records of a global batch depend on processes x workers,
  which the state then records ('readers') and a resume must keep. The batch of step s + 1 is
  prepared in a background thread while step s trains (tokenization is Python; the train step
  releases the GIL). A checkpoint after `step` steps stores the position in the stage that fed
  step `step - 1`; if step `step` starts a new stage, resuming starts that stage's loader afresh.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, examples: Sequence):
    self.config, self.tokenizer, self.examples = config, tokenizer, examples
    self.stage, self.iterator, self.state = None, None, None
    self.current_stage = None  # the stage of the last batch handed out
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._pending = None  # (step, future of (stage, batch, state after it))

  def _start(self, stage: int, batches: int = 0) -> None:
    self.stage = stage
    self.iterator = iter(make_train_loader(self.config, self.tokenizer, self.examples, stage))
    if batches:
      pipeline.seek(self.iterator, batches, batch_size=per_process_batch(self.config))

  def _fetch(self, step: int) -> tuple[int, dict, Any]:
    stage = data_stage(self.config, step)
    if stage != self.stage:
      self._start(stage)
    batch = next(self.iterator)
    return stage, batch, self._position(stage, step + 1 - stage_start(self.config, stage))

  def _position(self, stage: int, batches: int) -> dict:
    position = dict(stage=stage, batches=batches)
    workers = self.config.data.get('worker_count', 0)
    if workers:
      position['readers'] = jax.process_count() * workers
    return position

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

  def get_state(self) -> dict | None:
    return self.state

  def set_state(self, step: int, state) -> None:
    """Positions the stream after `step` steps. `state`, saved at that step, must agree (an
    older checkpoint's grain bytes are not read: the position follows from the step)."""
    self._drain()
    stage = data_stage(self.config, max(step - 1, 0))
    batches = step - stage_start(self.config, stage)
    expected = self._position(stage, batches)
    if isinstance(state, Mapping) and state.get('readers') != expected.get('readers'):
      raise ConfigError(f'the checkpoint at step {step} was written reading the data with '
                        f'{state.get("readers", 0)} grain workers in all (processes x '
                        f'config.data.worker_count), this run reads with '
                        f'{expected.get("readers", 0)}: resume with as many (worker_count=0 '
                        'resumes on any number of processes)')
    if isinstance(state, Mapping) and dict(state) != expected:
      raise ValueError(f'the data state saved at step {step}, {dict(state)}, does not match '
                       f'the stream position {expected} that step implies')
    self._start(stage, batches)
    self.state = expected
    self.current_stage = self.stage

  def close(self) -> None:
    self._drain()
    self._executor.shutdown()
