"""Where the data comes from: the `config.data` section and its resolution to files on disk.

  source='synthetic'  generated locally into `dir` (the embedded default, tests)
  source='files'      FiD-format files (JSON / JSONL) and a text corpus, read whole into every
                      process's memory: for small data (a 2,000-record file of 100 passages takes
                      ~0.2 GB per process; README "Streaming data")
  source='tfds'       the same files prepared once (`run.py --mode=prepare`) as array_record
                      datasets under `tfds.dir`: read by random access, each process only the
                      records it uses (fido.data.tfds_builders); the way for real data
"""

import os
import sys

import ml_collections

from fido.data import synthetic
from fido.data.errors import DataError
from fido.errors import MissingInputError


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` section: synthetic retrieval-QA (generated locally) or FiD-format files."""
  return ml_collections.ConfigDict(dict(
      source='synthetic',    # 'synthetic' (generated into `dir`) | 'files' (the paths below,
                             # read whole) | 'tfds' (prepared from them by --mode=prepare)
      dir='data/generated/synthetic',
      tokenizer='', train='', dev='', test='', corpus='',  # filled in for 'synthetic'
      # source='tfds': array_record data sets under `dir`: fid_qa/<name> (splits train, dev, test)
      # and, for pre-training, text_corpus/<name> or `corpus` (a prepared name such as 'c4/en').
      tfds=dict(dir='data/tfds', name='', corpus=''),
      n_passages=10, passage_len=256, target_len=32,
      answer_choice='first',  # training target when there is no `target`: 'first' | 'random'
      on_error='raise',       # a bad record: 'raise' (DataError) | 'skip' (counted, reported)
      worker_count=0,         # training loader: grain worker processes (0: in this process). A
                              # run resumes with the same processes x workers (else it is refused)
      inputs_length=512,      # pre-training (span corruption) input length; targets follow
      synthetic=dict(seed=0, n_train=3000, n_dev=300, n_test=300, answer_position='early',
                     vocab_size=600),
      # Passage curriculum for fine-tuning (FiD, Izacard & Grave 2021, §4.3, trained on few
      # passages before many): stage i trains `steps[i]` steps on `n_passages[i]` passages per
      # example, answer-bearing passages first when `answer_first`; then `n_passages` until the end.
      curriculum=dict(n_passages=(), steps=(), answer_first=True),
  ))


def resolve_data(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Generates the synthetic data if needed and fills in the file paths; checks files exist."""
  data = ml_collections.ConfigDict(data.to_dict())
  if data.source == 'synthetic':
    s = data.synthetic
    paths = synthetic.prepare_synthetic(
        data.dir, s.seed, n_train=s.n_train, n_dev=s.n_dev, n_test=s.n_test,
        n_passages=data.n_passages, answer_position=s.answer_position, vocab_size=s.vocab_size,
        announce=lambda message: print(message, file=sys.stderr, flush=True))
    for field in ('tokenizer', 'train', 'dev', 'test', 'corpus'):
      data[field] = data[field] or getattr(paths, field)
  elif data.source == 'tfds':
    if not data.tfds.name:
      raise DataError('config.data.tfds.name is empty: source=tfds reads the data set prepared '
                      'under that name by run.py --mode=prepare (see data/README.md)')
  elif data.source != 'files':
    raise DataError(f"config.data.source={data.source!r}: expected 'synthetic', 'files' or "
                    "'tfds'")
  if data.get('on_error', 'raise') not in ('raise', 'skip'):
    raise DataError(f"config.data.on_error={data.on_error!r}: expected 'raise' or 'skip'")
  if not data.tokenizer:
    raise DataError('config.data.tokenizer is empty: your own data (source=files) needs a '
                    'SentencePiece model, e.g. --config.data.tokenizer=path/to/spiece.model')
  if not os.path.isfile(data.tokenizer):
    raise MissingInputError(f'config.data.tokenizer={data.tokenizer!r} is not a file')
  return data
