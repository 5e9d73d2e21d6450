"""Evaluation: decode QA records, score exact match / F1, write predictions and metrics files.

  metrics, predictions = evaluate_records(model, params, records, tokenizer, n_passages=...,
                                          passage_len=..., target_len=..., batch_size=...)
  write_predictions(path, predictions); write_metrics(path, metrics)

The training loop's periodic dev EM calls `evaluate_records`; `run.py --mode=eval` (checkpoint to
predictions, watch mode) is fido/eval_checkpoint.py; `run.py --mode=predict` (no gold answers
needed) is fido/predict.py. Prediction files are JSONL, one line per record in file order:
question, prediction, sequence_score, answers, correct, f1, and optionally the passages used (id,
title, retrieval score, cross-attention score). Writes are atomic.
"""

import collections
import json
import logging
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import tqdm

from fido import metrics as metrics_lib
from fido import multihost, sharding
from fido.data.errors import DataError
from fido.data.pipeline import qa_eval_loader
from fido.data.tokenizer import Tokenizer
from fido.decoding import DecodeOutput, make_decode_fn
from fido.files import atomic_write
from fido.model.fid import FiDFunctions

_LOG = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ decoding

_DECODE_FNS: collections.OrderedDict = collections.OrderedDict()


def _cached_decode_fn(model: FiDFunctions, max_length: int, beam_size: int, alpha: float,
                      cross_attention: bool = False):
  """One jitted decode function per (model, settings), so repeated evals compile once."""
  key = (id(model.decode_step), max_length, beam_size, alpha if beam_size > 1 else None,
         cross_attention)
  if key in _DECODE_FNS and _DECODE_FNS[key][0] is model.decode_step:
    _DECODE_FNS.move_to_end(key)
    return _DECODE_FNS[key][1]
  fn = make_decode_fn(model, max_length=max_length, beam_size=beam_size, alpha=alpha,
                      cross_attention=cross_attention)
  _DECODE_FNS[key] = (model.decode_step, fn)  # holding decode_step keeps its id from being reused
  while len(_DECODE_FNS) > 8:
    _DECODE_FNS.popitem(last=False)
  return fn


