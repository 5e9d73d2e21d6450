"""`run.py --mode=predict`: answers for questions, from a checkpoint; no gold answers needed.

  python run.py --mode=predict --workdir=workdirs/embedded-fido            # synthetic test split
  python run.py --mode=predict --workdir=RUN \\
      --config.predict.questions=workdirs/retrieve/test.retrieved.jsonl
  python run.py --mode=predict --workdir=RUN --config.predict.questions=nq-test.qa.csv \\
      --config.predict.index=workdirs/retrieve-nq           # passages from a --mode=retrieve index

--workdir is a training run (its checkpoints) or a checkpoint directory, e.g. --mode=convert's
out_dir (a public T5 converted to FiD/FiDO). Questions come in any format of
fido.data.questions; a question without passages gets the index's top config.data.n_passages
(BM25, fido.bm25_index). The model reads the first n_passages passages of each question.

Writes <workdir>/predict_<question file's name less its extension>/predictions.jsonl, one line
per question in file order (fido.evaluate.write_predictions): question, prediction, sequence_score, answers, correct,
f1, passages [{id, title, score, crossattention_score}]; and, when questions have gold answers,
metrics.json: exact match and F1 exactly as --mode=eval computes them (fido.evaluate), over the
questions with answers, and with cross-attention scores `top1_has_answer`: how often the
passage the retriever ranked first, and the passage of highest cross-attention, hold an answer
(DPR's has_answer). Returns a summary.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections

from fido import bm25_index
from fido import metrics as metrics_lib
from fido import retrieve
from fido.data.features import check_records_fit
from fido.data.has_answer import has_answer
from fido.data.questions import read_questions
from fido.data.sources import resolve_data
from fido.errors import UserError
from fido.eval_checkpoint import restore_reader
from fido.evaluate import predict, write_metrics, write_predictions


def attach_passages(records: list[dict], index: bm25_index.Index, k: int,
                    progress: bool = False) -> list[dict]:
  """Records, those without passages given the index's top k (FiD ctxs with BM25 scores)."""
  missing = [i for i, r in enumerate(records) if not r['ctxs']]
  if not missing:
    return records
  indices, scores = index.search([records[i]['question'] for i in missing], k, progress=progress)
  records = list(records)
  for i, retrieved in zip(missing, retrieve.retrieved_records([records[i] for i in missing], index,
                                                              indices, scores)):
    records[i] = dict(records[i], ctxs=retrieved['ctxs'])
  return records


def top1_has_answer(records: list[dict], rows: list[dict]) -> dict[str, float] | None:
  """Over the questions with answers and passages: the share whose first passage (the
  retriever's top-1) and whose passage of highest cross-attention score hold an answer."""
  pairs = [(record, row) for record, row in zip(records, rows)
           if record['answers'] and row.get('passages')]
  if not pairs or 'crossattention_score' not in pairs[0][1]['passages'][0]:
    return None
  first = attended = 0
  for record, row in pairs:
    scores = [p['crossattention_score'] for p in row['passages']]
    gold = [has_answer(record['answers'], c['text']) for c in record['ctxs'][:len(scores)]]
    first += gold[0]
    attended += gold[scores.index(max(scores))]
  return dict(retriever=first / len(pairs), crossattention=attended / len(pairs))


def _name(path: str) -> str:
  """A question file's name without its format's extension: test.retrieved.jsonl.gz ->
  test.retrieved."""
  name = os.path.basename(path).removesuffix('.gz')
  return os.path.splitext(name)[0] if name.endswith(('.jsonl', '.json', '.csv', '.tsv')) else name


def _questions(config: ml_collections.ConfigDict) -> tuple[str, list[dict]]:
  p = config.predict
  path = p.questions
  if not path:
    if config.get('data') is None:
      raise UserError('config.predict.questions is empty: give a question file')
    path = resolve_data(config.data).test
  return path, read_questions(path, p.questions_format)


def run_predict(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`run.py --mode=predict`: see the module docstring."""
  p = config.predict
  if config.get('data') is not None:
    config.data = resolve_data(config.data)  # e.g. generate the synthetic data if missing
  path, records = _questions(config)
  without = sum(not r['ctxs'] for r in records)
  if without and not p.index:
    first = next(r for r in records if not r['ctxs'])
    raise UserError(f"{path}: record {first['record_number']} has no passages ({without} of "
                    f'{len(records)}): give --config.predict.index=DIR, a --mode=retrieve '
                    'workdir whose index supplies them, or a file with ctxs')
  index = retrieve.load_index(p.index) if without else None  # checked before restoring
  model, params, data, tokenizer, step = restore_reader(config, workdir,
                                                        None if p.step < 0 else int(p.step))
  n_passages = int(data['n_passages'])
  if index is not None:
    try:
      records = attach_passages(records, index, n_passages, progress=p.progress)
    finally:
      index.close()
  check_records_fit(tokenizer, records, n_passages, int(data['passage_len']))
  start = time.perf_counter()
  rows = predict(model, params, records, tokenizer, n_passages=n_passages,
                 passage_len=int(data['passage_len']), target_len=int(data['target_len']),
                 batch_size=int(p.batch_size), beam_size=int(p.beam_size), alpha=float(p.alpha),
                 max_decode_len=int(p.max_decode_len) or None, progress=p.progress,
                 passages=True, crossattention_scores=bool(p.crossattention_scores))
  seconds = time.perf_counter() - start
  out_dir = os.path.join(workdir, f'predict_{_name(path)}')
  write_predictions(os.path.join(out_dir, 'predictions.jsonl'), rows)
  result = dict(questions=path, predictions=os.path.join(out_dir, 'predictions.jsonl'),
                step=step, count=len(rows), retrieved=without,
                examples_per_second=round(len(rows) / max(seconds, 1e-9), 2))
  scored = [r for r in rows if r['exact_match'] is not None]
  if scored:  # the metrics of --mode=eval, over the questions that have gold answers
    result.update(metrics_lib.aggregate(scored))
    top1 = top1_has_answer(records, rows)
    if top1:
      result['top1_has_answer'] = top1
    write_metrics(os.path.join(out_dir, 'metrics.json'), result)
  return result
