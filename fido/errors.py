"""The user-error contract: what a user got wrong, as opposed to what fido got wrong.

Every error caused by the user (flags, config files and fields, data files, tokenizers,
checkpoints, workdirs, sizes that cannot fit) is a `UserError`. `run.py` prints its message as one
line (or two) on stderr and exits with `EXIT_USER_ERROR`, without a traceback; anything else is a
bug and keeps its traceback. The message says what is wrong, where (file / record / field / flag)
and, where it is not obvious, what to do.
"""

from __future__ import annotations

import difflib
from typing import Iterable

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A mistake in the user's input; the message alone tells them what to fix."""


class WorkdirError(UserError, ValueError):
  """A workdir that cannot be used: another run's, not writable, a file."""


class CheckpointError(UserError, FileNotFoundError):
  """A checkpoint (or checkpoint directory) that is missing, incomplete or unreadable."""


class MissingInputError(UserError, FileNotFoundError):
  """An input file or directory named by the config or a flag does not exist."""


class OutputExistsError(UserError, FileExistsError):
  """An output location already holds something that must not be overwritten."""


class ConversionError(UserError, ValueError):
  """A checkpoint that cannot be converted; the message names the file, tensor or config field."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
  """' (did you mean "x"?)' for the closest candidate, or '' when none is close."""
  close = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
  return f' (did you mean {close[0]!r}?)' if close else ''
