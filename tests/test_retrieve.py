"""Retrieval: corpus and question readers (good and malformed files), the BM25 index (reuse and
rebuild, top-k order and scores against BM25 computed by hand) and --mode=retrieve's files."""

import gzip
import json
import math
import os
import pathlib
import re

import ml_collections
import numpy as np
import pytest
from bm25s.stopwords import STOPWORDS_EN

from fido import bm25_index, experiment, retrieve
from fido.data.corpus import read_corpus
from fido.data.errors import DataError
from fido.data.questions import read_questions, webquestions_answers
from fido.errors import UserError

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'data'
DPR_TSV = ('id\ttext\ttitle\n'
           '1\t"Aaron ( or ; ""Ahärôn"") is a prophet, and the brother of Moses."\tAaron\n'
           '2\tCarmen is an opera in four acts by the French composer Georges Bizet.\tCarmen\n'
           '3\tBizet wrote Carmen; Carmen made Bizet famous after his death.\tGeorges Bizet\n'
           '4\tMars is the fourth planet from the Sun, the red planet.\tMars\n'
           '5\tParis is the capital and most populous city of France.\tParis\n'
           '6\tThe Berlin Wall fell on 9 November 1989.\tBerlin Wall\n')


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  return str(path)


# --------------------------------------------------------------------------------- corpora

def test_corpus_formats(tmp_path):
  tsv = read_corpus(_write(tmp_path, 'psgs.tsv', DPR_TSV))
  assert tsv[0] == ('1', 'Aaron', 'Aaron ( or ; "Ahärôn") is a prophet, and the brother of Moses.')
  assert len(tsv) == 6
  assert read_corpus(_write(tmp_path, 'psgs.tsv.gz', gzip.compress(DPR_TSV.encode()))) == tsv
  jsonl = read_corpus(_write(tmp_path, 'c.jsonl', '{"id": 7, "title": "T", "text": "a b"}\n\n'
                             '{"text": "no id or title"}\n'))
  assert jsonl == [('7', 'T', 'a b'), ('3', '', 'no id or title')]  # id defaults to the line
  assert read_corpus(FIXTURES / 'corpus.txt')[:2] == [
      ('1', '', 'The quick brown fox jumps over the lazy dog.'),
      ('2', '', 'A journey of a thousand miles begins with a single step.')]
  assert read_corpus(FIXTURES / 'corpus.txt')[2][0] == '4'  # blank line 3 skipped


@pytest.mark.parametrize('name, text, culprits', [
    ('nohead.tsv', '1\tx\tt\n', ['nohead.tsv', 'line 1', 'header']),
    ('cols.tsv', 'id\ttext\ttitle\n1\tx\n', ['cols.tsv', 'line 2', '3 tab-separated']),
    ('empty.tsv', '', ['empty.tsv', 'empty']),
    ('dup.tsv', 'id\ttext\ttitle\n1\tx\tt\n1\ty\tt\n', ['dup.tsv', 'line 3', "'1'"]),
    ('bad.jsonl', '{"text": "a"}\n{"text": \n', ['bad.jsonl', 'line 2', 'malformed JSON']),
    ('notext.jsonl', '{"title": "a"}\n', ['notext.jsonl', 'line 1', "'text'"]),
    ('idtype.jsonl', '{"text": "a", "id": [1]}\n', ['idtype.jsonl', "'id'", 'list']),
    ('array.jsonl', '[1, 2]\n', ['array.jsonl', 'line 1', 'object']),
    ('latin1.txt', b'ok\ncaf\xe9\n', ['latin1.txt', 'line 2', 'UTF-8']),
    ('blank.txt', '\n\n', ['blank.txt', 'no passages']),
])
def test_malformed_corpus_names_file_and_line(tmp_path, name, text, culprits):
  _assert_data_error(read_corpus, _write(tmp_path, name, text), culprits)


def _assert_data_error(reader, path, culprits):
  """`reader(path)` raises DataError, its message naming every culprit (file, line, field)."""
  with pytest.raises(DataError) as e:
    reader(path)
  for culprit in culprits:
    assert culprit in str(e.value), (culprit, str(e.value))


# ------------------------------------------------------------------------------- questions

