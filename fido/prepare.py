"""`run.py --mode=prepare`: FiD files and a text corpus -> array_record data sets for source='tfds'.

  python run.py --mode=prepare --config=experiments/fido.py:base-xl \
      --config.data.train=/data/nq/train.json --config.data.dev=/data/nq/dev.json \
      --config.data.test=/data/nq/test.json --config.data.tfds.name=nq \
      --config.data.tfds.dir=/data/tfds
  python run.py --mode=train ... --config.data.source=tfds --config.data.tfds.name=nq \
      --config.data.tfds.dir=/data/tfds --config.data.tokenizer=/data/spiece.model

Reads `config.data.{train, dev, test}` (those set; with source='synthetic', the generated files)
and writes `{tfds.dir}/fid_qa/{tfds.name}/1.0.0/` (fido.data.tfds_builders, records in file order);
`config.data.corpus`, when set, becomes `{tfds.dir}/text_corpus/{tfds.name}/1.0.0/` for
pre-training. One pass over the files with a progress bar per split, in constant memory; bad
records are handled by `config.data.on_error` as when reading the files directly.

Idempotent: a data set already prepared under that name is left as it is (and reported as such),
unless it was prepared from other files: that is an error (choose another name, or delete the
directory to prepare it again). Preparation writes into a temporary directory and renames it when
done, so an interrupted one leaves nothing that counts as prepared.
"""

import json
import logging
import os
import time
from typing import Any

import ml_collections

from fido.data import tfds_builders
from fido.data.errors import DataError
from fido.data.sources import resolve_data

_LOG = logging.getLogger(__name__)
FID_SPLITS = ('train', 'dev', 'test')


def _sources_file(data_dir: str, builder: str, name: str) -> str:
  return os.path.join(data_dir, builder, name, 'sources.json')


def _check_same_sources(path: str, sources: dict[str, Any]) -> bool:
  """Whether a data set was prepared (True) from `sources`; DataError if from others."""
  if not os.path.isfile(path):
    return False
  with open(path, encoding='utf-8') as f:
    prepared = json.load(f)
  if prepared != sources:
    raise DataError(f'{os.path.dirname(path)} was prepared from {prepared}, not {sources}: use '
                    'another config.data.tfds.name, or delete that directory to prepare it again')
  return True


def _prepare(data_dir: str, builder: str, name: str, sources: dict[str, Any], make) -> dict:
  path = _sources_file(data_dir, builder, name)
  done = _check_same_sources(path, sources)
  start = time.perf_counter()
  result = make()
  if not done:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(sources, f, indent=1, sort_keys=True)
  out = dict(path=result.path, records=result.records, already_prepared=done,
             seconds=round(time.perf_counter() - start, 1))
  skipped = {split: dict(r.skipped) for split, r in result.reports.items() if r.skipped}
  if skipped:  # on_error='skip'
    out['skipped'] = skipped
  return out


def run_prepare(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Prepares config.data's FiD files (and corpus) under config.data.tfds; returns what it did."""
  data = config.data
  if not data.tfds.name:
    raise DataError('config.data.tfds.name is empty: name the data set to prepare, e.g. '
                    '--config.data.tfds.name=nq')
  if data.source == 'synthetic':
    data = resolve_data(data)
  files = {split: os.path.abspath(data[split]) for split in FID_SPLITS if data[split]}
  if not files and not data.corpus:
    raise DataError('nothing to prepare: set config.data.train / dev / test (FiD files) and/or '
                    'config.data.corpus (a text corpus)')
  for path in [*files.values(), *([data.corpus] if data.corpus else [])]:
    if not os.path.isfile(path):
      raise FileNotFoundError(2, 'No such file', path)
  described = lambda paths: {split: dict(path=p, bytes=os.path.getsize(p))
                             for split, p in paths.items()}
  data_dir = os.path.abspath(os.path.expanduser(data.tfds.dir))
  result = dict(dir=data_dir)
  if files:
    result['fid'] = _prepare(
        data_dir, tfds_builders.FID_BUILDER, data.tfds.name, described(files),
        lambda: tfds_builders.prepare_fid_dataset(data_dir, data.tfds.name, files,
                                                  n_passages=data.n_passages,
                                                  on_error=data.on_error))
  if data.corpus:
    corpus = {'train': os.path.abspath(data.corpus)}
    result['corpus'] = _prepare(
        data_dir, tfds_builders.TEXT_BUILDER, data.tfds.name, described(corpus),
        lambda: tfds_builders.prepare_text_corpus(data_dir, data.tfds.name, corpus))
  return result
