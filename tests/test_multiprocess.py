"""Two processes on 127.0.0.1, really run: `run.py` under JAX's multi-controller runtime.

Every run here is `python run.py` in fresh processes on the CPU backend (cross-process
collectives: gloo, JAX's default), configured as README "Running on many hosts" says:
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, and XLA_FLAGS'
--xla_force_host_platform_device_count for the devices of each process. One process with 2
devices and two processes with 1 device each run the same mesh (data=2) and global batch:
  - training gives the same losses and final params;
  - a checkpoint written by 2 processes resumes in 1, and one written by 1 resumes in 2;
  - SIGKILL one of 2 processes mid-run, restart both: the run finishes identical to an
    uninterrupted one;
  - evaluation shards the records over the processes and writes one predictions file, identical
    to the single-process one.
One test, so that pytest-xdist never runs the (process-heavy) reference runs twice.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# The smoke model cut to 1 encoder and 2 decoder layers (one cross-attention layer): every
# 2-process launch compiles from scratch in process 1 (JAX writes its persistent cache from
# process 0 only, and on CPU the cache key holds the process's devices), so compile time is
# most of this test's cost and it scales with the layers.
MODEL = ('--config.model.encoder.num_layers=1', '--config.model.decoder.size=custom',
         '--config.model.decoder.num_layers=2')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, processes, *flags, log_dir, mode='train', tag='run'):
  """`run.py` in `processes` processes (2 devices in all); returns their Popen objects."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={2 // processes}').strip()
  if jax.config.jax_compilation_cache_dir:  # tests/conftest.py's cache, shared with the children
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = str(
        jax.config.jax_persistent_cache_min_compile_time_secs)
  port = free_port()
  argv = [sys.executable, 'run.py', f'--mode={mode}', '--config=experiments/embedded.py:fido,smoke',
          f'--workdir={workdir}', f'--config.data.dir={log_dir}/data',
          '--config.train.progress=False', f'--config.train.steps={STEPS}',
          '--config.train.checkpoint_every=2',
          '--config.train.eval_every=0', '--config.eval.progress=False', *MODEL, *flags]
  procs = []
  for i in range(processes):
    if processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i))
    out = open(os.path.join(log_dir, f'{tag}.{i}.out'), 'w')
    err = open(os.path.join(log_dir, f'{tag}.{i}.err'), 'w')
    procs.append(subprocess.Popen(argv, cwd=REPO, env=dict(env), stdout=out, stderr=err))
    procs[-1].logs = (out.name, err.name)
  return procs


def finish(procs, timeout=400):
  """Waits for the processes; their last stdout lines (the results) as dicts."""
  results = []
  for p in procs:
    p.wait(timeout=timeout)
    with open(p.logs[1]) as f:
      assert p.returncode == 0, f'{p.args}: exit {p.returncode}\n{f.read()[-3000:]}'
    with open(p.logs[0]) as f:
      results.append(json.loads(f.read().splitlines()[-1]))
  return results


def saved_steps(directory):
  """The finished checkpoint steps in `directory` (orbax renames a step's directory when done)."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(name) for name in names if name.isdigit())


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(m['step'], m['loss']) for m in map(json.loads, f) if 'loss' in m]


def params_at(workdir, step):
  """A checkpoint's params as numpy, whatever mesh wrote them."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'params')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        getattr(metadata, 'item_metadata', metadata))
  return jax.device_get(checkpointer.restore(path, target))


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def truncated_copy(workdir, dest, step):
  """`workdir` as it was after checkpoint `step`: later checkpoints and metrics removed."""
  shutil.copytree(workdir, dest)
  for name in os.listdir(os.path.join(dest, 'checkpoints')):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(dest, 'checkpoints', name))
  path = os.path.join(dest, 'metrics.jsonl')
  with open(path) as f:
    kept = [line for line in f if json.loads(line)['step'] <= step]
  with open(path, 'w') as f:
    f.writelines(kept)
  return str(dest)


