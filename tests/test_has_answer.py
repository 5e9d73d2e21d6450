"""fido.data.has_answer against DPR's definition, written here with the `regex` package as DPR
writes it (SimpleTokenizer's pattern, NFD, lowercase, contiguous token match)."""

import sys
import unicodedata

import pytest
import regex

from fido.data.has_answer import has_answer, normalized_tokens, simple_tokenize

_DPR_PATTERN = regex.compile(r'([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])',
                             flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)


def dpr_tokens(text):
  return [m.group() for m in _DPR_PATTERN.finditer(text)]


def dpr_has_answer(answers, text):
  """DPR's qa_validation.has_answer(answers, text, SimpleTokenizer(), 'string')."""
  words = [t.lower() for t in dpr_tokens(unicodedata.normalize('NFD', text))]
  for answer in answers:
    answer = [t.lower() for t in dpr_tokens(unicodedata.normalize('NFD', answer))]
    for i in range(0, len(words) - len(answer) + 1):
      if answer == words[i:i + len(answer)]:
        return True
  return False


def test_tokenizer_classifies_every_character_as_dpr_does():
  """Every code point that both Python's Unicode database and regex's (maybe newer) assign."""
  assigned = ''.join(chr(c) for c in range(sys.maxunicode + 1)
                     if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != 'Cn')
  unknown_to_regex = set(regex.findall(r'\p{Cn}', assigned))
  chars = [c for c in assigned if c not in unknown_to_regex]
  assert len(chars) > 140_000
  for text in (''.join(chars), ' '.join(chars)):  # runs, and each character alone
    assert simple_tokenize(text) == dpr_tokens(text)


CASES = [
    (['Georges Bizet'], 'Carmen is an opera by the French composer Georges Bizet.', True),
    (['georges BIZET'], 'composer Georges Bizet.', True),               # uncased
    (['Bizet'], 'composer Georges Bizets.', False),                     # whole tokens only
    (['art'], 'a party', False),
    (['U.S.'], 'the U. S. army', True),                                 # '.' is its own token
    (['U.S.'], 'the US army', False),
    (['1,000'], 'about 1 , 000 people', True),
    (['café'], 'the cafe\u0301 opens', True),                           # NFD both sides
    (['cafe\u0301'], 'the café opens', True),
    (['cafe'], 'the café opens', False),                                # accents are kept
    (['Straße'], 'die STRASSE', False),                                 # lower(), not casefold()
    (['ΟΔΟΣ'], 'η οδος', True),
    (['東京'], '東京は日本の首都', False),                                # one run: one token
    (['東京'], '東京 は', True),
    (['x'], '', False),
    ([''], '', True),                                                   # no tokens: matches
    (['  '], 'anything', True),
    ([], 'anything', False),
    (['nope', 'Paris'], 'Paris, France', True),                         # any answer
    (['New\tYork'], 'in new york city', True),                          # tabs are not tokens
    (['e-mail'], 'send an e - mail', True),
    (['\u200bword'], 'a word', True),                                   # format chars dropped
]


@pytest.mark.parametrize('answers, text, expected', CASES)
def test_has_answer_edge_cases_agree_with_dpr(answers, text, expected):
  assert dpr_has_answer(answers, text) == expected  # the case itself states DPR's behaviour
  assert has_answer(answers, text) == expected


def test_normalized_tokens():
  assert normalized_tokens('The Café, 2nd!') == ['the', 'cafe\u0301', ',', '2nd', '!']
