"""Reader and validator for FiD-format QA files.

Accepted files: a JSON array or JSONL (one object per line), optionally gzip-compressed, of
  {"question": str, "answers": [str, ...], "target"?: str,
   "ctxs": [{"title": str, "text": str, "score"?: number or numeric string, "id"?: str | int}, ...]}
as FiD's data scripts produce for NaturalQuestions / TriviaQA with DPR passages. NQ-open and
WebQuestions-style records (`"answer": str | [str]` instead of `answers`, no `ctxs`) are accepted
when `require_passages=False` (closed-book) and rejected with a clear message otherwise.

A normalized record is a plain dict:
  {"question": str, "answers": list[str], "target": str | None,
   "ctxs": list[{"title": str, "text": str, "score": float | None, "id": str | None}],
   "source": str (file path), "record_number": int (1-based line for JSONL, else array position)}
with `ctxs` sorted by descending score when every passage has a score (stable; else file order).

Errors raise DataError naming file, record and field; with on_error='skip' a bad record is skipped
and counted by reason in the ReadReport instead. Nothing is dropped without being counted.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Iterator

from fido.data.errors import DataError, where

_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass
class ReadReport:
  """What a read did: records seen, kept, skipped (by reason) and counted warnings (by kind)."""
  path: str
  read: int = 0
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  warnings: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def summary(self) -> str:
    skipped = sum(self.skipped.values())
    s = f"{self.path}: read {self.read} records, kept {self.kept}, skipped {skipped}"
    if self.skipped:
      s += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
    if self.warnings:
      s += "; warnings: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.warnings.items()))
    return s


class FieldError(Exception):
  """A problem with one field of one record; the reader adds file and record number."""

  def __init__(self, field: str, problem: str, detail: str = ""):
    super().__init__(f"field '{field}': {problem}{': ' + detail if detail else ''}")
    self.field, self.problem = field, problem


def _string(obj: dict, key: str, field: str | None = None, *, required: bool = True,
            nonempty: bool = True) -> str | None:
  field = field or key
  if key not in obj or obj[key] is None:
    if required:
      raise FieldError(field, "missing")
    return None
  value = obj[key]
  if not isinstance(value, str):
    raise FieldError(field, "expected a string", f"got {type(value).__name__}")
  if nonempty and not value.strip():
    raise FieldError(field, "empty")
  return value


def _answers(obj: dict, require_answers: bool) -> list[str]:
  key = "answers" if "answers" in obj else "answer" if "answer" in obj else None
  if key is None:
    if require_answers and "target" not in obj:
      raise FieldError("answers", "missing")
    return []
  value = obj[key]
  if key == "answer" and isinstance(value, str):  # WebQuestions-style single answer
    value = [value]
  if not isinstance(value, list):
    raise FieldError(key, "expected a list of strings", f"got {type(value).__name__}")
  for i, a in enumerate(value):
    if not isinstance(a, str):
      raise FieldError(f"{key}[{i}]", "expected a string", f"got {type(a).__name__}")
    if not a.strip():
      raise FieldError(f"{key}[{i}]", "empty")
  if require_answers and not value and "target" not in obj:
    raise FieldError(key, "empty", "no answers and no 'target'")
  return list(value)


def _score(ctx: dict, field: str) -> float | None:
  if ctx.get("score") is None:
    return None
  s = ctx["score"]
  if isinstance(s, bool) or not isinstance(s, (int, float, str)):
    raise FieldError(field, "expected a number", f"got {type(s).__name__}")
  try:
    value = float(s)  # DPR writes scores as strings
  except ValueError:
    raise FieldError(field, "expected a number", f"got {s!r}") from None
  if math.isnan(value):
    raise FieldError(field, "expected a number", "got NaN")
  return value


def _ctx(ctx: object, i: int) -> dict:
  if not isinstance(ctx, dict):
    raise FieldError(f"ctxs[{i}]", "expected an object", f"got {type(ctx).__name__}")
  cid = ctx.get("id")
  if cid is not None and (isinstance(cid, bool) or not isinstance(cid, (str, int))):
    raise FieldError(f"ctxs[{i}].id", "expected a string", f"got {type(cid).__name__}")
  return {
      "title": _string(ctx, "title", f"ctxs[{i}].title", nonempty=False),
      "text": _string(ctx, "text", f"ctxs[{i}].text", nonempty=False),
      "score": _score(ctx, f"ctxs[{i}].score"),
      "id": None if cid is None else str(cid),
  }


def normalize_record(obj: object, *, require_passages: bool = True,
                     require_answers: bool = True) -> tuple[dict, list[str]]:
  """Validates one parsed JSON value; returns (normalized record without source info, warnings).

  Raises FieldError naming the first bad field.
  """
  if not isinstance(obj, dict):
    raise FieldError("<record>", "expected a JSON object", f"got {type(obj).__name__}")
  warnings = []
  question = _string(obj, "question")
  answers = _answers(obj, require_answers)
  target = _string(obj, "target", required=False)
  if "ctxs" not in obj or obj["ctxs"] is None:
    if require_passages:
      raise FieldError("ctxs", "missing",
                       "passages are required (closed-book NQ-open/WebQuestions-style file? "
                       "retrieve passages first: python run.py --mode=retrieve, see "
                       "data/README.md; or read with require_passages=False)")
    ctxs = []
  elif not isinstance(obj["ctxs"], list):
    raise FieldError("ctxs", "expected a list", f"got {type(obj['ctxs']).__name__}")
  else:
    ctxs = [_ctx(c, i) for i, c in enumerate(obj["ctxs"])]
  if require_passages and not ctxs:
    raise FieldError("ctxs", "zero passages")
  scored = [c["score"] is not None for c in ctxs]
  if all(scored) and ctxs:
    ctxs = sorted(ctxs, key=lambda c: -c["score"])
  elif any(scored):
    warnings.append("some passages lack 'score' (kept file order)")
  return {"question": question, "answers": answers, "target": target, "ctxs": ctxs}, warnings


def _open_bytes_lines(path: str) -> Iterator[bytes]:
  try:
    with open(path, "rb") as f:
      gz = f.read(2) == _GZIP_MAGIC
    with (gzip.open if gz else open)(path, "rb") as f:
      yield from f
  except (OSError, EOFError, zlib.error) as e:  # unreadable file or corrupt gzip stream
    raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def _decode(line: bytes, path: str, loc: str) -> str:
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as e:
    bad = line[e.start:e.start + 1]
    raise DataError(f"{path}: {loc}: not valid UTF-8 (byte {e.start}: {bad!r})") from None


def iter_raw_json(path: str, report: ReadReport,
                  on_error: str = "raise") -> Iterator[tuple[str, int, object]]:
  """Yields (location, record_number, parsed JSON value) from a JSON-array or JSONL file (gz ok)."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found")
  lines = _open_bytes_lines(path)
  blank = 0
  for first in lines:
    if first.strip():
      break
    blank += 1
  else:
    raise DataError(f"{path}: file is empty")
  if blank == 0:
    first = first.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
  if first.lstrip().startswith(b"["):
    try:
      records = json.loads(_decode_all(b"\n" * blank + first + b"".join(lines), path))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg})"
                      ) from None
    if not isinstance(records, list):
      raise DataError(f"{path}: expected a JSON array of records")
    if not records:
      raise DataError(f"{path}: the JSON array holds no records")
    for i, obj in enumerate(records, 1):
      yield f"record {i}", i, obj
    return
  if blank:
    report.warnings["blank lines"] += blank
  for n, line in enumerate(_chain(first, lines), 1 + blank):
    if not line.strip():
      report.warnings["blank lines"] += 1
      continue
    loc = f"line {n}"
    text = _decode(line, path, loc)
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      if on_error == "skip":
        report.read += 1
        report.skipped["malformed JSON"] += 1
        continue
      raise DataError(f"{path}: {loc} column {e.colno}: malformed JSON ({e.msg})") from None
    yield loc, n, obj


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
  yield first
  yield from rest


