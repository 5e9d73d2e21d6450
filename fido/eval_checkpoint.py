"""`run.py --mode=eval`: evaluate a training run's checkpoints on a split, once or as they appear.

  python run.py --mode=eval --config=experiments/embedded.py:fido --workdir=workdirs/embedded-fido
  python run.py --mode=eval --config=... --workdir=WORKDIR --config.eval.watch=True

`--workdir` is the run's directory, as for `--mode=train`: its checkpoints (<workdir>/checkpoints,
or <workdir> itself when it is a checkpoint directory) are evaluated, and the files go to
<workdir>/eval_<split name or file stem>/. (`config.eval.checkpoint` and `config.eval.out_dir`
are deprecated: still honoured, with a warning, when --workdir is not given.)

Config fields read (`config.eval` is `default_config()` below; `config.data` is the training
owner's section; where the caller's config has no `data`, the checkpoint's saved one is used):
  config.model                 must agree with the checkpoint's saved model section (see
                               `check_model_matches`); dtype and dropout_rate may differ.
  config.data.tokenizer        SentencePiece model path
  config.data.{train,dev,test} FiD-format file paths, for split names in config.eval.split
  config.data.{n_passages, passage_len, target_len}

Output files (one directory per split): predictions_step{N}.jsonl and metrics_step{N}.json
(fido.evaluate), and in watch mode eval_table.jsonl / eval_table.md (step -> EM/F1), rebuilt from
the metrics files, which are also what makes a restarted watcher skip the steps it already
evaluated. All writes are atomic.

Many processes (`config.sharding.distributed`, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID): the params are restored onto the mesh of `config.sharding.mesh`, each process
decodes its share of the records (fido.evaluate.predict), and process 0 writes the one predictions
file, in record order, and the metrics; a watcher's processes follow process 0's view of the
checkpoint directory.
"""

import json
import logging
import os
import re
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections

from fido import multihost, sharding
from fido.checkpoint import Checkpointer
from fido.config import ConfigError, config_diff
from fido.data.features import check_records_fit
from fido.data.fid_format import read_fid_file
from fido.data.sources import resolve_data
from fido.data.tfds_builders import head, load_fid_source
from fido.data.tokenizer import load_tokenizer
from fido.errors import CheckpointError
from fido.evaluate import check_has_answers, evaluate_records, write_metrics, write_predictions
from fido.files import atomic_write
from fido.model.fid import FiDFunctions, init_params, make_model, stored_config

_LOG = logging.getLogger(__name__)
SPLITS = ('train', 'dev', 'test')
# Model fields an evaluation may choose freely: a size label, the compute dtype, dropout (off), the
# decode step's weight storage (made from the checkpoint's float32 weights at load time).
# Fields that do not change what a trained checkpoint computes (position_bias_init_std and the
# mimetic fields: init only).
EVAL_FREE_MODEL_FIELDS = ('dropout_rate', 'dtype', 'size', 'position_bias_init_std', 'mimetic_qk',
                          'mimetic_vo', 'decoder_weights')
_METRICS_FILE = re.compile(r'metrics_step(\d+)\.json')


def default_config() -> ml_collections.ConfigDict:
  """The `config.eval` section."""
  return ml_collections.ConfigDict(dict(
      checkpoint='',        # deprecated: pass --workdir (a training workdir or checkpoint directory)
      step=-1,              # checkpoint step to evaluate; -1 = the latest
      split='dev',          # 'train' | 'dev' | 'test' (config.data paths) or a FiD file path
      out_dir='',           # deprecated: files go to <--workdir>/eval_<split name or file stem>
      beam_size=1,          # 1 = greedy
      alpha=0.6,            # beam-search length penalty exponent
      batch_size=16,
      max_decode_len=0,     # 0 = config.data.target_len
      max_examples=0,       # 0 = all records of the split
      progress=True,        # tqdm bar (shown on a terminal only)
      crossattention_scores=False,  # write each passage's cross-attention score (FiD's option)
      watch=False,          # evaluate each new checkpoint as training writes it
      poll_seconds=60.0,
      timeout_seconds=3600.0,  # watch: stop after this long without a new checkpoint
      stop_at_step=-1,      # watch: stop once this step is evaluated; -1 = never
  ))


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


