"""`run.py --mode=data_bench`: the training data path at scale, source='files' against 'tfds'.

  python run.py --mode=data_bench --config=experiments/fid.py:base \
      --config.data.tokenizer=tests/fixtures/t5_spiece.model

For each size in config.data_bench.records it generates (once, into config.data_bench.dir) a
FiD-format JSONL file of that many records of `passages` passages of `words` words (drawn from
the tokenizer's whole-word pieces, so ~1.2 tokens a word), prepares it as array_record (timed,
`fido.prepare`), then measures each source in a fresh process, as a training process starts:
  peak_rss_mib             the process's peak resident memory once its first batch is ready
                           (imports, tokenizer, the training data as `fido.train` reads it, the
                           stream and its first batch; the model is not built: its memory does not
                           depend on the data source)
  first_batch_seconds      from the process's start to its first batch
  examples_per_second      the stream's batches after the first (config.data_bench.batches of
                           config.data_bench.batch_size examples of passages x passage_len tokens),
                           one process, config.data.worker_count grain workers
  examples_per_cpu_second  the same per CPU-second of the process (its threads, not its workers):
                           one core's rate, whatever else the machine runs
Alongside: what a FiD-base train step consumes per accelerator at its peak FLOP rate (3x the
forward FLOPs of fido.analysis at passages x passage_len tokens and 32 target tokens).
"""

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import ml_collections
import numpy as np
import tqdm

from fido import analysis
from fido import prepare as prepare_lib
from fido.config import model_config
from fido.data.sources import resolve_data
from fido.data.stream import DataStream, read_train_data
from fido.data.tokenizer import load_tokenizer
from fido.files import atomic_write

SOURCES = ('files', 'tfds')


def default_config() -> ml_collections.ConfigDict:
  """The `config.data_bench` section."""
  return ml_collections.ConfigDict(dict(
      records=(2000, 20000), passages=100, words=100, passage_len=256, batch_size=8,
      batches=20, seed=0, dir='data/generated/data_bench',
      devices=('tpu-v4', 'h100-sxm'),  # train-step consumption of FiD-base at their peak
  ))


def word_list(tokenizer) -> list[str]:
  """The tokenizer's whole-word pieces of 3+ letters: text that tokenizes like prose."""
  pieces = (tokenizer.piece(i) for i in range(tokenizer.num_pieces))
  return sorted({p[1:] for p in pieces if p.startswith('\u2581') and p[1:].isalpha()
                 and len(p) > 3})


def generate_fid_file(path: str, n_records: int, n_passages: int, n_words: int,
                      words: list[str], seed: int = 0) -> None:
  """A FiD-format JSONL file of random-word records (deterministic in `seed`); a progress bar."""
  rng = np.random.default_rng(seed)
  vocab = np.asarray(words, dtype=object)
  text = lambda n: ' '.join(vocab[rng.integers(len(vocab), size=n)])
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for i in tqdm.tqdm(range(n_records), desc=f'generating {os.path.basename(path)}',
                       unit='record', file=sys.stderr):
      answer = text(2)
      ctxs = [dict(title=text(3), text=text(n_words), score=float(n_passages - p), id=str(p))
              for p in range(n_passages)]
      f.write(json.dumps(dict(question=text(10) + '?', answers=[answer], ctxs=ctxs)) + '\n')
  os.replace(tmp, path)


def measure(config: ml_collections.ConfigDict, started: float) -> dict[str, float]:
  """In a fresh process started at time.time() = `started`: the training data path of `config`
  up to its first batch, then its loader throughput (see the module docstring)."""
  config.data = resolve_data(config.data)
  stream = DataStream(config, load_tokenizer(config.data.tokenizer), read_train_data(config))
  first = stream.next(0)
  first_seconds = time.time() - started
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start, cpu_start = time.perf_counter(), time.process_time()
  n = config.data_bench.batches
  for step in range(1, n + 1):
    batch = stream.next(step)
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  stream.close()
  assert batch['passage_ids'].shape == first['passage_ids'].shape
  examples = n * config.train.batch_size
  return dict(peak_rss_mib=round(peak, 1), first_batch_seconds=round(first_seconds, 2),
              examples_per_second=round(examples / seconds, 1),
              examples_per_cpu_second=round(examples / cpu_seconds, 1),
              batch_shape=list(first['passage_ids'].shape))


def _measure_in_child(config: ml_collections.ConfigDict) -> dict[str, float]:
  code = ('import json, sys, ml_collections; from absl import flags; '
          'from fido import data_bench; flags.FLAGS(sys.argv[:1]); '  # grain's workers read flags
          'print(json.dumps(data_bench.measure(ml_collections.ConfigDict(json.load(sys.stdin)), '
          f'{time.time()!r})))')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code], input=json.dumps(config.to_dict()),
                        capture_output=True, text=True, env=env, check=False)
  if proc.returncode:
    raise RuntimeError(f'data_bench child failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def step_consumption(passages: int, passage_len: int, devices) -> dict[str, float]:
  """FiD-base training examples/s one accelerator consumes at its peak: peak FLOP/s over 3x the
  forward FLOPs per example (fido.analysis, bfloat16; 32 target tokens)."""
  setting = analysis.Setting(batch_size=1, n_passages=passages, passage_len=passage_len,
                             target_len=32)
  flops = 3 * analysis.flops_per_sample(model_config('base', dtype='bfloat16'), setting)['total']
  return {d: round(analysis.get_device(d).peak_flops / flops, 1) for d in devices}


def run_data_bench(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """One row per (records, source); see the module docstring."""
  bench = config.data_bench
  tokenizer = load_tokenizer(config.data.tokenizer)
  os.makedirs(bench.dir, exist_ok=True)
  consumption = step_consumption(bench.passages, bench.passage_len, bench.devices)
  rows = []
  for n in bench.records:
    path = os.path.abspath(os.path.join(
        bench.dir, f'fid_{n}x{bench.passages}x{bench.words}_seed{bench.seed}.jsonl'))
    if not os.path.isfile(path):
      generate_fid_file(path, n, bench.passages, bench.words, word_list(tokenizer), bench.seed)
    run = ml_collections.ConfigDict(config.to_dict())
    run.data.update(source='files', train=path, dev='', test='', corpus='',
                    n_passages=bench.passages, passage_len=bench.passage_len, target_len=32)
    run.data.curriculum.update(n_passages=(), steps=())
    run.data.tfds.update(dir=os.path.join(os.path.abspath(bench.dir), 'tfds'), name=f'bench{n}')
    run.train.update(task='finetune', batch_size=bench.batch_size)
    prepared = prepare_lib.run_prepare(run)['fid']
    for source in SOURCES:
      run.data.source = source
      row = dict(records=n, source=source, file_mib=round(os.path.getsize(path) / 2**20, 1),
                 **_measure_in_child(run))
      if source == 'tfds':
        row.update(prepare_seconds=prepared['seconds'], prepared_before=prepared['already_prepared'])
      row['fid_base_step_examples_per_second'] = consumption
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  atomic_write(os.path.join(bench.dir, 'results.jsonl'), ''.join(json.dumps(r) + '\n'
                                                                   for r in rows))
  return rows