def _decode_all(data: bytes, path: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}: line {line}: not valid UTF-8 (byte offset {e.start})") from None


def iter_fid_file(path: str | os.PathLike, report: ReadReport | None = None, *,
                  require_passages: bool = True, require_answers: bool = True,
                  n_passages: int | None = None, on_error: str = "raise") -> Iterator[dict]:
  """Yields normalized records of one FiD file, updating `report` (read/kept/skipped/warnings).

  Args:
    require_passages: reject records without passages (set False for closed-book files).
    require_answers: reject records with neither answers nor target (set False for unlabeled files).
    n_passages: if given, count records with fewer passages as a warning.
    on_error: 'raise' (DataError on the first bad record) or 'skip' (count it in report.skipped).
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  path = os.fspath(path)
  report = report if report is not None else ReadReport(path)
  for loc, number, obj in iter_raw_json(path, report, on_error):
    report.read += 1
    try:
      record, warnings = normalize_record(
          obj, require_passages=require_passages, require_answers=require_answers)
    except FieldError as e:
      if on_error == "skip":
        field = re.sub(r"\[\d+\]", "[]", e.field)  # count ctxs[3].title as ctxs[].title
        report.skipped[f"{field}: {e.problem}"] += 1
        continue
      raise DataError(f"{where(path, loc)}{e}") from None
    for w in warnings:
      report.warnings[w] += 1
    if n_passages is not None and record["ctxs"] and len(record["ctxs"]) < n_passages:
      report.warnings[f"fewer than {n_passages} passages (padded and masked)"] += 1
    report.kept += 1
    yield {**record, "source": path, "record_number": number}


def read_fid_file(path: str | os.PathLike, **kwargs) -> tuple[list[dict], ReadReport]:
  """Reads a whole FiD file into normalized records; see iter_fid_file for the options.

  Logs the report summary when anything was skipped or warned about.
  """
  report = ReadReport(os.fspath(path))
  records = list(iter_fid_file(path, report, **kwargs))
  if report.skipped or report.warnings:
    logging.warning("%s", report.summary())
  if not records:
    raise DataError(f"{report.summary()}: no usable records")
  return records, report
