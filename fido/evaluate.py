"""Evaluation: decode a QA split, score EM/F1, write predictions; checkpoint-to-eval and watch mode.

Library use (the training loop's periodic dev EM):
  metrics, predictions = evaluate_records(model, params, records, tokenizer, n_passages=...,
                                          passage_len=..., target_len=..., batch_size=...)
Command line (run.py --mode=eval calls `run_eval(config)`):
  python run.py --config=experiments/fido.py:tiny --mode=eval --config.eval.checkpoint=WORKDIR
  python run.py --config=... --mode=eval --config.eval.checkpoint=WORKDIR --config.eval.watch=True

Config fields read (`config.eval` is `default_config()` below; `config.data` is the training
owner's section; where the caller's config has no `data`, the checkpoint's saved one is used):
  config.model                 must agree with the checkpoint's saved model section (see
                               `check_model_matches`); dtype and dropout_rate may differ.
  config.data.tokenizer        SentencePiece model path
  config.data.{train,dev,test} FiD-format file paths, for split names in config.eval.split
  config.data.{n_passages, passage_len, target_len}

Output files (out_dir, one per split): predictions_step{N}.jsonl (question, prediction, answers,
correct, f1 per record, in file order), metrics_step{N}.json, and in watch mode eval_table.jsonl /
eval_table.md (step -> EM/F1), rebuilt from the metrics files, which are also what makes a
restarted watcher skip the steps it already evaluated. All writes are atomic (tmp + rename).

Decoding is single-process: every record is decoded by this process (multi-host eval would
shard records with qa_eval_loader's shard_index/shard_count and gather predictions).
"""

import collections
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from fido import metrics as metrics_lib
from fido.checkpoint import Checkpointer
from fido.config import ConfigError
from fido.data.errors import DataError
from fido.data.features import check_records_fit
from fido.data.fid_format import read_fid_file
from fido.data.pipeline import qa_eval_loader
from fido.data.sources import resolve_data
from fido.data.tokenizer import Tokenizer, load_tokenizer
from fido.decoding import DecodeOutput, make_decode_fn
from fido.errors import CheckpointError
from fido.model.fid import FiDFunctions, init_params, make_model

_LOG = logging.getLogger(__name__)
SPLITS = ('train', 'dev', 'test')
# Model fields an evaluation may choose freely: a size label, the compute dtype, dropout (off).
# Fields that do not change what a trained checkpoint computes (position_bias_init_std: init only).
EVAL_FREE_MODEL_FIELDS = ('dropout_rate', 'dtype', 'size', 'position_bias_init_std')
_METRICS_FILE = re.compile(r'metrics_step(\d+)\.json')


def default_config() -> ml_collections.ConfigDict:
  """The `config.eval` section."""
  return ml_collections.ConfigDict(dict(
      checkpoint='',        # a checkpoint directory or a training workdir (<workdir>/checkpoints)
      step=-1,              # checkpoint step to evaluate; -1 = the latest
      split='dev',          # 'train' | 'dev' | 'test' (config.data paths) or a FiD file path
      out_dir='',           # '' = <workdir>/eval_<split name or file stem>
      beam_size=1,          # 1 = greedy
      alpha=0.6,            # beam-search length penalty exponent
      batch_size=16,
      max_decode_len=0,     # 0 = config.data.target_len
      max_examples=0,       # 0 = all records of the split
      progress=True,        # tqdm bar (shown on a terminal only)
      watch=False,          # evaluate each new checkpoint as training writes it
      poll_seconds=60.0,
      timeout_seconds=3600.0,  # watch: stop after this long without a new checkpoint
      stop_at_step=-1,      # watch: stop once this step is evaluated; -1 = never
  ))


# ------------------------------------------------------------------------------------ decoding

_DECODE_FNS: collections.OrderedDict = collections.OrderedDict()


def _cached_decode_fn(model: FiDFunctions, max_length: int, beam_size: int, alpha: float):
  """One jitted decode function per (model, settings), so repeated evals compile once."""
  key = (id(model.decode_step), max_length, beam_size, alpha if beam_size > 1 else None)
  if key in _DECODE_FNS and _DECODE_FNS[key][0] is model.decode_step:
    _DECODE_FNS.move_to_end(key)
    return _DECODE_FNS[key][1]
  fn = make_decode_fn(model, max_length=max_length, beam_size=beam_size, alpha=alpha)
  _DECODE_FNS[key] = (model.decode_step, fn)  # holding decode_step keeps its id from being reused
  while len(_DECODE_FNS) > 8:
    _DECODE_FNS.popitem(last=False)
  return fn


