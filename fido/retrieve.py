"""`run.py --mode=retrieve`: BM25 passages for questions, as FiD files, with DPR's recall@k.

  python run.py --mode=retrieve                  # synthetic data, test questions: workdirs/retrieve
  python run.py --mode=retrieve --workdir=W --config.retrieve.corpus=psgs_w100.tsv \\
      --config.retrieve.questions=nq-test.qa.csv,trivia-test.qa.csv

Reads `config.retrieve` (fido.config.retrieve_config) and, for its defaults, `config.data`: an
empty corpus is the synthetic data's passages (every split's, pooled, see `pooled_passages`), an
empty question list its test split. Writes into --workdir:
  index/                       the BM25 index (fido.bm25_index: built once, reused, rebuilt when the
                               corpus or the settings change)
  <stem>.retrieved.jsonl       per question file: FiD records {question, answers, ctxs: [{id,
                               title, text, score, has_answer}]}, the top_k passages best first
                               (has_answer: DPR's test, fido.data.has_answer)
  <stem>.recall.json, recall.md  recall@k (the share of questions with an answer in the top k;
                               DPR's "top-k retrieval accuracy") of the questions with answers
Returns a summary: the index (passages, build speed), per file the recall and queries/s.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator, Sequence

import ml_collections
import numpy as np
import tqdm

from fido import bm25_index
from fido.data.fid_format import read_fid_file
from fido.data.has_answer import has_answer
from fido.data.questions import read_questions
from fido.data.sources import resolve_data
from fido.errors import UserError
from fido.files import atomic_write

INDEX_DIR = 'index'
DEFAULT_WORKDIR = 'workdirs/retrieve'  # without --workdir (run.py's default is a training run's)


def _announce(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def pooled_passages(fid_files: Sequence[str], out_path: str) -> str:
  """Writes the passages of FiD files into one JSONL corpus {id, title, text}, ids
  '<file stem>:<record number>:<position>'; kept when newer than every input. Returns out_path."""
  if os.path.isfile(out_path) and all(os.path.getmtime(out_path) >= os.path.getmtime(f)
                                      for f in fid_files):
    return out_path
  lines = []
  for path in fid_files:
    stem = os.path.basename(path).split('.')[0]
    for record in read_fid_file(path)[0]:
      lines += [json.dumps(dict(id=f"{stem}:{record['record_number']}:{j}", title=c['title'],
                                text=c['text']), ensure_ascii=False) + '\n'
                for j, c in enumerate(record['ctxs'])]
  atomic_write(out_path, ''.join(lines))
  return out_path


def resolve_inputs(config: ml_collections.ConfigDict) -> tuple[str, list[str]]:
  """(corpus path, question paths) of config.retrieve, with the synthetic data's defaults."""
  r = config.retrieve
  corpus, questions = r.corpus, [q.strip() for q in r.questions.split(',') if q.strip()]
  if not corpus or not questions:
    if config.get('data') is None:
      raise UserError('config.retrieve.corpus and config.retrieve.questions are empty and the '
                      'config has no data section to take them from')
    data = resolve_data(config.data)
    if not corpus:
      if data.source != 'synthetic':
        raise UserError('config.retrieve.corpus is empty: give a passage file (DPR tsv, JSONL '
                        'or text), e.g. --config.retrieve.corpus=psgs_w100.tsv')
      corpus = pooled_passages([data.train, data.dev, data.test],
                               os.path.join(data.dir, 'passages.jsonl'))
    questions = questions or [data.test]
  return corpus, questions


def settings(config: ml_collections.ConfigDict) -> bm25_index.Settings:
  r = config.retrieve
  return bm25_index.Settings(corpus_format=r.corpus_format, k1=float(r.k1), b=float(r.b),
                             method=r.method, stopwords=r.stopwords)


def load_index(workdir: str) -> bm25_index.Index:
  """The index a --mode=retrieve run built in `workdir` (for --mode=predict)."""
  index_dir = os.path.join(workdir, INDEX_DIR)
  if not os.path.isfile(os.path.join(index_dir, bm25_index.MANIFEST)):
    raise UserError(f'{workdir}: no BM25 index ({index_dir}/{bm25_index.MANIFEST} is missing); '
                    'build one with --mode=retrieve --workdir=' + workdir)
  return bm25_index.Index(index_dir)


