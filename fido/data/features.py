"""Turns a normalized FiD record into fixed-shape token arrays.

Shapes: P = n_passages, L = passage_len, T = target_len.
  passage_ids  int32 [P, L]  "question: {q} title: {t} context: {c}" tokens, truncated to L-1, then
                             EOS, then 0 padding (as FiD's HF tokenizer: truncation keeps the EOS)
  passage_mask bool  [P, L]  True on real tokens (incl. EOS); an absent passage is all False
  target_ids   int32 [T]     target tokens truncated to T-1, then EOS, then 0 padding
  target_mask  bool  [T]     True on target tokens and on the EOS
  example_index int32 []     position of the record in its source; -1 for a padding example
Passages are the record's first P `ctxs` (the reader already sorted them by score when scored).
A closed-book record (no ctxs) becomes one passage "question: {q}".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fido.data.errors import DataError, where
from fido.data.has_answer import has_answer
from fido.data.tokenizer import EOS_ID, Tokenizer

ANSWER_CHOICES = ("first", "random")


def fid_passage_text(question: str, title: str, text: str) -> str:
  """FiD's encoder input for one passage."""
  return f"question: {question} title: {title} context: {text}"


def closed_book_text(question: str) -> str:
  """Encoder input of a closed-book (no passages) example."""
  return f"question: {question}"


def _record_where(record: dict, field: str) -> str:
  return where(record.get("source"), f"record {record.get('record_number', '?')}", field)


def check_qa_lengths(tokenizer: Tokenizer, n_passages: int, passage_len: int,
                     target_len: int) -> None:
  """Config-time checks: one passage or more; room for the empty-field prefix; room for EOS."""
  if n_passages < 1:
    raise DataError(f"n_passages must be >= 1, got {n_passages} (zero passages)")
  prefix = len(tokenizer.encode(fid_passage_text("", "", "").strip()))
  if passage_len < prefix + 2:
    raise DataError(f"passage_len {passage_len} is smaller than the passage prefix "
                    f"'question: title: context:' ({prefix} tokens) + 1 context token + EOS")
  if target_len < 2:
    raise DataError(f"target_len must be >= 2 (one token + EOS), got {target_len}")


def _fit(tokens: list[int], length: int) -> list[int]:
  """Truncates to length-1 tokens and appends EOS."""
  return tokens[:length - 1] + [EOS_ID]


def encode_passages(tokenizer: Tokenizer, record: dict, n_passages: int,
                    passage_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns passage ids int32 [P, L] and mask bool [P, L] of one record.

  Raises DataError (naming file, record, field) if the "question: .. title: .. context:" prefix
  leaves no room for a context token, or a closed-book question does not fit.
  """
  ids = np.zeros((n_passages, passage_len), np.int32)
  mask = np.zeros((n_passages, passage_len), bool)
  q = record["question"]
  ctxs = record["ctxs"][:n_passages]
  if not ctxs:
    toks = tokenizer.encode(closed_book_text(q))
    if len(toks) + 1 > passage_len:
      raise DataError(f"{_record_where(record, 'question')}closed-book input takes {len(toks)} "
                      f"tokens + EOS, more than passage_len={passage_len}")
    rows = [toks + [EOS_ID]]
  else:
    rows = []
    texts = [fid_passage_text(q, ctx["title"], ctx["text"]) for ctx in ctxs]
    for i, toks in enumerate(tokenizer.encode_batch(texts)):
      if len(toks) + 1 > passage_len:
        _check_prefix(tokenizer, record, i, passage_len)
      rows.append(_fit(toks, passage_len))
  for p, row in enumerate(rows):
    ids[p, :len(row)] = row
    mask[p, :len(row)] = True
  return ids, mask


def _check_prefix(tokenizer: Tokenizer, record: dict, i: int, passage_len: int) -> None:
  q, title = record["question"], record["ctxs"][i]["title"]
  q_len = len(tokenizer.encode(f"question: {q}"))
  prefix_len = len(tokenizer.encode(f"question: {q} title: {title} context:"))
  if prefix_len + 1 >= passage_len:
    field = "question" if q_len + 1 >= passage_len else f"ctxs[{i}].title"
    raise DataError(f"{_record_where(record, field)}passage prefix 'question: .. title: .. "
                    f"context:' takes {prefix_len} tokens, leaving no room for context and EOS in "
                    f"passage_len={passage_len}")


def check_records_fit(tokenizer: Tokenizer, records: Sequence[dict], n_passages: int,
                      passage_len: int) -> None:
  """Raises encode_passages' DataError for the first record whose question (or a passage title)
  leaves no room in `passage_len`: run it before expensive work (restoring, compiling, decoding)."""
  for record in records:
    encode_passages(tokenizer, record, n_passages, passage_len)


def choose_target(record: dict, answer_choice: str = "first",
                  rng: np.random.Generator | None = None) -> str:
  """`target` if present, else the first or a random answer; '' for an unlabeled record."""
  if answer_choice not in ANSWER_CHOICES:
    raise DataError(f"answer_choice must be one of {ANSWER_CHOICES}, got {answer_choice!r}")
  if record.get("target"):
    return record["target"]
  answers = record["answers"]
  if not answers:
    return ""
  if answer_choice == "random":
    if rng is None:
      raise DataError("answer_choice='random' needs an rng")
    return answers[int(rng.integers(len(answers)))]
  return answers[0]


def answer_first(record: dict) -> dict:
  """The record with its answer-bearing passages moved to the front (each group keeps its order).

  Training on the first P passages of such records puts the gold passage in every example: the
  warm-up stages of a passage curriculum (fido.train) use it; evaluation never does.
  """
  ctxs = record["ctxs"]
  gold = [has_answer(record["answers"], c["text"]) for c in ctxs]  # DPR's answer-in-passage test
  return {**record, "ctxs": [c for c, g in zip(ctxs, gold) if g] +
          [c for c, g in zip(ctxs, gold) if not g]}


def encode_target(tokenizer: Tokenizer, text: str,
                  target_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns target ids int32 [T] (tokens[:T-1] + EOS, 0 padding) and mask bool [T]."""
  row = _fit(tokenizer.encode(text) if text else [], target_len)
  ids = np.zeros((target_len,), np.int32)
  ids[:len(row)] = row
  return ids, np.arange(target_len) < len(row)


def encode_qa_example(tokenizer: Tokenizer, record: dict, *, n_passages: int, passage_len: int,
                      target_len: int, answer_choice: str = "first",
                      rng: np.random.Generator | None = None, example_index: int = -1) -> dict:
  """One example: passage_ids/mask [P, L], target_ids/mask [T], example_index []."""
  passage_ids, passage_mask = encode_passages(tokenizer, record, n_passages, passage_len)
  target_ids, target_mask = encode_target(
      tokenizer, choose_target(record, answer_choice, rng), target_len)
  return {"passage_ids": passage_ids, "passage_mask": passage_mask, "target_ids": target_ids,
          "target_mask": target_mask, "example_index": np.int32(example_index)}


def empty_qa_example(n_passages: int, passage_len: int, target_len: int) -> dict:
  """A padding example: all ids 0, all masks False, example_index -1."""
  return {"passage_ids": np.zeros((n_passages, passage_len), np.int32),
          "passage_mask": np.zeros((n_passages, passage_len), bool),
          "target_ids": np.zeros((target_len,), np.int32),
          "target_mask": np.zeros((target_len,), bool),
          "example_index": np.int32(-1)}
