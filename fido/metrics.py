"""Open-domain QA metrics: SQuAD answer normalization, exact match and token F1 (FiD's convention).

Normalization is the SQuAD v1.1 evaluation script's, exactly as FiD's `src/evaluation.py`
(`normalize_answer`, used by `ems`) and DPR's `qa_validation.exact_match_score` apply it for NQ and
TriviaQA EM: lowercase (`str.lower`), drop ASCII punctuation (`string.punctuation`), replace the
whole words a / an / the by a space, collapse whitespace.

Unicode convention (chosen to reproduce FiD/DPR EM):
  * No Unicode normalization. FiD and DPR call `unicodedata.normalize('NFD', ...)` only inside
    `has_answer` (retrieval accuracy), never for EM; ORQA's EM applies NFD, FiD's does not. So
    'café' (precomposed) and 'cafe\u0301' (decomposed) differ, and accents are never stripped.
  * Only ASCII punctuation is removed ('¿', '«', '—' stay, as in the reference scripts).
  * Article boundaries follow FiD's `regex.sub(r'\\b(a|an|the)\\b', ...)`: with the `regex`
    package, word characters are letters, marks, decimal digits, letter numbers, connector
    punctuation and zero-width joiners. This differs from the standard `re` module on text such as
    'the\u0301' (re would drop 'the'), so we do not use `\\b` from `re`; see `_is_word_char`.
  * Non-Latin scripts pass through unchanged; tokens for F1 are `str.split()` pieces, so a
    Chinese answer without spaces is a single token.

F1 is SQuAD's bag-of-tokens F1 (Counter overlap). One deliberate difference from the v1.1 script:
when prediction and gold both normalize to nothing, F1 is 1.0 (SQuAD v2.0's rule) instead of 0.0,
so that F1 >= EM always holds; when only one is empty it is 0.0 in both versions. EM is unaffected.
"""

from collections import Counter
import itertools
import re
import string
from typing import Iterable, Mapping, Sequence
import unicodedata

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = frozenset(('a', 'an', 'the'))
# `regex`'s \w also covers Other_Alphabetic symbols: the circled / squared Latin letters.
_ALPHABETIC_SYMBOLS = ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169), (0x1F170, 0x1F189))


def _is_word_char(ch: str) -> bool:
  """A word character as the `regex` package's Unicode `\\w` (FiD's article removal) defines it."""
  category = unicodedata.category(ch)
  if category[0] in 'LM' or category in ('Nd', 'Nl', 'Pc') or ch in '\u200c\u200d':
    return True
  code = ord(ch)
  return any(lo <= code <= hi for lo, hi in _ALPHABETIC_SYMBOLS)


_ASCII_ARTICLES = re.compile(r'\b(a|an|the)\b', re.ASCII)


def _remove_articles(text: str) -> str:
  """`regex.sub(r'\\b(a|an|the)\\b', ' ', text)`: an article is a whole maximal run of word chars."""
  if text.isascii():  # the common case, ~50x faster: on ASCII, re's \w is regex's Unicode \w
    return _ASCII_ARTICLES.sub(' ', text)
  pieces = []
  for is_word, run in itertools.groupby(text, key=_is_word_char):
    word = ''.join(run)
    pieces.append(' ' if is_word and word in _ARTICLES else word)
  return ''.join(pieces)


def normalize_answer(s: str) -> str:
  """SQuAD/FiD normalization: lower, strip ASCII punctuation, drop articles, collapse whitespace."""
  text = s.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCTUATION)
  return ' '.join(_remove_articles(text).split())


def _check_golds(golds: Sequence[str] | str) -> Sequence[str]:
  if isinstance(golds, str):
    raise TypeError(f'golds must be a list of answer strings, got the string {golds!r}')
  golds = list(golds)
  if not golds:
    raise ValueError('no gold answers to compare against: every evaluated example needs at least '
                     'one answer (check that the eval file has an "answers" list)')
  return golds


def exact_match(prediction: str, golds: Sequence[str]) -> float:
  """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
  normalized = normalize_answer(prediction)
  return float(any(normalized == normalize_answer(g) for g in _check_golds(golds)))


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
  if not prediction_tokens or not gold_tokens:
    return float(prediction_tokens == gold_tokens)  # both empty: 1 (SQuAD v2.0); one empty: 0
  num_same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
  """SQuAD token F1 of the prediction against its best-matching gold answer."""
  prediction_tokens = normalize_answer(prediction).split()
  return max(_f1(prediction_tokens, normalize_answer(g).split()) for g in _check_golds(golds))


def score(prediction: str, golds: Sequence[str]) -> dict[str, float]:
  """Per-example metrics, the input of `aggregate`."""
  return {'exact_match': exact_match(prediction, golds), 'f1': token_f1(prediction, golds)}


def aggregate(per_example: Iterable[Mapping[str, float]]) -> dict[str, float]:
  """Means of 'exact_match' and 'f1' over examples, and their 'count' (no examples: ValueError)."""
  rows = list(per_example)
  n = len(rows)
  if n == 0:
    raise ValueError('aggregate() got no examples: a mean over nothing is undefined')
  return {'exact_match': sum(float(r['exact_match']) for r in rows) / n,
          'f1': sum(float(r['f1']) for r in rows) / n,
          'count': n}
