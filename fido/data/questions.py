"""Question files for retrieval and prediction, in the formats open-domain QA sets ship in.

  records = read_questions(path)      # format from the name; fmt='fid' | 'dpr_qas' to force it

  fid      FiD JSON / JSONL (fido.data.fid_format), passages optional, answers optional; this also
           reads NQ-open JSONL ({"question", "answer": [..]}), WebQuestions JSONL as FiD and
           EfficientQA ship it ({"question", "answer": "x" | [..]}) and WebQuestions' original release
           ({"utterance", "targetValue": "(list (description X) ...)"}).
  dpr_qas  DPR's qas files (nq-test.qa.csv, trivia-test.qa.csv, webquestions-test.qa.csv): one
           question per line, `question<TAB>answers` with the answers a Python list literal,
           read as DPR does (csv, tab-delimited; ast.literal_eval instead of eval). Chosen for
           names ending .csv or .tsv (optionally .gz).

Records are fido.data.fid_format's normalized records (question, answers, target, ctxs, source,
record_number); `ctxs` is empty for files without passages.
"""

from __future__ import annotations

import ast
import csv
import os
import re
import sys
from typing import Any

from fido.data.corpus import numbered_lines
from fido.data.errors import DataError, where
from fido.data.fid_format import FieldError, ReadReport, iter_raw_json, normalize_record

FORMATS = ('auto', 'fid', 'dpr_qas')
_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^()]*?))\)')


def detect_format(path: str, fmt: str = 'auto') -> str:
  if fmt not in FORMATS:
    raise DataError(f'question file format {fmt!r}: expected one of {", ".join(FORMATS)}')
  if fmt != 'auto':
    return fmt
  name = os.path.basename(path).lower().removesuffix('.gz')
  return 'dpr_qas' if name.endswith(('.csv', '.tsv')) else 'fid'


def webquestions_answers(target_value: str) -> list[str]:
  """The answers of WebQuestions' `targetValue`, '(list (description X) (description "Y Z"))'."""
  return [quoted.replace('\\"', '"') if quoted else bare.strip()
          for quoted, bare in _DESCRIPTION.findall(target_value)]


def _from_webquestions(obj: Any) -> Any:
  """WebQuestions' original fields (utterance, targetValue) as FiD's (question, answers)."""
  if isinstance(obj, dict) and 'question' not in obj and 'utterance' in obj:
    obj = {**obj, 'question': obj['utterance']}
    if 'answers' not in obj and 'answer' not in obj and isinstance(obj.get('targetValue'), str):
      obj['answers'] = webquestions_answers(obj['targetValue'])
  return obj


def _read_fid(path: str) -> list[dict]:
  report, records = ReadReport(path), []
  for loc, number, obj in iter_raw_json(path, report):
    try:
      record, _ = normalize_record(_from_webquestions(obj), require_passages=False,
                                   require_answers=False)
    except FieldError as e:
      raise DataError(f'{where(path, loc)}{e}') from None
    records.append({**record, 'source': path, 'record_number': number})
  return records


def _read_dpr_qas(path: str) -> list[dict]:
  csv.field_size_limit(sys.maxsize)
  records = []
  for n, line in numbered_lines(path):
    if not line.strip():
      continue
    try:
      row = next(csv.reader([line], delimiter='\t'))
    except csv.Error as e:
      raise DataError(f'{path}: line {n}: malformed tab-separated line ({e})') from None
    if len(row) != 2:
      raise DataError(f'{path}: line {n}: expected 2 tab-separated fields (question, answers '
                      f'list), got {len(row)}')
    question, answers_text = row
    try:
      answers = ast.literal_eval(answers_text)
    except (ValueError, SyntaxError):
      raise DataError(f'{path}: line {n}: answers {answers_text[:60]!r} are not a Python list '
                      "literal such as ['Paris', 'City of Light']") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
      raise DataError(f'{path}: line {n}: answers must be a list of strings, got '
                      f'{answers_text[:60]!r}')
    if not question.strip():
      raise DataError(f"{path}: line {n}: field 'question': empty")
    records.append(dict(question=question, answers=answers, target=None, ctxs=[], source=path,
                        record_number=n))
  return records


def read_questions(path: str | os.PathLike, fmt: str = 'auto') -> list[dict]:
  """Every question of `path` as a normalized record; DataError naming the line when bad."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  fmt = detect_format(path, fmt)
  records = _read_fid(path) if fmt == 'fid' else _read_dpr_qas(path)
  if not records:
    raise DataError(f'{path}: no questions (read as {fmt})')
  return records