def detokenize(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
  """Text of decoded ids (up to the first EOS); '' instead of an exception for odd ids."""
  try:
    return tokenizer.decode([int(i) for i in ids])
  except Exception as e:  # pylint: disable=broad-except -- one odd prediction must not end an eval
    _LOG.warning('cannot detokenize %s (%s: %s); predicting ""', list(ids)[:32],
                 type(e).__name__, e)
    return ''


def predict(model: FiDFunctions, params, records: Sequence[dict], tokenizer: Tokenizer, *,
            n_passages: int, passage_len: int, target_len: int, batch_size: int,
            beam_size: int = 1, alpha: float = 0.6, max_decode_len: int | None = None,
            progress: bool = True, decode_fn: Callable | None = None) -> list[dict]:
  """Decodes every record once; per-record {question, prediction, answers, exact_match, f1}.

  Greedy when beam_size == 1, else beam search; one jitted function at fixed shapes [batch_size,
  n_passages, passage_len], reused across calls with the same model. Rows are in record order;
  exact_match/f1 are None for a record without answers. `decode_fn(params, passage_ids,
  passage_mask) -> DecodeOutput | tokens [B, M]` replaces the model's decoder (tests).
  """
  if decode_fn is None:
    decode_fn = _cached_decode_fn(model, max_decode_len or target_len, beam_size, alpha)
  loader = qa_eval_loader(records, tokenizer, batch_size=batch_size, n_passages=n_passages,
                          passage_len=passage_len, target_len=target_len, shard_index=0,
                          shard_count=1)
  rows: list[dict | None] = [None] * len(records)

  def finish(example_index_B: np.ndarray, out: Any) -> int:
    tokens_BxM = np.asarray(out.tokens if isinstance(out, DecodeOutput) else out)
    done = 0
    for index, ids in zip(example_index_B, tokens_BxM):
      if index < 0:  # a padding row of the last batch
        continue
      if rows[index] is not None:
        raise RuntimeError(f'record {index} was decoded twice')
      record, prediction = records[index], detokenize(tokenizer, ids)
      answers = list(record.get('answers') or [])
      scores = (metrics_lib.score(prediction, answers) if answers
                else {'exact_match': None, 'f1': None})
      rows[index] = {'question': record['question'], 'prediction': prediction,
                     'answers': answers, **scores}
      done += 1
    return done

  pending = None  # dispatch batch i+1 before reading batch i back, so host and device overlap
  with tqdm.tqdm(total=len(records), desc='eval', unit='ex', disable=None if progress else True,
                 file=sys.stderr) as bar:
    for batch in loader:
      out = decode_fn(params, batch['passage_ids'], batch['passage_mask'])
      if pending is not None:
        bar.update(finish(*pending))
      pending = (batch['example_index'], out)
    if pending is not None:
      bar.update(finish(*pending))
  missing = [i for i, row in enumerate(rows) if row is None]
  if missing:
    raise RuntimeError(f'{len(missing)} records were never decoded (first: {missing[:5]})')
  return rows


def check_has_answers(records: Sequence[dict], name: str | None = None) -> None:
  """DataError naming the file and record if a record has no gold answers (EM needs them)."""
  for i, record in enumerate(records):
    if not record.get('answers'):
      source = name or record.get('source') or '<records>'
      number = record.get('record_number', i + 1)
      raise DataError(f"{source}: record {number} has no 'answers': evaluation needs gold answers "
                      f'(an unlabeled file? use fido.evaluate.predict to only decode it)')


def evaluate_records(model: FiDFunctions, params, records: Sequence[dict], tokenizer: Tokenizer,
                     **predict_kwargs) -> tuple[dict[str, float], list[dict]]:
  """(metrics {exact_match, f1, count, examples_per_second}, predictions); kwargs as `predict`.

  examples_per_second is over the whole call, including compilation on a model's first call.
  """
  check_has_answers(records)
  start = time.perf_counter()
  predictions = predict(model, params, records, tokenizer, **predict_kwargs)
  seconds = time.perf_counter() - start
  metrics = metrics_lib.aggregate(predictions)
  metrics['examples_per_second'] = metrics['count'] / max(seconds, 1e-9)
  return metrics, predictions


# --------------------------------------------------------------------------------------- files

def _atomic_write_text(path: str, text: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.tmp-')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_predictions(path: str, predictions: Sequence[Mapping[str, Any]]) -> None:
  """JSONL, one line per record: question, prediction, answers, correct (EM as bool), f1."""
  lines = []
  for p in predictions:
    em = p.get('exact_match')
    lines.append(json.dumps({'question': p['question'], 'prediction': p['prediction'],
                             'answers': list(p['answers']),
                             'correct': None if em is None else bool(em), 'f1': p.get('f1')},
                            ensure_ascii=False) + '\n')
  _atomic_write_text(path, ''.join(lines))


def write_metrics(path: str, metrics: Mapping[str, Any]) -> None:
  _atomic_write_text(path, json.dumps(dict(metrics), indent=2, sort_keys=True) + '\n')


# ---------------------------------------------------------------------------- checkpoint-to-eval

def resolve_checkpoint_dir(path: str) -> str:
  """`<path>/checkpoints` for a training workdir, else `path` itself."""
  workdir_checkpoints = os.path.join(path, 'checkpoints')
  return workdir_checkpoints if os.path.isdir(workdir_checkpoints) else path


def _list_steps(path: str) -> list[int]:
  directory = resolve_checkpoint_dir(path)
  if not os.path.isdir(directory):
    return []
  ckpt = Checkpointer(directory, read_only=True)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return flat


def check_model_matches(saved_model: Mapping[str, Any], model: Mapping[str, Any],
                        where: str) -> None:
  """ConfigError naming every config.model field where the checkpoint and the config differ.

  Compared: everything but EVAL_FREE_MODEL_FIELDS (a size label, dtype, dropout, init std).
  """
  to_dict = lambda c: c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c)
  saved, ours = _flatten(to_dict(saved_model)), _flatten(to_dict(model))
  missing = object()
  diffs = []
  for name in sorted(set(saved) | set(ours)):
    if name.rsplit('.', 1)[-1] in EVAL_FREE_MODEL_FIELDS:
      continue
    a, b = saved.get(name, missing), ours.get(name, missing)
    if a != b:
      fmt = lambda v: 'nothing' if v is missing else repr(v)
      diffs.append(f'config.model.{name}: checkpoint {fmt(a)}, config {fmt(b)}')
  if diffs:
    raise ConfigError(f'{where} was saved with a different model than config.model describes: '
                      + '; '.join(diffs))


def default_out_dir(checkpoint_dir_or_workdir: str, split: str) -> str:
  """<workdir>/eval_<split> (also for <workdir>/checkpoints), else <checkpoint dir>/eval_<split>."""
  base = os.path.normpath(checkpoint_dir_or_workdir)
  if os.path.basename(base) == 'checkpoints':
    base = os.path.dirname(base)
  return os.path.join(base, f'eval_{_split_name(split)}')


def _split_path(data: Mapping[str, Any] | None, split: str) -> str:
  if split in SPLITS:
    if not data or not data.get(split):
      raise ConfigError(f'config.data.{split} is not set; give a file path as the split instead')
    return str(data[split])
  return split


def _split_name(split_path: str) -> str:
  name = os.path.basename(split_path)
  for ext in ('.gz', '.jsonl', '.json'):
    name = name[:-len(ext)] if name.endswith(ext) else name
  return name


class _CheckpointEvaluator:
  """Evaluates steps of one checkpoint directory on one split; builds the model and reads the
  split once (on the first step, from the config that checkpoint was saved with)."""

  def __init__(self, config: ml_collections.ConfigDict, checkpoint_dir_or_workdir: str,
               split_path: str, out_dir: str):
    self.config, self.path, self.split = config, checkpoint_dir_or_workdir, split_path
    self.eval = config.get('eval') if config.get('eval') is not None else default_config()
    self.out_dir = out_dir or default_out_dir(checkpoint_dir_or_workdir, split_path)
    self.model = None

  def _setup(self, saved: ml_collections.ConfigDict | None) -> None:
    config_model = self.config.get('model')
    saved_model = saved.get('model') if saved is not None else None
    if config_model is None and saved_model is None:
      raise ConfigError('neither config.model nor the checkpoint describe the model')
    # The checkpoint's model, with the config's eval-time choices (dtype) where it has them.
    model_config = ml_collections.ConfigDict(
        config_model if config_model is not None else saved_model)
    self.model = make_model(model_config)
    data = self.config.get('data')
    if data is None and saved is not None:
      data = saved.get('data')
    if not data:
      raise ConfigError('config.data is missing: evaluation needs config.data.{tokenizer, '
                        'n_passages, passage_len, target_len}')
    saved_data = saved.get('data') if saved is not None else None
    if saved_data is not None and saved_data.get('tokenizer') != data.get('tokenizer'):
      _LOG.warning('evaluating with tokenizer %s; the checkpoint was trained with %s',
                   data.get('tokenizer'), saved_data.get('tokenizer'))
    self.tokenizer = load_tokenizer(data['tokenizer'], model_vocab_size=model_config.vocab_size)
    self.split = _split_path(data, self.split)
    records, report = read_fid_file(self.split, require_answers=False,
                                    n_passages=data['n_passages'],
                                    on_error=data.get('on_error', 'raise'))
    self.skipped = dict(report.skipped)  # on_error='skip': reported with every step's metrics
    check_has_answers(records, self.split)
    check_records_fit(self.tokenizer, records, data['n_passages'], data['passage_len'])
    if self.eval.max_examples:
      records = records[:self.eval.max_examples]
    self.records = records
    self.lengths = dict(n_passages=data['n_passages'], passage_len=data['passage_len'],
                        target_len=data['target_len'])
    self.abstract_params = jax.eval_shape(lambda rng: init_params(self.model, rng),
                                          jax.random.PRNGKey(0))

  def evaluate(self, step: int | None) -> dict[str, Any]:
    directory = resolve_checkpoint_dir(self.path)
    if not _list_steps(self.path):
      raise CheckpointError(f'no checkpoint found under {self.path}')
    ckpt = Checkpointer(directory, read_only=True)
    try:
      # Only the JSON items (config): fixes the step and tells which model to build.
      saved = ckpt.restore({'params': None}, step=step)
      where = f'checkpoint {directory}/{saved.step}'
      # Every step must match config.model (or, without one, the first evaluated step's model).
      reference = self.config.get('model')
      if reference is None and self.model is not None:
        reference = self.model.config
      saved_model = saved.config.get('model') if saved.config is not None else None
      if saved_model is not None and reference is not None:
        check_model_matches(saved_model, reference, where)
      if self.model is None:
        self._setup(saved.config)
      step, params = ckpt.restore_params_only(self.abstract_params, step=saved.step)
    finally:
      ckpt.close()
    _LOG.info('evaluating %s on %s (%d records)', where, self.split, len(self.records))
    max_len = self.eval.max_decode_len or None
    metrics, predictions = evaluate_records(
        self.model, params, self.records, self.tokenizer, batch_size=self.eval.batch_size,
        beam_size=self.eval.beam_size, alpha=self.eval.alpha, max_decode_len=max_len,
        progress=self.eval.progress, **self.lengths)
    metrics.update(step=int(step), split=self.split, checkpoint=directory)
    if self.skipped:
      metrics['skipped_records'] = self.skipped
    write_predictions(os.path.join(self.out_dir, f'predictions_step{step}.jsonl'), predictions)
    write_metrics(os.path.join(self.out_dir, f'metrics_step{step}.json'), metrics)
    _LOG.info('step %d: EM %.4f F1 %.4f over %d', step, metrics['exact_match'], metrics['f1'],
              metrics['count'])
    return metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint_dir_or_workdir: str, *,
                        split_path: str, out_dir: str, step: int | None = None) -> dict[str, Any]:
  """Restores a checkpoint's params, decodes `split_path`, writes predictions/metrics_step{N}.

  split_path: a FiD file with answers, or a split name of config.data. out_dir '' =
  <checkpoint_dir_or_workdir>/eval_<split>. step None = the latest. Returns the metrics
  (exact_match, f1, count, examples_per_second, step, split, checkpoint).
  """
  evaluator = _CheckpointEvaluator(config, checkpoint_dir_or_workdir, split_path, out_dir)
  return evaluator.evaluate(step)


