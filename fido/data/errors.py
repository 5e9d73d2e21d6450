"""The one error type of fido.data: bad input named by file, record and field."""

from __future__ import annotations

from fido.errors import UserError


class DataError(UserError, ValueError):
  """Bad input data or configuration.

  The message names the file, the record (1-based line for JSONL, 1-based position in a JSON array)
  and the field where they are known, e.g. `train.jsonl: line 7: field 'answers': expected a list`.
  """


def where(path: object = None, record: object = None, field: str | None = None) -> str:
  """Formats a location prefix `path: record N: field 'f': ` from the parts that are known."""
  parts = []
  if path is not None:
    parts.append(str(path))
  if record is not None:
    parts.append(str(record))
  if field is not None:
    parts.append(f"field '{field}'")
  return "".join(p + ": " for p in parts)