def test_question_formats(tmp_path):
  fid = read_questions(FIXTURES / 'nq_dpr.json')
  assert fid[0]['answers'] == ['Georges Bizet', 'Bizet'] and len(fid[0]['ctxs']) == 3
  nq_open = read_questions(FIXTURES / 'nq_open.jsonl')
  assert nq_open[0]['answers'] == ['Coral Sea', 'Queensland, Australia'] and not nq_open[0]['ctxs']
  assert read_questions(FIXTURES / 'webq.jsonl')[0]['answers'] == ['Portuguese']
  original = _write(tmp_path, 'webq_original.json', json.dumps([
      {'url': 'u', 'utterance': 'what does jamaican people speak?',
       'targetValue': '(list (description "Jamaican English") (description Patois))'}]))
  assert read_questions(original)[0]['question'] == 'what does jamaican people speak?'
  assert read_questions(original)[0]['answers'] == ['Jamaican English', 'Patois']
  assert webquestions_answers('(list (description "say \\"hi\\""))') == ['say "hi"']
  qas = read_questions(_write(tmp_path, 'nq-test.qa.csv',
                              "who wrote carmen\t['Georges Bizet', 'Bizet']\n"
                              '"quoted, question"\t["x"]\n'))
  assert [(q['question'], q['answers']) for q in qas] == [
      ('who wrote carmen', ['Georges Bizet', 'Bizet']), ('quoted, question', ['x'])]
  unlabeled = read_questions(_write(tmp_path, 'q.jsonl', '{"question": "why?"}\n'))
  assert unlabeled[0]['answers'] == [] and unlabeled[0]['ctxs'] == []


@pytest.mark.parametrize('name, text, culprits', [
    ('fields.csv', 'q1\t["a"]\nq2\n', ['fields.csv', 'line 2', '2 tab-separated']),
    ('literal.csv', 'q1\t[a, b]\n', ['literal.csv', 'line 1', 'Python list']),
    ('strings.csv', 'q1\t[1, 2]\n', ['strings.csv', 'line 1', 'list of strings']),
    ('noq.jsonl', '{"answer": ["a"]}\n', ['noq.jsonl', 'line 1', "'question'"]),
    ('answers.jsonl', '{"question": "q", "answers": "a"}\n', ['answers.jsonl', "'answers'"]),
])
def test_malformed_questions_name_file_and_line(tmp_path, name, text, culprits):
  _assert_data_error(read_questions, _write(tmp_path, name, text), culprits)


# ----------------------------------------------------------------------------------- index

def hand_bm25(passages, query, k1=0.9, b=0.4):
  """Lucene's BM25 over "title text", bm25s's tokens (lowercase words of 2+ characters, English
  stop words removed): sum over query terms of idf * tf / (tf + k1 (1 - b + b |d| / avgdl))."""
  tokenize = lambda s: [w for w in re.findall(r'\b\w\w+\b', s.lower()) if w not in STOPWORDS_EN]
  docs = [tokenize(f'{title} {text}') for _, title, text in passages]
  avgdl = sum(map(len, docs)) / len(docs)
  scores = np.zeros(len(docs))
  for term in tokenize(query):
    df = sum(term in d for d in docs)
    idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
    for i, d in enumerate(docs):
      tf = d.count(term)
      scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
  return scores


def test_search_orders_by_bm25_score_with_ties_in_corpus_order(tmp_path):
  corpus = _write(tmp_path, 'psgs.tsv', DPR_TSV + '7\tMars is the fourth planet from the Sun, the '
                  'red planet.\tMars\n')  # a copy of passage 4: a tie
  index, built = bm25_index.open_index(corpus, str(tmp_path / 'index'), bm25_index.Settings(),
                                       progress=False)
  assert built and len(index) == 7
  passages = read_corpus(corpus)
  for query in ('who wrote the opera carmen', 'the red planet mars', 'bizet carmen death'):
    expected = hand_bm25(passages, query)
    indices, scores = index.search([query], k=4)
    order = sorted(range(7), key=lambda i: (-expected[i], i))[:4]
    assert indices[0].tolist() == order, query
    np.testing.assert_allclose(scores[0], expected[order], rtol=1e-5)
  indices, _ = index.search(['red planet'], k=2)
  assert indices[0].tolist() == [3, 6]
  assert index.passage(6) == dict(id='7', title='Mars', text=passages[6][2])
  assert index.search(['zzz unknown'], k=100)[0].shape == (1, 7)  # k capped at the corpus
  index.close()


def test_ties_at_the_kth_place_keep_corpus_order_so_top_k_is_a_prefix(tmp_path):
  corpus = _write(tmp_path, 'same.txt', 'the red planet\n' * 40 + 'red planet mars\n' + 'x y\n' * 9)
  index, _ = bm25_index.open_index(corpus, str(tmp_path / 'index'), bm25_index.Settings(),
                                   progress=False)
  top = index.search(['red planet mars'], k=50)[0][0].tolist()
  assert top[:41] == [40] + list(range(40))
  for k in (1, 2, 5, 17, 41):
    assert index.search(['red planet mars'], k=k)[0][0].tolist() == top[:k]
  index.close()