def check_model_matches(saved_model: Mapping[str, Any], model: Mapping[str, Any],
                        where: str) -> None:
  """ConfigError naming every config.model field where the checkpoint and the config differ.

  Compared: everything but EVAL_FREE_MODEL_FIELDS (a size label, dtype, dropout, init std, the
  decoder's weight storage).
  """
  diffs = config_diff(saved_model, model, prefix='config.model',
                      ignore=lambda name: name.rsplit('.', 1)[-1] in EVAL_FREE_MODEL_FIELDS)
  if diffs:
    raise ConfigError(f'{where} was saved with a different model than config.model describes: '
                      + '; '.join(f'{name}: checkpoint {a!r}, config {b!r}'
                                  for name, a, b in diffs))


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


def build_reader(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict | None):
  """(model, data section, tokenizer) for decoding a checkpoint saved with config `saved`: the
  model of config.model (else the checkpoint's), config.data (else the checkpoint's)."""
  config_model = config.get('model')
  saved_model = saved.get('model') if saved is not None else None
  if config_model is None and saved_model is None:
    raise ConfigError('neither config.model nor the checkpoint describe the model')
  # The checkpoint's model, with the config's eval-time choices (dtype) where it has them.
  model_config = ml_collections.ConfigDict(
      config_model if config_model is not None else saved_model)
  data = config.get('data')
  if data is None and saved is not None:
    data = saved.get('data')
  if not data:
    raise ConfigError('config.data is missing: decoding needs config.data.{tokenizer, '
                      'n_passages, passage_len, target_len}')
  saved_data = saved.get('data') if saved is not None else None
  if saved_data is not None and saved_data.get('tokenizer') != data.get('tokenizer'):
    _LOG.warning('decoding with tokenizer %s; the checkpoint was trained with %s',
                 data.get('tokenizer'), saved_data.get('tokenizer'))
  tokenizer = load_tokenizer(data['tokenizer'], model_vocab_size=model_config.vocab_size)
  return make_model(model_config), data, tokenizer


def restore_reader(config: ml_collections.ConfigDict, checkpoint_dir_or_workdir: str,
                   step: int | None = None):
  """(model, params, data section, tokenizer, step) of a checkpoint (None: the latest), after
  checking that config.model describes it (`check_model_matches`)."""
  directory = resolve_checkpoint_dir(checkpoint_dir_or_workdir)
  if not _list_steps(checkpoint_dir_or_workdir):
    raise CheckpointError(f'no checkpoint found under {checkpoint_dir_or_workdir}')
  with Checkpointer(directory, read_only=True) as ckpt:
    saved = ckpt.restore({'params': None}, step=step)  # the JSON items: the step and the config
    saved_model = saved.config.get('model') if saved.config is not None else None
    if saved_model is not None and config.get('model') is not None:
      check_model_matches(saved_model, config.model, f'checkpoint {directory}/{saved.step}')
    model, data, tokenizer = build_reader(config, saved.config)
    step, params = ckpt.restore_params_only(stored_abstract_params(model), step=saved.step)
  return model, model.load_params(params), data, tokenizer, int(step)


