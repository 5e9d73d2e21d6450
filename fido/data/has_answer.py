"""DPR's answer-in-passage check (`has_answer`), the definition behind retrieval recall@k tables.

Re-implemented from DPR's `dpr/data/qa_validation.py` (`has_answer`, match_type 'string') and
`dpr/utils/tokenizers.py` (`SimpleTokenizer`, from DrQA), without the `regex` package:

  * the passage text and every answer are NFD-normalised (`unicodedata.normalize('NFD', ...)`);
  * SimpleTokenizer's pattern `([\\p{L}\\p{N}\\p{M}]+)|([^\\p{Z}\\p{C}])` splits text into maximal
    runs of letters, numbers and marks, and single characters that are neither separators (Z*)
    nor other (C*: controls, format, unassigned, ...); everything else (spaces) is dropped;
  * tokens are lowercased (`str.lower`, DPR's `words(uncased=True)`);
  * a passage has an answer when the answer's token list occurs as a contiguous run of the
    passage's tokens. As in DPR, an answer with no tokens (empty, or only spaces) matches any
    passage, including an empty one.

Only the passage text is searched, not its title (DPR's `check_answer`). Unicode categories come
from Python's `unicodedata` (the `regex` package DPR uses may know a newer Unicode version: a
character unassigned in Python's database is category Cn here, so never a token).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence


def _is_alnum(ch: str) -> bool:
  """\\p{L}, \\p{N} or \\p{M}: a letter, number or mark (a character of a word token)."""
  return unicodedata.category(ch)[0] in 'LNM'


def _is_token_char(ch: str) -> bool:
  """[^\\p{Z}\\p{C}]: not a separator and not an 'other' character (a one-character token)."""
  return unicodedata.category(ch)[0] not in 'ZC'


# The same on ASCII text (letters and digits; the printable non-space characters), ~5x faster.
_ASCII_TOKENS = re.compile(r'[A-Za-z0-9]+|[!-/:-@\[-`{-~]')


def simple_tokenize(text: str) -> list[str]:
  """DPR's SimpleTokenizer words (case kept): alphanumeric runs and single other non-space chars."""
  if text.isascii():
    return _ASCII_TOKENS.findall(text)
  tokens, run = [], []
  for ch in text:
    if _is_alnum(ch):
      run.append(ch)
      continue
    if run:
      tokens.append(''.join(run))
      run = []
    if _is_token_char(ch):
      tokens.append(ch)
  if run:
    tokens.append(''.join(run))
  return tokens


def normalized_tokens(text: str) -> list[str]:
  """The tokens `has_answer` compares: NFD-normalised, tokenised, lowercased."""
  return [t.lower() for t in simple_tokenize(unicodedata.normalize('NFD', text))]


def contains(passage_tokens: Sequence[str], answer_tokens: Sequence[str]) -> bool:
  """Whether `answer_tokens` occurs as a contiguous run in `passage_tokens` ([] always does)."""
  n = len(answer_tokens)
  answer = list(answer_tokens)
  return any(list(passage_tokens[i:i + n]) == answer for i in range(len(passage_tokens) - n + 1))


def has_answer(answers: Iterable[str], text: str) -> bool:
  """DPR's `has_answer(answers, text, SimpleTokenizer(), 'string')`."""
  passage = normalized_tokens(text)
  return any(contains(passage, normalized_tokens(answer)) for answer in answers)
