"""QA metrics: SQuAD/FiD normalization, EM, token F1, aggregation; expected values worked by hand."""

import itertools
import random
import string

import pytest

from fido import metrics
from fido.metrics import aggregate, exact_match, normalize_answer, score, token_f1


@pytest.mark.parametrize('text, expected', [
    ('The Denver Broncos', 'denver broncos'),
    ('  A   cat,  an  apple. ', 'cat apple'),
    ('theater', 'theater'),                        # articles only as whole words
    ('Anna and the man', 'anna and man'),
    ('a.m.', 'am'),                                # punctuation removed before articles
    ('A-Team', 'ateam'),
    ('the the THE', ''),
    ('!!!...???', ''),                             # punctuation only
    ('', ''),
    ('Café Müller', 'café müller'),                # accents kept
    ('Ελληνικά  Κείμενο', 'ελληνικά κείμενο'),     # non-Latin scripts lower-cased, kept
    ('北京 大学', '北京 大学'),
    ('«Le Monde» — the paper', '«le monde» — paper'),  # only ASCII punctuation is stripped
    ('the\u0301 end', 'the\u0301 end'),            # a combining mark is part of the word (FiD's regex)
    ('na\u00efve_the', 'na\u00efvethe'),           # '_' is ASCII punctuation, removed first
    ('the\tcat\nsat', 'cat sat'),
])
def test_normalize_answer(text, expected):
  assert normalize_answer(text) == expected


def test_no_unicode_normalization_like_fid():
  # FiD/DPR EM do not NFD-normalize: precomposed and decomposed forms differ.
  assert exact_match('caf\u00e9', ['cafe\u0301']) == 0.0
  assert exact_match('Caf\u00e9', ['caf\u00e9']) == 1.0


def test_matches_fids_regex_based_normalization():
  """Property check against FiD's reference implementation (needs the `regex` package)."""
  regex = pytest.importorskip('regex')

  def fid_normalize(s):
    s = s.lower()
    s = ''.join(ch for ch in s if ch not in set(string.punctuation))
    return ' '.join(regex.sub(r'\b(a|an|the)\b', ' ', s).split())

  rng = random.Random(0)
  alphabet = (list('aAnNtThHeE .,-_') + ['\u0301', '\u0308', '\u200d', '\u00b2', '\u2040', '\u0663',
                                         '\u24b6', '\u2160', 'é', 'ß', 'İ', '\u3000', '·', '\u0e31'])
  for _ in range(3000):
    s = ''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    assert normalize_answer(s) == fid_normalize(s), repr(s)


def test_exact_match():
  assert exact_match('The Denver Broncos!', ['Denver Broncos']) == 1.0
  assert exact_match('Broncos', ['Denver Broncos', 'broncos.']) == 1.0  # max over golds
  assert exact_match('Broncos', ['Denver Broncos']) == 0.0
  assert exact_match('', ['']) == 1.0
  assert exact_match('', ['the']) == 1.0      # both normalize to ''
  assert exact_match('', ['x']) == 0.0
  assert exact_match('x', ['']) == 0.0
  assert exact_match('...', ['!?']) == 1.0    # punctuation only: both empty


def test_token_f1():
  # SQuAD v1.1 dev (Super Bowl 50): P = 3/3, R = 3/11 -> F1 = 6/14.
  gold = "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."
  assert token_f1('Santa Clara, California', [gold]) == pytest.approx(6 / 14)
  assert token_f1('Denver Broncos', ['Denver Broncos', 'Broncos']) == 1.0
  # bag of tokens with multiplicity: pred [x, x, y], gold [x, y, y] -> overlap 2, P = R = 2/3.
  assert token_f1('x x y', ['x y y']) == pytest.approx(2 / 3)
  # max over golds: 'new york' vs 'new york city' = 2*(1*2/3)/(1+2/3) = 0.8; vs 'york' = 2/3.
  assert token_f1('new york', ['york', 'New York City']) == pytest.approx(0.8)
  assert token_f1('', ['']) == 1.0            # both empty (SQuAD v2.0 rule; v1.1 gives 0)
  assert token_f1('', ['answer']) == 0.0
  assert token_f1('answer', ['']) == 0.0
  assert token_f1('the', ['a']) == 1.0        # both empty after normalization
  assert token_f1('paris', ['london']) == 0.0
  assert token_f1('北京 大学', ['北京']) == pytest.approx(2 / 3)
  assert token_f1('thé', ['the']) == 0.0      # 'thé' is not an article


def test_empty_gold_list_is_an_error():
  with pytest.raises(ValueError, match='no gold answers'):
    exact_match('x', [])
  with pytest.raises(ValueError, match='no gold answers'):
    token_f1('x', [])
  with pytest.raises(TypeError, match='list of answer strings'):
    exact_match('x', 'x')


def test_aggregate():
  rows = [score('Denver Broncos', ['Denver Broncos']), score('Santa Clara', ['Santa Clara, CA']),
          score('no', ['yes'])]
  assert rows[1] == {'exact_match': 0.0, 'f1': pytest.approx(0.8)}
  result = aggregate(rows)
  assert result['count'] == 3
  assert result['exact_match'] == pytest.approx(1 / 3)
  assert result['f1'] == pytest.approx((1 + 0.8 + 0) / 3)
  with pytest.raises(ValueError, match='no examples'):
    aggregate([])


def test_ascii_fast_path_removes_articles_as_the_unicode_path_does():
  """The ASCII fast path of normalize_answer must agree with the general word-character walk."""
  rng = random.Random(0)
  alphabet = list('atheny_1 .-') + ['the', 'an', 'a']
  for _ in range(2000):
    text = ''.join(rng.choices(alphabet, k=rng.randint(1, 12)))
    walk = ''.join(' ' if is_word and ''.join(run) in metrics._ARTICLES else ''.join(run)
                   for is_word, run in ((k, list(g)) for k, g in
                                        itertools.groupby(text, key=metrics._is_word_char)))
    assert metrics._remove_articles(text) == walk, text