# ---------------------------------------------------------------------------------------- watch

def read_evaluated(out_dir: str) -> dict[int, dict]:
  """step -> metrics of every readable metrics_step{N}.json in out_dir."""
  done = {}
  for name in os.listdir(out_dir) if os.path.isdir(out_dir) else ():
    match = _METRICS_FILE.fullmatch(name)
    if match:
      try:
        with open(os.path.join(out_dir, name), encoding='utf-8') as f:
          done[int(match.group(1))] = json.load(f)
      except (OSError, ValueError) as e:
        _LOG.warning('ignoring unreadable %s (%s); that step will be evaluated again', name, e)
  return done


def write_table(out_dir: str, evaluated: Mapping[int, Mapping[str, Any]]) -> list[dict]:
  """eval_table.jsonl and eval_table.md: one row per evaluated step, by step."""
  rows = [dict(step=s, exact_match=m['exact_match'], f1=m['f1'], count=m['count'])
          for s, m in sorted(evaluated.items())]
  _atomic_write_text(os.path.join(out_dir, 'eval_table.jsonl'),
                     ''.join(json.dumps(r) + '\n' for r in rows))
  md = ['| step | EM (%) | F1 (%) | examples |', '|---:|---:|---:|---:|']
  md += [f"| {r['step']} | {100 * r['exact_match']:.2f} | {100 * r['f1']:.2f} | {r['count']} |"
         for r in rows]
  _atomic_write_text(os.path.join(out_dir, 'eval_table.md'), '\n'.join(md) + '\n')
  return rows


