"""A BM25 index of a passage corpus (bm25s), built once into a directory and reused.

  index = open_index(corpus_path, index_dir, settings)   # builds, reuses or rebuilds
  indices_QxK, scores_QxK = index.search(questions, k)   # best first; ties: corpus order
  index.passage(i) -> {'id', 'title', 'text'}

bm25s (numpy only; scores precomputed into a sparse matrix at indexing, memory-mapped when
loaded) does the tokenisation (lowercase, words of 2+ word characters, English stop words
removed; no stemming) and the scoring (Lucene's BM25 by default, k1 = 0.9, b = 0.4 as Anserini's
DPR baseline). Each passage is indexed as "title text", as Anserini indexes DPR's Wikipedia.

The directory holds bm25s's files, the tokenizer's vocabulary, passages.jsonl (one passage per
line) with passages.offsets.npy (the byte offset of each line, memory-mapped: a hit is read
without loading the corpus) and manifest.json: the corpus's path, size, modification time and
SHA-256, its format, the settings and the build's speed. `open_index` reuses an index whose
manifest matches the corpus and the settings (the hash is computed only when size or time
changed) and rebuilds it, saying why, when the corpus or the settings changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import bm25s
import numpy as np
import tqdm

from fido.data.corpus import detect_format, read_passages
from fido.errors import UserError
from fido.files import atomic_write

_LOG = logging.getLogger(__name__)
logging.getLogger('bm25s').setLevel(logging.WARNING)  # bm25s sets DEBUG: a line per index built
INDEX_VERSION = 1
MANIFEST = 'manifest.json'
PASSAGES = 'passages.jsonl'
OFFSETS = 'passages.offsets.npy'
METHODS = ('lucene', 'robertson', 'atire', 'bm25l', 'bm25+')


@dataclasses.dataclass(frozen=True)
class Settings:
  """What an index is built with; an index built with other settings is rebuilt."""
  corpus_format: str = 'auto'
  k1: float = 0.9
  b: float = 0.4
  method: str = 'lucene'
  stopwords: str = 'en'

  def check(self) -> None:
    if self.method not in METHODS:
      raise UserError(f'config.retrieve.method={self.method!r}: expected one of {METHODS}')
    if not self.k1 >= 0 or not 0 <= self.b <= 1:
      raise UserError(f'config.retrieve.k1={self.k1}, b={self.b}: need k1 >= 0 and 0 <= b <= 1')


def file_hash(path: str, chunk: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def _stamp(path: str) -> dict[str, Any]:
  stat = os.stat(path)
  return dict(path=os.path.abspath(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def _read_manifest(index_dir: str) -> dict | None:
  try:
    with open(os.path.join(index_dir, MANIFEST), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def reuse_decision(manifest: dict | None, corpus_path: str, settings: dict) -> tuple[bool, str]:
  """(reuse?, why): whether an index with `manifest` serves `corpus_path` with `settings`."""
  if manifest is None:
    return False, 'no index yet'
  if manifest.get('version') != INDEX_VERSION:
    return False, f"the index has format version {manifest.get('version')}, not {INDEX_VERSION}"
  changed = [f'{k} {manifest["settings"].get(k)!r} -> {v!r}' for k, v in settings.items()
             if manifest['settings'].get(k) != v]
  if changed:
    return False, 'the settings changed (' + ', '.join(changed) + ')'
  stamp, saved = _stamp(corpus_path), manifest['corpus']
  if stamp['path'] != saved['path']:
    return False, f"the index was built from {saved['path']}, not {stamp['path']}"
  if stamp['size'] == saved['size'] and stamp['mtime_ns'] == saved['mtime_ns']:
    return True, 'the corpus is unchanged (size and modification time)'
  if stamp['size'] == saved['size'] and file_hash(corpus_path) == saved['sha256']:
    return True, 'the corpus is unchanged (same content, new modification time)'
  return False, (f"the corpus changed since the index was built ({saved['size']} -> "
                 f"{stamp['size']} bytes, content differs)")


class Index:
  """A built index, loaded: memory-mapped scores, the tokenizer's vocabulary, the passages."""

  def __init__(self, index_dir: str):
    self.dir = index_dir
    self.manifest = _read_manifest(index_dir)
    self.retriever = bm25s.BM25.load(index_dir, mmap=True)
    self.tokenizer = bm25s.tokenization.Tokenizer(stopwords=[])
    self.tokenizer.load_vocab(index_dir)
    self.tokenizer.load_stopwords(index_dir)
    self.offsets = np.load(os.path.join(index_dir, OFFSETS), mmap_mode='r')
    # Open for the index's lifetime (close()): each hit is one seek and one line.
    self._passages = open(os.path.join(index_dir, PASSAGES), 'rb')  # pylint: disable=consider-using-with

  def __len__(self) -> int:
    return len(self.offsets)

  def close(self) -> None:
    self._passages.close()

  def passage(self, i: int) -> dict[str, str]:
    self._passages.seek(int(self.offsets[i]))
    return json.loads(self._passages.readline())

  def scores(self, question: str) -> np.ndarray:
    """BM25 score of every passage for `question`, float32 [N]."""
    ids = self.tokenizer.tokenize([question], update_vocab=False, return_as='ids',
                                  show_progress=False)[0]
    return self.retriever.get_scores(ids)

  @staticmethod
  def _top(scores_N: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; among equal scores the lowest indices, also
    where ties straddle the k-th place (so the top k are a prefix of the top k + 1)."""
    kth = scores_N[np.argpartition(-scores_N, k - 1)[k - 1]]
    above = np.flatnonzero(scores_N > kth)
    top = np.concatenate([above, np.flatnonzero(scores_N == kth)[:k - len(above)]])
    return top[np.lexsort((top, -scores_N[top]))]

  def search(self, questions: Sequence[str], k: int, progress: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """The k best passages per question: indices int64 [Q, k] and scores float32 [Q, k], by
    descending score, ties in corpus order (k is capped at the corpus size)."""
    k = min(k, len(self))
    indices, scores = np.zeros((len(questions), k), np.int64), np.zeros((len(questions), k),
                                                                        np.float32)
    for q, question in enumerate(tqdm.tqdm(questions, desc='retrieve', unit='q',
                                           disable=None if progress else True)):
      s = self.scores(question)
      top = self._top(s, k)
      indices[q], scores[q] = top, s[top]
    return indices, scores


def _tokenize_and_store(passages: Iterator[tuple[str, str, str]], tokenizer, out_dir: str,
                        progress: bool) -> list[list[int]]:
  """Tokenises "title text" of each passage and writes passages.jsonl + offsets."""
  offsets, token_ids = [], []
  with open(os.path.join(out_dir, PASSAGES), 'wb') as f:

    def texts():
      for pid, title, text in tqdm.tqdm(passages, desc='index: tokenise', unit='passage',
                                        disable=None if progress else True):
        offsets.append(f.tell())
        f.write(json.dumps(dict(id=pid, title=title, text=text), ensure_ascii=False).encode()
                + b'\n')
        yield f'{title} {text}' if title else text

    token_ids = list(tokenizer.streaming_tokenize(texts(), update_vocab=True))
  np.save(os.path.join(out_dir, OFFSETS), np.asarray(offsets, np.int64))
  return token_ids


def build_index(corpus_path: str, index_dir: str, settings: Settings, progress: bool = True
                ) -> dict[str, Any]:
  """Builds the index of `corpus_path` into `index_dir` (replacing what is there); its manifest."""
  settings.check()
  fmt = detect_format(corpus_path, settings.corpus_format)
  stamp, sha256 = _stamp(corpus_path), file_hash(corpus_path)
  parent = os.path.dirname(os.path.abspath(index_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(index_dir)}.tmp-')
  try:
    start = time.perf_counter()
    tokenizer = bm25s.tokenization.Tokenizer(stopwords=settings.stopwords or [])
    ids = _tokenize_and_store(read_passages(corpus_path, fmt), tokenizer, tmp, progress)
    retriever = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
    vocab = tokenizer.get_vocab_dict()
    retriever.index((ids, vocab), show_progress=bool(progress))
    retriever.save(tmp, show_progress=False)
    tokenizer.save_vocab(tmp)
    tokenizer.save_stopwords(tmp)
    seconds = time.perf_counter() - start
    manifest = dict(version=INDEX_VERSION, corpus=dict(stamp, sha256=sha256, format=fmt),
                    settings=dataclasses.asdict(settings), passages=len(ids), vocabulary=len(vocab),
                    build_seconds=round(seconds, 3),
                    passages_per_second=round(len(ids) / max(seconds, 1e-9), 1))
    atomic_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1) + '\n')
    if os.path.isdir(index_dir):
      shutil.rmtree(index_dir)
    os.replace(tmp, index_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def open_index(corpus_path: str, index_dir: str, settings: Settings, *, progress: bool = True,
               announce: Callable[[str], None] = _LOG.info) -> tuple[Index, bool]:
  """(the index of `corpus_path` in `index_dir`, whether it was built now): reused when the
  manifest matches the corpus and the settings, else (re)built; `announce` is told which and why."""
  settings.check()
  if not os.path.isfile(corpus_path):
    raise UserError(f'{corpus_path}: corpus file not found (config.retrieve.corpus)')
  manifest = _read_manifest(index_dir)
  reuse, why = reuse_decision(manifest, corpus_path, dataclasses.asdict(settings))
  if reuse:
    if manifest['corpus']['mtime_ns'] != _stamp(corpus_path)['mtime_ns']:
      manifest['corpus'].update(_stamp(corpus_path))  # skip the hash next time
      atomic_write(os.path.join(index_dir, MANIFEST), json.dumps(manifest, indent=1) + '\n')
    announce(f'reusing the BM25 index {index_dir}: {why}')
    return Index(index_dir), False
  verb = 'building' if manifest is None else 'rebuilding'
  announce(f'{verb} the BM25 index of {corpus_path} in {index_dir}: {why}')
  built = build_index(corpus_path, index_dir, settings, progress)
  announce(f"indexed {built['passages']} passages in {built['build_seconds']:.1f} s "
           f"({built['passages_per_second']:.0f} passages/s)")
  return Index(index_dir), True
