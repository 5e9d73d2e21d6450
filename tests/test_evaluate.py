"""Tests for fido/evaluate.py and fido/eval_checkpoint.py: predictions/metrics files, the EM path,
errors, watch, beam search, run_eval's --workdir."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fido import config as fido_config
from fido import eval_checkpoint, evaluate
from fido import experiment
from fido.checkpoint import Checkpointer
from fido.config import ConfigError
from fido.errors import CheckpointError
from fido.data import features, synthetic
from fido.data.errors import DataError
from fido.data.fid_format import read_fid_file
from fido.data.tokenizer import load_tokenizer
from fido.model.fid import init_params, make_model

LENGTHS = dict(n_passages=2, passage_len=48, target_len=8)  # answers: <= 7 tokens + EOS
BATCH = 8  # 20 dev records: 3 batches, the last with 4 padding rows


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
  return synthetic.prepare_synthetic(tmp_path_factory.mktemp('synthetic'), n_train=50, n_dev=20,
                                     n_test=20)


@pytest.fixture(scope='module')
def tokenizer(paths):
  return load_tokenizer(paths.tokenizer)


@pytest.fixture(scope='module')
def dev(paths):
  return read_fid_file(paths.dev)[0]


def _config(paths, tokenizer, **model_kwargs):
  config = experiment.default_config()
  config.model = fido_config.model_config('tiny', vocab_size=tokenizer.vocab_size, **model_kwargs)
  config.data = ml_collections.ConfigDict(dict(
      tokenizer=paths.tokenizer, train=paths.train, dev=paths.dev, test=paths.test, **LENGTHS))
  config.eval = eval_checkpoint.default_config()
  config.eval.batch_size = BATCH
  config.eval.progress = False
  return config


@pytest.fixture(scope='module')
def config(paths, tokenizer):
  return _config(paths, tokenizer)


@pytest.fixture(scope='module')
def model(config):
  return make_model(config.model)


def _params(model, seed):
  return jax.jit(lambda rng: init_params(model, rng))(jax.random.PRNGKey(seed))


def _save(directory, step, params, config):
  state = dict(params=params, opt_state=None, step=jnp.asarray(step, jnp.int32),
               rng=jax.random.PRNGKey(0))
  with Checkpointer(directory) as ckpt:
    assert ckpt.save(step, state, config=config)


def _read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _gold_decoder(records, tokenizer, wrong=False):
  """A decode_fn that outputs each record's gold target tokens (another record's if `wrong`)."""
  gold = {}
  for i, record in enumerate(records):
    example = features.encode_qa_example(tokenizer, record, **LENGTHS)
    answer_of = records[(i + 1) % len(records)] if wrong else record
    gold[example['passage_ids'].tobytes()] = features.encode_target(
        tokenizer, answer_of['answers'][0], LENGTHS['target_len'])[0]

  def decode_fn(params, passage_ids_BxPxL, passage_mask_BxPxL):
    del params, passage_mask_BxPxL
    zeros = np.zeros((LENGTHS['target_len'],), np.int32)  # padding rows
    return np.stack([gold.get(np.asarray(row).tobytes(), zeros) for row in passage_ids_BxPxL])

  return decode_fn


def test_perfect_predictor_scores_one_and_wrong_scores_zero(model, dev, tokenizer):
  kwargs = dict(batch_size=BATCH, progress=False, **LENGTHS)
  metrics, rows = evaluate.evaluate_records(model, None, dev, tokenizer,
                                            decode_fn=_gold_decoder(dev, tokenizer), **kwargs)
  assert metrics['exact_match'] == 1.0 and metrics['f1'] == 1.0 and metrics['count'] == len(dev)
  assert [r['prediction'] for r in rows] == [r['answers'][0] for r in dev]
  metrics, _ = evaluate.evaluate_records(model, None, dev, tokenizer,
                                         decode_fn=_gold_decoder(dev, tokenizer, wrong=True),
                                         **kwargs)
  assert metrics['exact_match'] == 0.0


def test_odd_predictions_never_crash(model, dev, tokenizer):
  v = tokenizer.vocab_size
  odd = [[], [1], [0, 0, 0], [1, 5, 6], [v - 1, 3, 1], [v + 7, 2**30], [tokenizer.sentinel_id(0)]]
  texts = [evaluate.detokenize(tokenizer, ids) for ids in odd]
  assert texts[:4] == ['', '', '', '']
  assert all(isinstance(t, str) for t in texts)
  rows_BxM = np.asarray([(ids + [0] * 8)[:8] for ids in odd] + [[0] * 8], np.int32)
  preds = evaluate.predict(model, None, dev[:8], tokenizer, batch_size=8, progress=False,
                           decode_fn=lambda *_: rows_BxM, **LENGTHS)
  assert [p['prediction'] for p in preds[:3]] == ['', '', '']
  assert all(p['exact_match'] == 0.0 and p['f1'] == 0.0 for p in preds[:3])


def test_checkpoint_eval_writes_consistent_files(tmp_path, config, model, dev, tokenizer,
                                                 monkeypatch):
  workdir = str(tmp_path / 'work')
  _save(os.path.join(workdir, 'checkpoints'), 3, _params(model, 0), config)
  metrics = eval_checkpoint.evaluate_checkpoint(config, workdir, split_path='dev', out_dir='')
  out_dir = os.path.join(workdir, 'eval_dev')  # the default
  rows = _read_jsonl(os.path.join(out_dir, 'predictions_step3.jsonl'))
  with open(os.path.join(out_dir, 'metrics_step3.json')) as f:
    assert json.load(f) == metrics
  assert metrics['step'] == 3 and metrics['count'] == len(dev) == len(rows)
  assert [r['question'] for r in rows] == [r['question'] for r in dev]  # once each, in order
  assert set(rows[0]) == {'question', 'prediction', 'sequence_score', 'answers', 'correct', 'f1'}
  assert rows[0]['sequence_score'] <= 0  # a log-probability
  assert metrics['examples_per_second'] > 0

  # Real decoder outputs with the gold answer forced on even rows: 0 < EM < 1, and the metrics
  # file agrees with the per-row flags.
  real_decode_fn = evaluate._cached_decode_fn
  gold = _gold_decoder(dev, tokenizer)

  def half_perfect(*args):
    real = real_decode_fn(*args)

    def decode_fn(params, ids, mask):
      tokens = np.array(real(params, ids, mask).tokens)
      tokens[::2] = gold(params, ids, mask)[::2, :tokens.shape[1]]
      return tokens

    return decode_fn

  monkeypatch.setattr(evaluate, '_cached_decode_fn', half_perfect)
  out_dir = str(tmp_path / 'half')
  metrics = eval_checkpoint.evaluate_checkpoint(config, workdir, split_path=config.data.dev,
                                         out_dir=out_dir, step=3)
  rows = _read_jsonl(os.path.join(out_dir, 'predictions_step3.jsonl'))
  correct = [r['correct'] for r in rows]
  assert all(isinstance(c, bool) for c in correct)
  assert 0.5 <= metrics['exact_match'] < 1.0
  assert metrics['exact_match'] == pytest.approx(np.mean(correct))
  assert metrics['f1'] == pytest.approx(np.mean([r['f1'] for r in rows]))


def test_file_without_answers_is_an_error(tmp_path, config, model, paths):
  _save(tmp_path / 'ckpt', 1, _params(model, 0), config)
  with open(paths.dev, encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  del records[4]['answers']
  unlabeled = tmp_path / 'unlabeled.jsonl'
  unlabeled.write_text(''.join(json.dumps(r) + '\n' for r in records))
  with pytest.raises(DataError, match=r"unlabeled\.jsonl: record 5 has no 'answers'"):
    eval_checkpoint.evaluate_checkpoint(config, str(tmp_path / 'ckpt'), split_path=str(unlabeled),
                                 out_dir=str(tmp_path / 'out'))


def test_bad_records_stop_eval_before_decoding_or_are_skipped_and_counted(tmp_path, config, model,
                                                                         paths):
  _save(tmp_path / 'ckpt', 1, _params(model, 0), config)
  with open(paths.dev, encoding='utf-8') as f:
    lines = f.read().splitlines()
  long_question = {**json.loads(lines[0]), 'question': ' '.join(['why'] * 60) + '?'}
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('\n'.join(lines[:3] + ['{"question": ', json.dumps(long_question)]) + '\n')
  out_dir = tmp_path / 'out'
  with pytest.raises(DataError, match=r'bad\.jsonl: line 4 column \d+: malformed JSON'):
    eval_checkpoint.evaluate_checkpoint(config, str(tmp_path / 'ckpt'), split_path=str(bad),
                                 out_dir=str(out_dir))
  skip = ml_collections.ConfigDict(config.to_dict())
  skip.data.on_error = 'skip'
  with pytest.raises(DataError, match=r"bad\.jsonl: record 5: field 'question': passage prefix"):
    eval_checkpoint.evaluate_checkpoint(skip, str(tmp_path / 'ckpt'), split_path=str(bad),
                                 out_dir=str(out_dir))
  assert not out_dir.exists()  # checked before decoding: nothing written
  bad.write_text('\n'.join(lines[:3] + ['{"question": ']) + '\n')
  metrics = eval_checkpoint.evaluate_checkpoint(skip, str(tmp_path / 'ckpt'), split_path=str(bad),
                                         out_dir=str(out_dir))
  assert metrics['count'] == 3 and metrics['skipped_records'] == {'malformed JSON': 1}


def test_missing_checkpoint_is_an_error(tmp_path, config):
  for directory in (tmp_path / 'missing', tmp_path):
    with pytest.raises(FileNotFoundError, match=f'no checkpoint found under {directory}'):
      eval_checkpoint.evaluate_checkpoint(config, str(directory), split_path='dev', out_dir='')


def test_model_config_mismatch_names_the_field(tmp_path, config, model, paths, tokenizer):
  _save(tmp_path / 'ckpt', 1, _params(model, 0), config)
  other = _config(paths, tokenizer, cross_attention_period=2)
  with pytest.raises(ConfigError, match=r'config\.model\.decoder\.cross_attention_period: '
                                        r'checkpoint 1, config 2'):
    eval_checkpoint.evaluate_checkpoint(other, str(tmp_path / 'ckpt'), split_path='dev',
                                 out_dir=str(tmp_path / 'out'))
  # Init-only and run-only fields may differ: they do not change what the checkpoint computes.
  init_only = ml_collections.ConfigDict(config.model.to_dict())
  init_only.encoder.position_bias_init_std = 4.0
  init_only.encoder.mimetic_qk = init_only.encoder.mimetic_vo = 0.5
  init_only.dropout_rate = 0.3
  eval_checkpoint.check_model_matches(config.model, init_only, 'checkpoint 1')


def test_watch_evaluates_new_steps_then_resumes_without_repeating(tmp_path, config, model, dev):
  workdir = str(tmp_path / 'work')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  out_dir = str(tmp_path / 'eval')
  params = _params(model, 0)
  _save(ckpt_dir, 1, params, config)
  sleeps = []

  def sleep(seconds):  # the trainer writes step 2 while the watcher waits
    if not sleeps:
      _save(ckpt_dir, 2, params, config)
    sleeps.append(seconds)

  rows = eval_checkpoint.watch(config, workdir, split_path='dev', out_dir=out_dir, poll_seconds=0.01,
                        timeout_seconds=0.3, sleep=sleep)
  assert [r['step'] for r in rows] == [1, 2] and len(sleeps) > 1  # stopped on the timeout
  assert _read_jsonl(os.path.join(out_dir, 'eval_table.jsonl')) == rows
  with open(os.path.join(out_dir, 'eval_table.md')) as f:
    assert len(f.read().splitlines()) == 2 + 2
  assert all(r['count'] == len(dev) for r in rows)
  mtimes = {s: os.stat(os.path.join(out_dir, f'metrics_step{s}.json')).st_mtime_ns for s in (1, 2)}

  _save(ckpt_dir, 3, params, config)  # a restarted watcher evaluates only the new step
  rows = eval_checkpoint.watch(config, workdir, split_path='dev', out_dir=out_dir, poll_seconds=0.01,
                        timeout_seconds=30, stop_at_step=3, sleep=lambda _: None)
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert mtimes == {s: os.stat(os.path.join(out_dir, f'metrics_step{s}.json')).st_mtime_ns
                    for s in (1, 2)}


def test_beam_search_path_and_one_compilation(model, dev, tokenizer):
  params = _params(model, 1)
  kwargs = dict(batch_size=4, progress=False, **LENGTHS)
  for _ in range(2):  # 3 batches (the last padded) per call, twice: one compiled executable
    greedy, _ = evaluate.evaluate_records(model, params, dev[:10], tokenizer, **kwargs)
  beam, preds = evaluate.evaluate_records(model, params, dev[:10], tokenizer, beam_size=2,
                                          alpha=0.6, **kwargs)
  assert beam['count'] == greedy['count'] == 10 and len(preds) == 10
  assert all(isinstance(p['prediction'], str) for p in preds)
  target_len = LENGTHS['target_len']
  assert evaluate._cached_decode_fn(model, target_len, 1, 0.6)._cache_size() == 1
  assert evaluate._cached_decode_fn(model, target_len, 2, 0.6)._cache_size() == 1


def test_run_eval_evaluates_the_run_in_workdir_and_writes_into_it(tmp_path, config, model):
  workdir = str(tmp_path / 'work')
  _save(os.path.join(workdir, 'checkpoints'), 2, _params(model, 0), config)
  full = ml_collections.ConfigDict(config.to_dict())
  full.data = experiment.default_config().data  # run_eval resolves a whole data section
  full.data.update(source='files', **config.data)
  metrics = eval_checkpoint.run_eval(full, workdir)
  with open(os.path.join(workdir, 'eval_dev', 'metrics_step2.json')) as f:
    assert json.load(f) == metrics and metrics['step'] == 2
  with pytest.raises(CheckpointError, match='no checkpoint found'):
    eval_checkpoint.run_eval(full, str(tmp_path / 'nothing'))


def test_eval_checkpoint_field_is_deprecated_for_workdir(tmp_path, config):
  assert eval_checkpoint.default_config().beam_size == 1
  old = ml_collections.ConfigDict(config.to_dict())
  old.data = experiment.default_config().data
  old.data.update(source='files', **config.data)
  old.eval.checkpoint = str(tmp_path / 'old-run')
  with pytest.raises(ConfigError, match='deprecated.*--workdir'):
    eval_checkpoint.run_eval(old, str(tmp_path / 'run'))
  # Without a --workdir flag (run.py's default), the old field is still honoured.
  with pytest.raises(CheckpointError, match='old-run'):
    eval_checkpoint.run_eval(old, 'workdirs/embedded-fido', default_workdir=True)


def test_checkpoint_eval_converts_float32_checkpoints_to_int8_decoder_weights(tmp_path, config,
                                                                             model):
  workdir = str(tmp_path / 'work')
  _save(os.path.join(workdir, 'checkpoints'), 3, _params(model, 0), config)
  int8 = ml_collections.ConfigDict(config.to_dict())
  int8.model.decoder_weights = 'int8'  # an eval-time choice: the checkpoint says float32
  reader, params, _, _, step = eval_checkpoint.restore_reader(int8, workdir)
  assert step == 3 and reader.config.decoder_weights == 'int8'
  mlp = params['decoder/~/layer_00/~/mlp']
  assert mlp['wi'].dtype == jnp.int8 and mlp['wi_scale'].dtype == jnp.float32  # wi_0|wi_1 fused
  metrics = eval_checkpoint.evaluate_checkpoint(int8, workdir, split_path='dev', out_dir='')
  assert metrics['step'] == 3 and metrics['count'] > 0