def watch(config: ml_collections.ConfigDict, workdir: str, *, split_path: str, out_dir: str,
          poll_seconds: float = 60.0, timeout_seconds: float = 3600.0,
          stop_at_step: int | None = None, sleep: Callable[[float], None] = time.sleep
          ) -> list[dict]:
  """Evaluates every checkpoint step under `workdir` as it appears, oldest first; returns the table.

  Steps with a metrics file in out_dir are skipped (a restarted watcher resumes). Stops when
  `stop_at_step` (or a later step) is evaluated, or `timeout_seconds` pass without a new step. A
  step deleted by checkpoint retention before it could be read is skipped with a warning.
  """
  evaluator = _CheckpointEvaluator(config, workdir, split_path, out_dir)
  out_dir = evaluator.out_dir
  done = read_evaluated(out_dir)
  finished = lambda: stop_at_step is not None and any(s >= stop_at_step for s in done)
  last_new = time.monotonic()
  while not finished():
    for step in [s for s in _list_steps(workdir) if s not in done]:
      try:
        done[step] = evaluator.evaluate(step)
      except Exception:  # pylint: disable=broad-except
        if step in _list_steps(workdir):
          raise
        _LOG.warning('checkpoint step %d was deleted before it could be evaluated; skipped', step)
        continue
      write_table(out_dir, done)
      last_new = time.monotonic()
      if finished():
        break
    if finished():
      break
    if time.monotonic() - last_new >= timeout_seconds:
      _LOG.info('no new checkpoint under %s for %.0f s; stopping', workdir, timeout_seconds)
      break
    sleep(poll_seconds)
  return write_table(out_dir, done) if done else []


def run_eval(config: ml_collections.ConfigDict) -> Any:
  """`run.py --mode=eval`: evaluate config.eval.checkpoint once, or watch it (config.eval.watch)."""
  ev = config.get('eval') if config.get('eval') is not None else default_config()
  if not ev.checkpoint:
    raise ConfigError('config.eval.checkpoint is empty: set --config.eval.checkpoint=DIR '
                      '(a checkpoint directory or a training workdir)')
  if config.get('data') is not None:
    config.data = resolve_data(config.data)  # e.g. generate the synthetic split files if missing
  if ev.watch:
    rows = watch(config, ev.checkpoint, split_path=ev.split, out_dir=ev.out_dir,
                 poll_seconds=ev.poll_seconds, timeout_seconds=ev.timeout_seconds,
                 stop_at_step=None if ev.stop_at_step < 0 else ev.stop_at_step)
    for row in rows:
      print(json.dumps(row), flush=True)
    return rows
  metrics = evaluate_checkpoint(config, ev.checkpoint, split_path=ev.split, out_dir=ev.out_dir,
                                step=None if ev.step < 0 else ev.step)
  print(json.dumps(metrics), flush=True)
  return metrics