def test_index_is_reused_and_rebuilt_when_the_corpus_or_the_settings_change(tmp_path):
  corpus, index_dir = _write(tmp_path, 'c.jsonl', '{"text": "alpha beta"}\n'), str(tmp_path / 'i')
  said = []
  opened = lambda settings=bm25_index.Settings(): bm25_index.open_index(
      corpus, index_dir, settings, progress=False, announce=said.append)[1]
  assert opened() and 'building' in said[-2] and 'indexed 1 passages' in said[-1]
  assert not opened() and 'unchanged' in said[-1]
  os.utime(corpus, ns=(1, 1))  # touched, same content: the hash decides, once
  assert not opened() and 'same content' in said[-1]
  assert not opened() and 'size and modification time' in said[-1]
  assert opened(bm25_index.Settings(k1=1.2)) and 'k1 0.9 -> 1.2' in said[-2]
  with open(corpus, 'a') as f:
    f.write('{"text": "gamma"}\n')
  assert opened(bm25_index.Settings(k1=1.2)) and 'corpus changed' in said[-2]
  assert len(bm25_index.Index(index_dir)) == 2
  assert not [p for p in os.listdir(tmp_path) if 'tmp' in p]  # no half-built index left


# -------------------------------------------------------------------------- --mode=retrieve

def test_run_retrieve_writes_fid_files_with_has_answer_and_recall(tmp_path):
  config = experiment.default_config()
  config.data = None
  config.retrieve.update(corpus=_write(tmp_path, 'psgs.tsv', DPR_TSV), top_k=3, progress=False,
                         recall_at=(1, 2, 5),
                         questions=','.join([str(FIXTURES / 'nq_dpr.json'), _write(
                             tmp_path, 'qs.qa.csv', "who is the brother of moses\t['Aaron']\n"
                             "when did the berlin wall fall\t['1990']\n")]))
  workdir = str(tmp_path / 'run')
  result = retrieve.run_retrieve(config, workdir)
  assert result['index_built'] and result['passages'] == 6
  nq, qs = result['files']
  records = [json.loads(line) for line in open(nq['output'])]
  assert [c['id'] for c in records[0]['ctxs']] == ['2', '3', '1']  # opera carmen
  assert [c['has_answer'] for c in records[0]['ctxs']] == [True, True, False]
  assert records[0]['ctxs'][0]['score'] > records[0]['ctxs'][1]['score'] > 0
  assert set(records[0]) == {'question', 'answers', 'ctxs'}
  assert set(records[0]['ctxs'][0]) == {'id', 'title', 'text', 'score', 'has_answer'}
  # Top-1 hits: carmen yes, paris yes, berlin wall yes; top-1 of the qas file: Aaron yes, 1990 no.
  assert nq['recall'] == {'top-1': 1.0, 'top-2': 1.0} and qs['recall']['top-1'] == 0.5
  assert json.load(open(os.path.join(workdir, 'qs.recall.json')))['recall'] == qs['recall']
  table = open(os.path.join(workdir, 'recall.md')).read()
  assert '| nq_dpr.json | 3 | 100.0 | 100.0 |' in table
  assert '| qs.qa.csv | 2 | 50.0 | 50.0 |' in table
  with pytest.raises(UserError, match='config.retrieve.top_k=0'):
    retrieve.run_retrieve(ml_collections.ConfigDict(dict(config, retrieve=dict(
        config.retrieve, top_k=0))), workdir)
  again = retrieve.run_retrieve(config, workdir)
  speed = lambda files: [dict(f, queries_per_second=None) for f in files]
  assert not again['index_built'] and speed(again['files']) == speed(result['files'])


def test_recall_at_k_is_the_share_of_questions_with_a_hit_in_the_top_k():
  hits = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]], bool)
  assert retrieve.recall_at(hits, (1, 2, 3, 20)) == {'top-1': 0.25, 'top-2': 0.5, 'top-3': 0.75}


def test_synthetic_corpus_pools_every_split(tmp_path):
  config = experiment.default_config()
  config.data.update(dir=str(tmp_path / 'syn'), n_passages=4)
  config.data.synthetic.update(n_train=30, n_dev=2, n_test=3, vocab_size=300)
  corpus, questions = retrieve.resolve_inputs(config)
  passages = read_corpus(corpus)
  assert len(passages) == (30 + 2 + 3) * 4 and passages[0][0] == 'train:1:0'
  assert questions == [str(tmp_path / 'syn' / 'test.jsonl')]
  config.data.source, config.data.tokenizer = 'files', corpus  # any existing file
  with pytest.raises(UserError, match='config.retrieve.corpus is empty'):
    retrieve.resolve_inputs(config)