def retrieved_records(records: Sequence[dict], index: bm25_index.Index, indices_QxK: np.ndarray,
                      scores_QxK: np.ndarray) -> Iterator[dict]:
  """FiD records: each question's answers and its retrieved passages with has_answer."""
  for record, hits, scores in zip(records, indices_QxK, scores_QxK):
    ctxs = []
    for i, score in zip(hits.tolist(), scores.tolist()):
      passage = index.passage(i)
      ctxs.append(dict(passage, score=round(float(score), 4),
                       has_answer=has_answer(record['answers'], passage['text'])))
    out = dict(question=record['question'], answers=record['answers'])
    if record.get('target'):
      out['target'] = record['target']
    yield dict(out, ctxs=ctxs)


def recall_at(hits_QxK: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
  """{'top-k': share of rows with a True among their first k columns}, for k <= K."""
  first_hit = np.where(hits_QxK.any(axis=1), hits_QxK.argmax(axis=1), hits_QxK.shape[1])
  return {f'top-{k}': float((first_hit < k).mean()) for k in ks if k <= hits_QxK.shape[1]}


def recall_markdown(results: Sequence[dict]) -> str:
  """DPR's table layout: top-k retrieval accuracy (%) per question file."""
  ks = sorted({k for r in results for k in r['recall']}, key=lambda k: int(k.split('-')[1]))
  md = ['| questions | count | ' + ' | '.join(ks) + ' |', '|---|---:|' + '---:|' * len(ks)]
  for r in results:
    cells = [f"{100 * r['recall'][k]:.1f}" if k in r['recall'] else '' for k in ks]
    md.append(f"| {os.path.basename(r['questions'])} | {r['with_answers']} | "
              + ' | '.join(cells) + ' |')
  return '\n'.join(md) + '\n'


def _write_jsonl(path: str, lines: Iterable[dict]) -> None:
  """Streams JSON lines into a temporary file beside `path`, then renames it over `path`."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=f'.{os.path.basename(path)}.tmp-')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      for line in lines:
        f.write(json.dumps(line, ensure_ascii=False) + '\n')
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _stem(path: str) -> str:
  return os.path.basename(path).split('.')[0]


def retrieve_file(index: bm25_index.Index, questions_path: str, records: Sequence[dict],
                  workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Retrieves for one question file's records; writes its FiD file and recall; its summary."""
  r = config.retrieve
  start = time.perf_counter()
  indices, scores = index.search([q['question'] for q in records], int(r.top_k),
                                 progress=r.progress)
  search_seconds = time.perf_counter() - start
  stem = _stem(questions_path)
  out_path = os.path.join(workdir, f'{stem}.retrieved.jsonl')
  hits = np.zeros(indices.shape, bool)

  def lines():
    bar = tqdm.tqdm(total=len(records), desc='has_answer', unit='q', file=sys.stderr,
                    disable=None if r.progress else True)
    for q, record in enumerate(retrieved_records(records, index, indices, scores)):
      hits[q] = [c['has_answer'] for c in record['ctxs']]
      bar.update()
      yield record
    bar.close()

  _write_jsonl(out_path, lines())
  answered = np.asarray([bool(q['answers']) for q in records])
  result = dict(questions=questions_path, output=out_path, count=len(records),
                with_answers=int(answered.sum()), top_k=int(indices.shape[1]),
                recall=recall_at(hits[answered], r.recall_at) if answered.any() else {},
                queries_per_second=round(len(records) / max(search_seconds, 1e-9), 1))
  atomic_write(os.path.join(workdir, f'{stem}.recall.json'), json.dumps(result, indent=1) + '\n')
  return result


def run_retrieve(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`run.py --mode=retrieve`: see the module docstring."""
  if int(config.retrieve.top_k) < 1:
    raise UserError(f'config.retrieve.top_k={config.retrieve.top_k}: must be >= 1')
  corpus, questions = resolve_inputs(config)
  if len({_stem(q) for q in questions}) < len(questions):
    raise UserError(f'config.retrieve.questions={config.retrieve.questions!r}: two files would '
                    'write the same <name>.retrieved.jsonl; give files with different names')
  # Every question file is read before the index is built: a mistake there costs nothing.
  records = [read_questions(q, config.retrieve.questions_format) for q in questions]
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a directory')
  os.makedirs(workdir, exist_ok=True)
  index, built = bm25_index.open_index(corpus, os.path.join(workdir, INDEX_DIR), settings(config),
                                       progress=config.retrieve.progress, announce=_announce)
  try:
    results = [retrieve_file(index, path, recs, workdir, config)
               for path, recs in zip(questions, records)]
  finally:
    index.close()
  atomic_write(os.path.join(workdir, 'recall.md'), recall_markdown(results))
  manifest = index.manifest
  return dict(workdir=workdir, corpus=corpus, index_built=built, passages=manifest['passages'],
              index_passages_per_second=manifest['passages_per_second'], files=results)
