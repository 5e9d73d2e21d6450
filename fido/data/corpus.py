"""Passage corpora for retrieval: DPR's psgs_w100.tsv, JSONL {id, title, text}, plain text.

  for pid, title, text in read_passages('psgs_w100.tsv'):   # format from the name, or fmt=...

Formats (each optionally gzip-compressed, detected by content):
  dpr_tsv  DPR's Wikipedia passages: a header line `id<TAB>text<TAB>title`, then one passage per
           line in that order, fields quoted as Python's csv module (DPR's reader) writes them.
           Chosen for names ending .tsv (or .tsv.gz).
  jsonl    one object per line: "text" (a string), optional "title" and "id" (string or integer;
           default: the line number). Chosen for .jsonl / .json.
  text     one passage per line (blank lines skipped), id = the line number, no title.
Ids must be unique. Errors are DataErrors naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import sys
import zlib
from typing import Iterator

from fido.data.errors import DataError

FORMATS = ('auto', 'dpr_tsv', 'jsonl', 'text')
DPR_HEADER = ['id', 'text', 'title']
_GZIP_MAGIC = b'\x1f\x8b'


def _strip_compression(path: str) -> str:
  return path[:-3] if path.endswith('.gz') else path


def detect_format(path: str, fmt: str = 'auto') -> str:
  """The corpus format: `fmt` itself unless 'auto', else from the file name (see module doc)."""
  if fmt not in FORMATS:
    raise DataError(f'corpus format {fmt!r}: expected one of {", ".join(FORMATS)}')
  if fmt != 'auto':
    return fmt
  name = _strip_compression(os.path.basename(path)).lower()
  if name.endswith('.tsv'):
    return 'dpr_tsv'
  if name.endswith(('.jsonl', '.json')):
    return 'jsonl'
  return 'text'


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its newline) of a UTF-8 text file, gunzipped when it
  starts with the gzip magic bytes; DataError naming the line that is not UTF-8, or the file."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: file not found')
  try:
    with open(path, 'rb') as f:
      compressed = f.read(2) == _GZIP_MAGIC
    with (gzip.open if compressed else open)(path, 'rb') as f:
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise DataError(f'{path}: line {n}: not valid UTF-8 (byte {e.start}: '
                          f'{raw[e.start:e.start + 1]!r})') from None
        yield n, (line.removeprefix('\ufeff') if n == 1 else line).rstrip('\r\n')
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: cannot read ({type(e).__name__}: {e})') from None


def _dpr_rows(path: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of a DPR tsv, read as DPR does (csv.reader, tab-delimited)."""
  csv.field_size_limit(sys.maxsize)
  lines = numbered_lines(path)
  number = [0]

  def text_lines():
    for n, line in lines:
      number[0] = n
      yield line

  try:
    for row in csv.reader(text_lines(), delimiter='\t'):
      yield number[0], row
  except csv.Error as e:
    raise DataError(f'{path}: line {number[0]}: malformed tab-separated line ({e})') from None


Passage = tuple[str, str, str]  # (id, title, text)


def _read_dpr_tsv(path: str) -> Iterator[tuple[int, str, str, str]]:
  header_seen = False
  for n, row in _dpr_rows(path):
    if not header_seen:
      if row != DPR_HEADER:
        raise DataError(f'{path}: line {n}: expected the DPR header "id<TAB>text<TAB>title", got '
                        f'{row[:3]!r}; a DPR passages file starts with it (or give '
                        "config.retrieve.corpus_format='text' or 'jsonl' for another layout)")
      header_seen = True
      continue
    if len(row) != 3:
      raise DataError(f'{path}: line {n}: expected 3 tab-separated fields (id, text, title), got '
                      f'{len(row)}')
    yield n, row[0], row[2], row[1]
  if not header_seen:
    raise DataError(f'{path}: file is empty')


def _read_jsonl(path: str) -> Iterator[tuple[int, str, str, str]]:
  for n, line in numbered_lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}: line {n} column {e.colno}: malformed JSON ({e.msg})') from None
    if not isinstance(obj, dict):
      raise DataError(f'{path}: line {n}: expected a JSON object {{"id", "title", "text"}}, got '
                      f'{type(obj).__name__}')
    for field in ('text', 'title'):
      if field == 'text' and field not in obj:
        raise DataError(f"{path}: line {n}: field 'text': missing")
      if obj.get(field) is not None and not isinstance(obj[field], str):
        raise DataError(f"{path}: line {n}: field '{field}': expected a string, got "
                        f'{type(obj[field]).__name__}')
    pid = obj.get('id', n)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
      raise DataError(f"{path}: line {n}: field 'id': expected a string or an integer, got "
                      f'{type(pid).__name__}')
    yield n, str(pid), obj.get('title') or '', obj['text'] or ''


def _read_text(path: str) -> Iterator[tuple[int, str, str, str]]:
  for n, line in numbered_lines(path):
    if line.strip():
      yield n, str(n), '', line.strip()


def read_passages(path: str | os.PathLike, fmt: str = 'auto') -> Iterator[Passage]:
  """Yields (id, title, text) of every passage of `path`, in file order (see the module doc for
  the formats); DataError on a bad line, a repeated id or a file without passages."""
  path = os.fspath(path)
  fmt = detect_format(path, fmt)
  reader = {'dpr_tsv': _read_dpr_tsv, 'jsonl': _read_jsonl, 'text': _read_text}[fmt]
  seen = set()
  for line, pid, title, text in reader(path):
    if not pid.strip():
      raise DataError(f"{path}: line {line}: field 'id': empty")
    if pid in seen:
      raise DataError(f'{path}: line {line}: passage id {pid!r} occurs more than once: ids must '
                      'be unique')
    seen.add(pid)
    yield pid, title, text
  if not seen:
    raise DataError(f'{path}: no passages (read as {fmt})')


def read_corpus(path: str | os.PathLike, fmt: str = 'auto') -> list[Passage]:
  """Every passage of `path`, as `read_passages` yields them."""
  return list(read_passages(path, fmt))
