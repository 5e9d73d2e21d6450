"""The training loop: loss falls, exact resume after SIGKILL, NaN rollback, carry-over, bad input."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fido import checkpoint, optim, prepare, start, train, train_step
from fido import workdir as workdir_lib
from fido.config import load_config_file
from fido.data import stream
from fido.data.errors import DataError
from fido.data.has_answer import has_answer
from fido.data.sources import resolve_data
from fido.data.tokenizer import load_tokenizer
from fido.model.fid import make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic'))


def smoke_config(data_dir, **train_overrides):
  config = load_config_file(os.path.join(REPO, 'experiments/embedded.py:fido,smoke'))
  config.data.dir = data_dir
  config.train.progress = False
  config.train.update(train_overrides)
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def final_params(workdir):
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True) as ckpt:
    step = ckpt.latest_step()
    directory = ckpt.directory / str(step) / 'params'
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return step, ocp.StandardCheckpointer().restore(directory)


def test_finetune_loss_falls_and_writes_metrics(data_dir, tmp_path):
  config = smoke_config(data_dir, steps=24, log_every=4, eval_every=12, checkpoint_every=12)
  config.optimizer.learning_rate = 1e-2
  result = train.run_train(config, str(tmp_path / 'run'))
  assert result['step'] == 24 and result['test_count'] == 16
  assert 0.0 <= result['test_exact_match'] <= 1.0
  logged = [m for m in read_metrics(tmp_path / 'run') if 'loss' in m]
  assert [m['step'] for m in logged] == [4, 8, 12, 16, 20, 24]
  assert logged[-1]['loss'] < logged[0]['loss'] - 0.5
  assert all(m['examples_per_second'] > 0 for m in logged)
  assert any(m.get('event') == 'dev_eval' for m in read_metrics(tmp_path / 'run'))

  # Run again, finished: nothing is trained (no train_seconds) and the test score is not re-logged.
  again = train.run_train(config, str(tmp_path / 'run'))
  assert again['already_trained'] and 'train_seconds' not in again
  assert again['test_exact_match'] == result['test_exact_match'] and 'test_seconds' not in again
  assert [m.get('event') for m in read_metrics(tmp_path / 'run')].count('test_eval') == 1


def test_skip_bad_records_counts_and_reports_them(data_dir, tmp_path):
  config = smoke_config(data_dir, steps=2, eval_every=0, final_eval_split='')
  config.data = resolve_data(config.data)
  lines = open(config.data.train).read().splitlines()
  record = json.loads(lines[0])
  bad = [json.dumps({**record, 'ctxs': []}), '{"question": ', json.dumps({**record, 'answers': 3})]
  path = tmp_path / 'train.jsonl'
  path.write_text('\n'.join(lines[:20] + bad + lines[20:]) + '\n')
  config.data.update(source='files', train=str(path))
  with pytest.raises(DataError, match=f'{path}: line 21: field .ctxs.: zero passages'):
    train.run_train(config, str(tmp_path / 'raise'))
  config.data.on_error = 'skip'
  train.run_train(config, str(tmp_path / 'skip'))
  report = json.loads((tmp_path / 'skip' / 'data_report.json').read_text())['train']
  assert (report['read'], report['kept']) == (len(lines) + 3, len(lines))
  assert report['skipped'] == {'ctxs: zero passages': 1, 'malformed JSON': 1,
                               'answers: expected a list of strings': 1}


# A run whose steps take 0.4 s more (the step function wrapped), so it can be killed mid-way.
SLOW_RUN = '''
import sys, time
sys.path.insert(0, sys.argv[1])
from fido import train
from fido.config import load_config_file
repo, data_dir, workdir, steps = sys.argv[1:]
compile_step = train.compile_step

def slow_step(*args):
  step_fn = compile_step(*args)
  def slow(state, batch):
    time.sleep(0.4)
    return step_fn(state, batch)
  return slow

train.compile_step = slow_step
config = load_config_file(repo + '/experiments/embedded.py:fido,smoke')
config.data.dir = data_dir
config.train.update(steps=int(steps), checkpoint_every=2, progress=False)
train.run_train(config, workdir)
'''


def poisoned_at(step, compile_step=train.compile_step):
  """train.compile_step whose step function sees NaN parameters once, before update `step`."""
  def make(*args):
    step_fn, poisoned = compile_step(*args), []
    def poison(state, batch):
      if int(state.step) == step and not poisoned:
        poisoned.append(step)  # a blow-up: this update sees NaN parameters
        state = state._replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      return step_fn(state, batch)
    return poison
  return make


def test_kill_and_resume_is_bit_identical(data_dir, tmp_path):
  steps = 12
  reference = smoke_config(data_dir, steps=steps, checkpoint_every=2)
  train.run_train(reference, str(tmp_path / 'reference'))

  workdir = str(tmp_path / 'killed')
  process = subprocess.Popen([sys.executable, '-c', SLOW_RUN, REPO, data_dir, workdir, str(steps)],
                             cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '4')):
    assert process.poll() is None, 'the run ended before it could be killed'
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.1)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert killed_at < steps

  train.run_train(smoke_config(data_dir, steps=steps, checkpoint_every=2), workdir)
  step_a, params_a = final_params(str(tmp_path / 'reference'))
  step_b, params_b = final_params(workdir)
  assert step_a == step_b == steps
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


# Step 6's loss is NaN: a checkpoint step (its metrics read before the next step is dispatched)
# or not (read one step late, after step 7 was dispatched); either way step 6 is rolled back.
@pytest.mark.parametrize('checkpoint_every', [2, 4])
def test_nan_rolls_back_to_the_last_checkpoint_and_cuts_the_learning_rate(data_dir, tmp_path,
                                                                          monkeypatch,
                                                                          checkpoint_every):
  monkeypatch.setattr(train, 'compile_step', poisoned_at(5))
  config = smoke_config(data_dir, steps=8, checkpoint_every=checkpoint_every, log_every=1)
  config.train.final_eval_split = ''
  result = train.run_train(config, str(tmp_path / 'run'))
  assert result['rollbacks'] == 1 and result['step'] == 8
  metrics = read_metrics(tmp_path / 'run')
  events = [m for m in metrics if m.get('event') == 'rollback']
  assert len(events) == 1
  assert events[0]['step'] == 6 and events[0]['to_step'] == 4
  assert 'non-finite' in events[0]['reason']
  assert [m['step'] for m in metrics if 'loss' in m] == [1, 2, 3, 4, 5, 5, 6, 7, 8]
  assert events[0]['lr_scale'] == pytest.approx(0.1)
  _, params = final_params(str(tmp_path / 'run'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_metrics_are_read_one_step_late(data_dir, tmp_path, monkeypatch):
  events, compile_step, read_metrics_of = [], train.compile_step, train.read_metrics

  def counted(*args):
    step_fn = compile_step(*args)
    def step(state, batch):
      events.append(('dispatch', sum(kind == 'dispatch' for kind, _ in events) + 1))
      return step_fn(state, batch)
    return step

  def read(dispatched):
    events.append(('read', dispatched.step))
    return read_metrics_of(dispatched)

  monkeypatch.setattr(train, 'compile_step', counted)
  monkeypatch.setattr(train, 'read_metrics', read)
  config = smoke_config(data_dir, steps=6, checkpoint_every=3, eval_every=0, log_every=1,
                        final_eval_split='')
  train.run_train(config, str(tmp_path / 'run'))
  # Step s's metrics are read after step s + 1 is dispatched, except at checkpoints (steps 3, 6).
  assert events == [('dispatch', 1), ('dispatch', 2), ('read', 1), ('dispatch', 3), ('read', 2),
                    ('read', 3), ('dispatch', 4), ('dispatch', 5), ('read', 4), ('dispatch', 6),
                    ('read', 5), ('read', 6)]
  assert [m['step'] for m in read_metrics(tmp_path / 'run') if 'loss' in m] == [1, 2, 3, 4, 5, 6]


def test_divergence_monitor_detects_sustained_spikes_not_one_hard_batch():
  monitor = train.DivergenceMonitor(spike_factor=3.0, window=4, patience=3)
  assert not any(monitor.diverged(loss, True) for loss in (2.0, 2.1, 1.9, 2.0, 2.2))
  assert monitor.diverged(7.0, True) is None  # one hard batch
  assert monitor.diverged(2.0, True) is None
  assert monitor.diverged(7.0, True) is None and monitor.diverged(8.0, True) is None
  assert 'for 3 steps in a row' in monitor.diverged(9.0, True)
  assert 'non-finite' in monitor.diverged(float('nan'), True)
  assert 'non-finite' in monitor.diverged(1.0, False)
  assert np.mean(monitor.recent) < 2.2  # spikes stay out of the running mean


def test_divergence_monitor_ignores_small_absolute_rises_near_convergence():
  """Three batches at 0.22 against a running mean of 0.04 are noise, not a divergence."""
  converged = (0.04, 0.05, 0.03, 0.04)
  ratio_only = train.DivergenceMonitor(spike_factor=5.0, window=4, patience=3)
  floored = train.DivergenceMonitor(spike_factor=5.0, window=4, patience=3, min_increase=1.0)
  for monitor in (ratio_only, floored):
    assert not any(monitor.diverged(loss, True) for loss in converged)
  assert [ratio_only.diverged(0.22, True) for _ in range(3)][-1] is not None
  assert not any(floored.diverged(0.22, True) for _ in range(5))
  assert [floored.diverged(1.5, True) for _ in range(3)][-1] is not None  # > max(5 x 0.22, 0.22 + 1)


def test_finetune_from_pretraining_carries_second_moments(data_dir, tmp_path):
  pre = smoke_config(data_dir, task='pretrain', steps=3, checkpoint_every=3)
  pre.data.inputs_length = 32
  pre.optimizer = optim.pretraining_config()
  train.run_train(pre, str(tmp_path / 'pre'))

  fine = smoke_config(data_dir, steps=1)
  fine.optimizer.name = 'fido_adafactor'
  fine.init.checkpoint = str(tmp_path / 'pre')
  model = make_model(fine.model)
  optimizer = optim.make_optimizer(fine.optimizer)
  batch = {'passage_ids': np.ones((1, 1, 4), np.int32), 'passage_mask': np.ones((1, 1, 4), bool),
           'target_ids': np.ones((1, 2), np.int32)}
  fresh = jax.jit(lambda: train_step.init_train_state(
      model, optimizer, jax.random.PRNGKey(0), batch))()
  carried = start.init_from_pretrained(fine, fresh, optimizer)
  with checkpoint.Checkpointer(os.path.join(tmp_path, 'pre', 'checkpoints'), read_only=True) as c:
    _, pre_opt = c.restore_optimizer_state(jax.eval_shape(
        optim.make_optimizer(pre.optimizer).init, fresh.params))
  pre_v = jax.tree.leaves(pre_opt[0].v)
  assert any(np.abs(v).max() > 0 for v in pre_v)
  for got, want in zip(jax.tree.leaves(carried.opt_state[0].v), pre_v):
    np.testing.assert_array_equal(got, want)

  fine.init.carry_second_moments = False
  not_carried = start.init_from_pretrained(fine, fresh, optimizer)
  assert all(np.abs(v).max() == 0 for v in jax.tree.leaves(not_carried.opt_state[0].v))


def test_bad_inputs_fail_clearly(data_dir, tmp_path):
  config = smoke_config(data_dir)
  workdir_lib.prepare_workdir(config, str(tmp_path / 'run'), overwrite=False)
  other = smoke_config(data_dir)
  other.model.decoder.cross_attention_period = 1
  with pytest.raises(ValueError, match=r"holds a different run .*'model'.*--overwrite"):
    workdir_lib.prepare_workdir(other, str(tmp_path / 'run'), overwrite=False)
  workdir_lib.prepare_workdir(other, str(tmp_path / 'run'), overwrite=True)  # replaces it

  missing = smoke_config(data_dir)
  missing.init.checkpoint = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='no checkpoint found'):
    train.run_train(missing, str(tmp_path / 'missing'))

  odd_batch = smoke_config(data_dir)
  odd_batch.train.batch_size = 15
  odd_batch.train.gradient_accumulation_steps = 2
  with pytest.raises(ValueError, match='batch_size=15 is not divisible'):
    train.run_train(odd_batch, str(tmp_path / 'odd'))

  bad_task = smoke_config(data_dir, task='distill')
  with pytest.raises(ValueError, match="config.train.task='distill'"):
    train.run_train(bad_task, str(tmp_path / 'task'))

  small_vocab = smoke_config(data_dir)
  small_vocab.model.vocab_size = 256
  with pytest.raises(ValueError, match='needs vocab_size 768 > config.model.vocab_size=256'):
    train.run_train(small_vocab, str(tmp_path / 'vocab'))


def curriculum_config(data_dir, **train_overrides):
  config = smoke_config(data_dir, eval_every=0, final_eval_split='', **train_overrides)
  config.data.curriculum.update(n_passages=(1, 2), steps=(2, 2))
  return config


def test_passage_curriculum_feeds_gold_passages_first(data_dir):
  config = curriculum_config(data_dir)
  config.data = resolve_data(config.data)
  tokenizer = load_tokenizer(config.data.tokenizer)
  records = stream.read_train_data(config)

  def first_passages(stage, answer_first=True):
    """(has the answer, is the record's top-scored passage) for each example's first passage."""
    config.data.curriculum.answer_first = answer_first
    batch = next(iter(stream.make_train_loader(config, tokenizer, records, stage)))
    assert batch['passage_ids'].shape[1] == (1, 2, 10)[stage]
    firsts = []
    for ids, i in zip(batch['passage_ids'][:, 0], batch['example_index']):
      text = tokenizer.decode([t for t in ids if t > 1])
      top = records[i]['ctxs'][0]
      firsts.append((has_answer(records[i]['answers'], text),
                     text.endswith(f"title: {top['title']} context: {top['text']}")))
    return firsts

  assert all(gold for gold, _ in first_passages(0)) and all(gold for gold, _ in first_passages(1))
  assert all(top for _, top in first_passages(2))  # the last stage reads the retriever's order
  assert all(top for _, top in first_passages(0, answer_first=False))
  assert [stream.data_stage(config, s) for s in range(6)] == [0, 0, 1, 1, 2, 2]


def test_progress_shows_one_bar_per_curriculum_stage(data_dir):
  config = smoke_config(data_dir, steps=8)
  config.train.progress = True
  config.data.curriculum.update(n_passages=(1, 4), steps=(2, 3))
  assert stream.stage_plan(config) == [(0, 2, '1 passage'), (2, 5, '4 passages'),
                                      (5, 8, '10 passages')]
  out = io.StringIO()
  bar = stream.StageProgress(config, 0, file=out)
  for step in range(1, 9):
    bar.update(step)
  bar.close()
  final = {line.split(':')[0]: line for line in out.getvalue().replace('\r', '\n').splitlines()
           if line.startswith('stage')}
  assert sorted(final) == ['stage 1/3 (1 passage)', 'stage 2/3 (4 passages)',
                           'stage 3/3 (10 passages)']
  assert ' 2/2 ' in final['stage 1/3 (1 passage)'] and ' 3/3 ' in final['stage 3/3 (10 passages)']
  # A resumed run (or a rollback) shows the stage of its next step, with that stage's steps done.
  out = io.StringIO()
  stream.StageProgress(config, 3, file=out).close()
  assert 'stage 2/3 (4 passages)' in out.getvalue() and ' 1/3 ' in out.getvalue()
  # A curriculum longer than the run is cut; pre-training is one stage.
  config.train.steps = 3
  assert stream.stage_plan(config) == [(0, 2, '1 passage'), (2, 3, '4 passages')]
  config.data.curriculum.update(n_passages=(), steps=())
  config.train.task = 'pretrain'
  assert stream.stage_plan(config) == [(0, 3, 'pre-training')]


def test_passage_curriculum_resumes_exactly_at_stage_boundaries(data_dir, tmp_path):
  train.run_train(curriculum_config(data_dir, steps=6, log_every=1), str(tmp_path / 'reference'))
  logged = [m['n_passages'] for m in read_metrics(tmp_path / 'reference') if 'loss' in m]
  assert logged == [1, 1, 2, 2, 10, 10]

  workdir = str(tmp_path / 'resumed')
  for steps in (2, 4, 6):  # each run stops where the next stage begins; the next one resumes
    train.run_train(curriculum_config(data_dir, steps=steps), workdir)
  step_a, params_a = final_params(str(tmp_path / 'reference'))
  step_b, params_b = final_params(workdir)
  assert step_a == step_b == 6
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('field, value, message', [
    ('n_passages', (1,), r'n_passages=\(1,\) and steps=\(2, 2\) must have one entry per stage'),
    ('steps', (0, 2), r'curriculum.steps=\(0, 2\): every entry must be an int >= 1'),
])
def test_bad_curriculum_fails_clearly(data_dir, tmp_path, field, value, message):
  config = curriculum_config(data_dir)
  config.data.curriculum[field] = value
  with pytest.raises(ValueError, match=message):
    train.run_train(config, str(tmp_path / 'run'))


def test_a_curriculum_may_fill_the_run_but_one_cut_short_is_reported(data_dir, caplog):
  config = curriculum_config(data_dir, steps=4)  # two stages of 2 steps: the run is the curriculum
  with caplog.at_level(logging.WARNING):
    stream.validate_curriculum(config)
  assert not caplog.records
  assert stream.stage_plan(config) == [(0, 2, '1 passage'), (2, 4, '2 passages')]
  config.train.steps = 3
  with caplog.at_level(logging.WARNING):
    stream.validate_curriculum(config)
  assert 'add up to 4 > config.train.steps=3: this run ends inside the curriculum' in caplog.text


def test_curriculum_is_for_finetuning(data_dir, tmp_path):
  config = curriculum_config(data_dir, task='pretrain')
  with pytest.raises(ValueError, match="curriculum is for fine-tuning; config.train.task='pretrain'"):
    train.run_train(config, str(tmp_path / 'run'))


def uptraining_config(data_dir, **train_overrides):
  """The embedded FiDO (multi-query decoder) smoke run, its first 3 steps multi-head."""
  overrides = dict(eval_every=0, final_eval_split='', log_every=1, checkpoint_every=2,
                   keep_checkpoints=5, mha_steps=3)
  overrides.update(train_overrides)
  return smoke_config(data_dir, **overrides)


def test_uptraining_pools_the_multi_head_twin_into_multi_query_and_resumes_exactly(data_dir,
                                                                                      tmp_path):
  reference = str(tmp_path / 'reference')
  result = train.run_train(uptraining_config(data_dir, steps=6), reference)
  assert result['step'] == 6 and result['mha_steps'] == 3
  twin_dir = os.path.join(reference, train.MULTI_HEAD_DIR)
  cross = 'decoder/~/layer_01/~/cross_attention'
  twin_step, twin_params = final_params(twin_dir)
  assert twin_step == 3
  heads = uptraining_config(data_dir).model.decoder.num_heads
  d_enc, d_kv = twin_params[cross]['key'].shape[0], twin_params[cross]['key'].shape[-1]
  assert twin_params[cross]['key'].shape == (d_enc, heads, d_kv)  # multi-head

  # The multi-query run starts from the mean-pooled twin at step 3 and trains steps 4-6.
  with checkpoint.Checkpointer(os.path.join(reference, 'checkpoints'), read_only=True) as ckpt:
    assert ckpt.all_steps() == [3, 4, 6]
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    pooled = ocp.StandardCheckpointer().restore(ckpt.directory / '3' / 'params')
  np.testing.assert_allclose(pooled[cross]['key'], twin_params[cross]['key'].mean(axis=1),
                             rtol=1e-6)
  np.testing.assert_array_equal(pooled['encoder/~/layer_00/~/mlp']['wi_0'],
                                twin_params['encoder/~/layer_00/~/mlp']['wi_0'])
  _, final = final_params(reference)
  assert final[cross]['key'].shape == (d_enc, d_kv)  # multi-query
  assert [m['step'] for m in read_metrics(reference) if 'loss' in m] == [4, 5, 6]
  assert [m['step'] for m in read_metrics(twin_dir) if 'loss' in m] == [1, 2, 3]

  # Interrupted inside the twin, again right after pooling, then finished: bit-identical.
  workdir = str(tmp_path / 'resumed')
  twin = start.multi_head_twin(uptraining_config(data_dir, steps=6))
  twin.train.steps = 2
  train.run_train(twin, os.path.join(workdir, train.MULTI_HEAD_DIR))
  for steps in (4, 6):
    train.run_train(uptraining_config(data_dir, steps=steps), workdir)
  _, resumed = final_params(workdir)
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_bad_uptraining_fails_clearly_and_multi_head_models_ignore_it(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r'mha_steps=6 must be an int in \[0, config.train.steps=6\)'):
    train.run_train(uptraining_config(data_dir, steps=6, mha_steps=6), str(tmp_path / 'long'))
  config = uptraining_config(data_dir, steps=4)
  config.model = load_config_file(os.path.join(REPO, 'experiments/embedded.py:fid,smoke')).model
  result = train.run_train(config, str(tmp_path / 'mha'))  # already multi-head: nothing to uptrain
  assert result['step'] == 4 and 'mha_steps' not in result
  assert not os.path.exists(tmp_path / 'mha' / train.MULTI_HEAD_DIR)
  assert [m['step'] for m in read_metrics(tmp_path / 'mha') if 'loss' in m] == [1, 2, 3, 4]


def test_stream_state_is_the_position_the_step_implies(data_dir):
  """The data state is {'stage', 'batches'}, a function of the step (no reader position of one
  process), so it resumes on any process count; an older checkpoint's grain bytes are not read."""
  config = curriculum_config(data_dir, steps=6)
  config.data = resolve_data(config.data)
  tokenizer = load_tokenizer(config.data.tokenizer)
  records = stream.read_train_data(config)
  fresh = stream.DataStream(config, tokenizer, records)
  batches = [fresh.next(step)['example_index'] for step in range(5)]
  assert fresh.get_state() == {'stage': 2, 'batches': 1}  # steps 0-1: stage 0, 2-3: 1, 4: 2
  fresh.close()
  for step, state in ((3, {'stage': 1, 'batches': 1}), (4, {'stage': 1, 'batches': 2}),
                      (3, b'{"grain": "bytes"}')):
    resumed = stream.DataStream(config, tokenizer, records)
    resumed.set_state(step, state)
    assert (resumed.next(step)['example_index'] == batches[step]).all()
    resumed.close()
  with pytest.raises(ValueError, match=r"step 3, \{'stage': 1, 'batches': 2\}, does not match"):
    stream.DataStream(config, tokenizer, records).set_state(3, {'stage': 1, 'batches': 2})


def test_tfds_source_trains_and_evaluates_like_the_files(data_dir, tmp_path):
  """source='tfds' (prepared by run.py --mode=prepare) reads the same records in the same order as
  the files it was prepared from: the same batches, losses and test metrics."""
  files = smoke_config(data_dir, steps=2, eval_every=0, log_every=1)
  files.data = resolve_data(files.data)
  files.data.source = 'files'
  streamed = smoke_config(data_dir, steps=2, eval_every=0, log_every=1)
  streamed.data.update(source='tfds', tokenizer=files.data.tokenizer)
  streamed.data.tfds.update(dir=str(tmp_path / 'tfds'), name='smoke')
  to_prepare = ml_collections.ConfigDict(files.to_dict())
  to_prepare.data.tfds = streamed.data.tfds
  prepare.run_prepare(to_prepare)
  results = [train.run_train(c, str(tmp_path / name)) for c, name in ((files, 'files'),
                                                                       (streamed, 'tfds'))]
  assert results[0]['test_f1'] == results[1]['test_f1']
  assert results[0]['test_count'] == results[1]['test_count'] == 16
  assert ([m['loss'] for m in read_metrics(tmp_path / 'files') if 'loss' in m] ==
          [m['loss'] for m in read_metrics(tmp_path / 'tfds') if 'loss' in m])
  # Pre-training reads the corpus prepared beside it (text_corpus/<name>), in file order.
  streamed.train.task = 'pretrain'
  documents = stream.read_train_data(streamed)
  with open(files.data.corpus) as f:
    assert [documents[i] for i in range(len(documents))] == [l.strip() for l in f if l.strip()]