def test_two_processes_train_resume_and_evaluate_like_one(tmp_path):
  logs = str(tmp_path)
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  # The reference runs: 1 process with 2 devices, 2 processes with 1 each (test eval included).
  ref = start(one, 1, log_dir=logs, tag='one') + start(two, 2, log_dir=logs, tag='two')
  # A 2-process run to be killed (its length is not part of the run: it resumes with STEPS).
  killed = str(tmp_path / 'killed')
  victim = start(killed, 2, '--config.train.steps=1000', '--config.train.final_eval_split=',
                 log_dir=logs, tag='killed')
  # SIGKILL one process as soon as a checkpoint is written, then the other (it would otherwise
  # wait for the heartbeat timeout); restarted below, the run ends as the uninterrupted one.
  checkpoints = os.path.join(killed, 'checkpoints')
  deadline = time.time() + 400
  while not saved_steps(checkpoints):
    assert all(p.poll() is None for p in victim), 'the run ended before it could be killed'
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)
  victim[1].send_signal(signal.SIGKILL)
  time.sleep(1.0)
  victim[0].send_signal(signal.SIGKILL)
  for p in victim:
    p.wait()
  saved = saved_steps(checkpoints)
  assert max(saved) < STEPS, f'killed too late, after checkpoints {saved}'
  result_one, *results_two = finish(ref)

  # Same global batch and mesh: the same losses and final params, the same test metrics.
  assert [s for s, _ in losses(one)] == [2, 4]
  np.testing.assert_allclose([l for _, l in losses(two)], [l for _, l in losses(one)], rtol=1e-5)
  assert max_diff(params_at(one, STEPS), params_at(two, STEPS)) < 1e-5
  for result in results_two:  # every process reports the same (sharded) test evaluation
    assert result['step'] == STEPS and result['test_count'] == 16
    assert (result['test_exact_match'], result['test_f1']) == (
        result_one['test_exact_match'], result_one['test_f1'])

  # Checkpoints cross process counts: 2 processes' step-2 checkpoint finishes in 1 process, and
  # 1 process's in 2; each ends where the runs above did.
  two_to_one = truncated_copy(two, tmp_path / 'two_to_one', 2)
  one_to_two = truncated_copy(one, tmp_path / 'one_to_two', 2)
  no_eval = '--config.train.final_eval_split='
  resumed = (start(killed, 2, no_eval, log_dir=logs, tag='restarted')
             + start(two_to_one, 1, no_eval, log_dir=logs, tag='two_to_one')
             + start(one_to_two, 2, no_eval, log_dir=logs, tag='one_to_two'))
  # Evaluation of the reference run's last checkpoint, in 1 process and in 2.
  eval_one = truncated_copy(one, tmp_path / 'eval_one', STEPS)
  eval_two = truncated_copy(one, tmp_path / 'eval_two', STEPS)
  evals = (start(eval_one, 1, '--config.eval.split=test', '--config.eval.batch_size=6',
                 mode='eval', log_dir=logs, tag='eval_one')
           + start(eval_two, 2, '--config.eval.split=test', '--config.eval.batch_size=6',
                   mode='eval', log_dir=logs, tag='eval_two'))
  restarted = finish(resumed)[:2]
  assert all('train_seconds' in r for r in restarted)  # it trained on from a checkpoint
  assert max_diff(params_at(killed, STEPS), params_at(two, STEPS)) == 0.0  # bit-identical
  assert losses(killed)[-1] == losses(two)[-1]
  assert max_diff(params_at(two_to_one, STEPS), params_at(two, STEPS)) < 1e-5
  assert max_diff(params_at(one_to_two, STEPS), params_at(one, STEPS)) < 1e-5
  assert [s for s, _ in losses(two_to_one)] == [2, 4]

  # One predictions file, in record order, identical; the same EM and F1.
  metrics_one, *metrics_two = finish(evals)
  for metrics in metrics_two:
    for key in ('exact_match', 'f1', 'count', 'step'):
      assert metrics[key] == metrics_one[key], key
  out_one, out_two = (os.path.join(w, 'eval_test') for w in (eval_one, eval_two))
  assert sorted(os.listdir(out_two)) == ['metrics_step4.json', 'predictions_step4.jsonl']
  with open(os.path.join(out_one, 'predictions_step4.jsonl')) as f:
    predictions_one = f.read()
  with open(os.path.join(out_two, 'predictions_step4.jsonl')) as f:
    assert f.read() == predictions_one
  with open(os.path.join(logs, 'data', 'test.jsonl')) as f:
    questions = [json.loads(line)['question'] for line in f]
  assert [json.loads(line)['question'] for line in predictions_one.splitlines()] == questions