def stored_abstract_params(model: FiDFunctions):
  """The shapes of the float32 tree a checkpoint holds for `model`; `model.load_params` converts
  it to the decoder weight format `model` reads (config.model.decoder_weights)."""
  stored_model = make_model(stored_config(model.config))
  return jax.eval_shape(lambda rng: init_params(stored_model, rng), jax.random.PRNGKey(0))


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
    self.model, data, self.tokenizer = build_reader(self.config, saved)
    self.skipped = {}
    if data.get('source') == 'tfds' and self.split in SPLITS:
      # Read where decoded, each process its own records; answers are checked after decoding.
      tfds = data['tfds']
      records = load_fid_source(tfds['dir'], tfds['name'], self.split)
      self.split = repr(records)
      if self.eval.max_examples:
        records = head(records, self.eval.max_examples)
    else:
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
    # The float32 tree the checkpoint holds, restored onto the mesh of config.sharding.
    abstract = stored_abstract_params(self.model)
    layout = self.config.get('sharding', sharding.default_config())
    shardings = sharding.param_shardings(abstract, sharding.make_mesh(dict(layout.mesh)),
                                         fsdp=layout.get('fsdp', False))
    self.abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)

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
    params = self.model.load_params(params)
    _LOG.info('evaluating %s on %s (%d records)', where, self.split, len(self.records))
    max_len = self.eval.max_decode_len or None
    metrics, predictions = evaluate_records(
        self.model, params, self.records, self.tokenizer, batch_size=self.eval.batch_size,
        beam_size=self.eval.beam_size, alpha=self.eval.alpha, max_decode_len=max_len,
        progress=self.eval.progress,
        crossattention_scores=bool(self.eval.get('crossattention_scores', False)), **self.lengths)
    metrics.update(step=int(step), split=self.split, checkpoint=directory)
    if self.skipped:
      metrics['skipped_records'] = self.skipped
    if multihost.is_primary():
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
  """eval_table.jsonl and eval_table.md: one row per evaluated step, by step (process 0 writes)."""
  rows = [dict(step=s, exact_match=m['exact_match'], f1=m['f1'], count=m['count'])
          for s, m in sorted(evaluated.items())]
  if not multihost.is_primary():
    return rows
  atomic_write(os.path.join(out_dir, 'eval_table.jsonl'),
                     ''.join(json.dumps(r) + '\n' for r in rows))
  md = ['| step | EM (%) | F1 (%) | examples |', '|---:|---:|---:|---:|']
  md += [f"| {r['step']} | {100 * r['exact_match']:.2f} | {100 * r['f1']:.2f} | {r['count']} |"
         for r in rows]
  atomic_write(os.path.join(out_dir, 'eval_table.md'), '\n'.join(md) + '\n')
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
  done = {int(s): m for s, m in multihost.agree(list(read_evaluated(out_dir).items()))}
  finished = lambda: stop_at_step is not None and any(s >= stop_at_step for s in done)
  last_new = time.monotonic()
  while not finished():
    for step in multihost.agree([s for s in _list_steps(workdir) if s not in done]):
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
    if multihost.agree(time.monotonic() - last_new >= timeout_seconds):
      _LOG.info('no new checkpoint under %s for %.0f s; stopping', workdir, timeout_seconds)
      break
    sleep(poll_seconds)
  return write_table(out_dir, done) if done else []


def run_eval(config: ml_collections.ConfigDict, workdir: str, *, default_workdir: bool = False
             ) -> dict | list[dict]:
  """`run.py --mode=eval`: evaluates the run in `workdir` once (returns its metrics) or, with
  config.eval.watch, each checkpoint as it appears (returns the table's rows).

  default_workdir: `workdir` is run.py's default (no --workdir flag), which the deprecated
  config.eval.checkpoint (and config.eval.out_dir) still override, with a warning.
  """
  if config.get('sharding') is not None:
    multihost.maybe_initialize_distributed(config.sharding.distributed)
  ev = config.get('eval') if config.get('eval') is not None else default_config()
  out_dir = ''
  if ev.get('checkpoint') or ev.get('out_dir'):
    if not default_workdir:
      raise ConfigError('config.eval.checkpoint and config.eval.out_dir are deprecated and cannot '
                        'be combined with --workdir: pass only --workdir=DIR (the run to evaluate; '
                        'files go to DIR/eval_<split>)')
    _LOG.warning('config.eval.checkpoint / config.eval.out_dir are deprecated: pass --workdir=DIR '
                 '(the run to evaluate; files go to DIR/eval_<split>)')
    workdir, out_dir = ev.get('checkpoint') or workdir, ev.get('out_dir')
  if config.get('data') is not None:
    config.data = resolve_data(config.data)  # e.g. generate the synthetic split files if missing
  if ev.watch:
    return watch(config, workdir, split_path=ev.split, out_dir=out_dir,
                 poll_seconds=ev.poll_seconds, timeout_seconds=ev.timeout_seconds,
                 stop_at_step=None if ev.stop_at_step < 0 else ev.stop_at_step)
  return evaluate_checkpoint(config, workdir, split_path=ev.split, out_dir=out_dir,
                             step=None if ev.step < 0 else ev.step)
