"""--mode=data_bench at toy size: files and tfds measured in fresh processes, the same batches."""

import json
import os

from fido import data_bench
from fido.config import load_config_file
from fido.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPIECE = os.path.join(REPO, 'tests', 'fixtures', 't5_spiece.model')


def test_generated_file_and_both_sources_measured(tmp_path):
  config = load_config_file(os.path.join(REPO, 'experiments/fid.py:tiny'))
  config.data.tokenizer = SPIECE
  config.data_bench.update(records=(12,), passages=3, words=20, passage_len=64, batch_size=2,
                           batches=2, dir=str(tmp_path))
  words = data_bench.word_list(load_tokenizer(SPIECE))
  assert len(words) > 10_000 and all(w.isalpha() for w in words)
  rows = data_bench.run_data_bench(config)
  assert [(r['records'], r['source']) for r in rows] == [(12, 'files'), (12, 'tfds')]
  for row in rows:
    assert row['batch_shape'] == [2, 3, 64]
    assert row['peak_rss_mib'] > 50 and row['first_batch_seconds'] > 0
    assert row['examples_per_second'] > 0 and row['examples_per_cpu_second'] > 0
  assert rows[1]['prepare_seconds'] >= 0
  # FiD-base at 3 x 64 tokens: a TPU v4 at peak consumes fewer examples/s than an H100.
  assert 0 < rows[0]['fid_base_step_examples_per_second']['tpu-v4'] < rows[0][
      'fid_base_step_examples_per_second']['h100-sxm']
  with open(tmp_path / 'fid_12x3x20_seed0.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 12 and all(len(r['ctxs']) == 3 for r in records)
  assert len(records[0]['ctxs'][0]['text'].split()) == 20
  assert (tmp_path / 'results.jsonl').read_text().count('\n') == 2