def detokenize(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
  """Text of decoded ids (up to the first EOS); '' instead of an exception for odd ids."""
  try:
    return tokenizer.decode([int(i) for i in ids])
  except Exception as e:  # pylint: disable=broad-except -- one odd prediction must not end an eval
    _LOG.warning('cannot detokenize %s (%s: %s); predicting ""', list(ids)[:32],
                 type(e).__name__, e)
    return ''


def predict(model: FiDFunctions, params, records: Sequence[dict], tokenizer: Tokenizer, *,
            n_passages: int, passage_len: int, target_len: int, batch_size: int,
            beam_size: int = 1, alpha: float = 0.6, max_decode_len: int | None = None,
            progress: bool = True, decode_fn: Callable | None = None, passages: bool = False,
            crossattention_scores: bool = False) -> list[dict]:
  """Decodes every record once; per record {question, prediction, sequence_score, answers,
  exact_match, f1} and, with `passages` or `crossattention_scores`, the passages it used:
  `passages` [{id, title, score (the retriever's)}] for its first n_passages ctxs ([] for a
  closed-book record), with each passage's `crossattention_score` (fido.decoding.passage_scores)
  when `crossattention_scores`.

  Greedy when beam_size == 1, else beam search; one jitted function at fixed shapes [batch_size,
  n_passages, passage_len], reused across calls with the same model. Rows are in record order;
  exact_match/f1 are None for a record without answers; sequence_score is the decoder's (summed
  log-probability, or the beam score), None when `decode_fn` (tests: `(params, passage_ids,
  passage_mask) -> DecodeOutput | tokens [B, M]`, replacing the model's decoder) gives tokens only.

  Params on a mesh (fido.sharding): batches are split over its data axis, each process reading
  and decoding only its share of the records (record i goes to process i % count) as its rows of
  global batches of about `batch_size`; each scores its rows, and every process gets every row
  (multihost.allgather_json), so all return the same list, and the same metrics.
  """
  if decode_fn is None:
    decode_fn = _cached_decode_fn(model, max_decode_len or target_len, beam_size, alpha,
                                  crossattention_scores)
  mesh = _params_mesh(params)
  if mesh is not None:
    batch_size = multihost.process_batch_size(batch_size, mesh)
  loader = qa_eval_loader(records, tokenizer, batch_size=batch_size, n_passages=n_passages,
                          passage_len=passage_len, target_len=target_len,
                          shard_index=jax.process_index(), shard_count=jax.process_count())
  rows: dict[int, dict] = {}

  def local(x) -> np.ndarray:  # this process's rows of a (possibly process-spanning) batch array
    return multihost.process_rows(x, mesh) if mesh is not None else np.asarray(x)

  def finish(example_index_B: np.ndarray, out: Any) -> int:
    decoded = isinstance(out, DecodeOutput)
    tokens_BxM = local(out.tokens if decoded else out)
    sequence_B = local(out.scores) if decoded else [None] * len(tokens_BxM)
    cross_BxP = (local(out.passage_scores) if decoded and out.passage_scores is not None
                 else None)
    done = 0
    for row, (index, ids) in enumerate(zip(example_index_B, tokens_BxM)):
      index = int(index)
      if index < 0:  # a padding row of the last batch
        continue
      if index in rows:
        raise RuntimeError(f'record {index} was decoded twice')
      record, prediction = records[index], detokenize(tokenizer, ids)
      answers = list(record.get('answers') or [])
      scores = (metrics_lib.score(prediction, answers) if answers
                else {'exact_match': None, 'f1': None})
      rows[index] = {'question': record['question'], 'prediction': prediction,
                     'sequence_score': None if sequence_B[row] is None else float(sequence_B[row]),
                     'answers': answers, **scores}
      if passages or crossattention_scores:
        used = (record.get('ctxs') or [])[:n_passages]
        rows[index]['passages'] = [
            {'id': c.get('id'), 'title': c.get('title'), 'score': c.get('score'),
             **({'crossattention_score': float(cross_BxP[row, j])} if cross_BxP is not None
                else {})} for j, c in enumerate(used)]
      done += 1
    return done

  pending = None  # dispatch batch i+1 before reading batch i back, so host and device overlap
  show = None if progress and multihost.is_primary() else True
  with tqdm.tqdm(total=len(records), desc='eval', unit='ex', disable=show,
                 file=sys.stderr) as bar:
    for batch in loader:
      ids, mask = batch['passage_ids'], batch['passage_mask']
      if mesh is not None:
        global_batch = sharding.make_global_batch(dict(ids=ids, mask=mask), mesh)
        ids, mask = global_batch['ids'], global_batch['mask']
      out = decode_fn(params, ids, mask)
      if pending is not None:
        bar.update(finish(*pending) * jax.process_count())
      pending = (batch['example_index'], out)
    if pending is not None:
      bar.update(finish(*pending) * jax.process_count())
  if mesh is not None:
    rows = {int(i): row for part in multihost.allgather_json(list(rows.items()))
            for i, row in part}
  missing = [i for i in range(len(records)) if i not in rows]
  if missing:
    raise RuntimeError(f'{len(missing)} records were never decoded (first: {missing[:5]})')
  return [rows[i] for i in range(len(records))]


def _params_mesh(params) -> jax.sharding.Mesh | None:
  """The mesh of params placed by fido.sharding; None for params on one device or on the host."""
  leaves = jax.tree.leaves(params)
  leaf_sharding = getattr(leaves[0], 'sharding', None) if leaves else None
  if isinstance(leaf_sharding, jax.sharding.NamedSharding):
    return leaf_sharding.mesh
  if jax.process_count() > 1:
    raise ValueError('with many processes, predict needs params placed on a mesh '
                     f'(NamedSharding), got {leaf_sharding}')
  return None


def check_has_answers(records: Sequence[dict], name: str | None = None) -> None:
  """DataError naming the file and record if a record has no gold answers (EM needs them)."""
  for i, record in enumerate(records):
    if not record.get('answers'):
      source = name or record.get('source') or '<records>'
      number = record.get('record_number', i + 1)
      raise DataError(f"{source}: record {number} has no 'answers': evaluation needs gold answers "
                      f'(an unlabeled file? use fido.evaluate.predict to only decode it)')


def evaluate_records(model: FiDFunctions, params, records: Sequence[dict], tokenizer: Tokenizer,
                     **predict_kwargs) -> tuple[dict[str, float], list[dict]]:
  """(metrics {exact_match, f1, count, examples_per_second}, predictions); kwargs as `predict`.

  examples_per_second is over the whole call, including compilation on a model's first call.
  Records without answers are an error: before decoding for a list, after it for a random-access
  source (whose records are read only where decoded).
  """
  in_memory = isinstance(records, (list, tuple))
  if in_memory:
    check_has_answers(records)
  start = time.perf_counter()
  predictions = predict(model, params, records, tokenizer, **predict_kwargs)
  seconds = time.perf_counter() - start
  if not in_memory:
    check_has_answers(predictions, repr(records))
  metrics = metrics_lib.aggregate(predictions)
  metrics['examples_per_second'] = metrics['count'] / max(seconds, 1e-9)
  return metrics, predictions


# --------------------------------------------------------------------------------------- files

def write_predictions(path: str, predictions: Sequence[Mapping[str, Any]]) -> None:
  """JSONL, one line per record: question, prediction, sequence_score, answers, correct (EM as
  bool), f1, and `passages` when the rows have them."""
  lines = []
  for p in predictions:
    em = p.get('exact_match')
    line = {'question': p['question'], 'prediction': p['prediction'],
            'sequence_score': p.get('sequence_score'), 'answers': list(p['answers']),
            'correct': None if em is None else bool(em), 'f1': p.get('f1')}
    if 'passages' in p:
      line['passages'] = p['passages']
    lines.append(json.dumps(line, ensure_ascii=False) + '\n')
  atomic_write(path, ''.join(lines))


def write_metrics(path: str, metrics: Mapping[str, Any]) -> None:
  atomic_write(path, json.dumps(dict(metrics), indent=2, sort_keys=True) + '\n')
