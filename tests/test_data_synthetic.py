"""Tests for fido.data.synthetic: determinism, find-and-copy property, late variant, files."""

import json
import os
import re

import numpy as np
import pytest

from fido.data import features, synthetic
from fido.data.fid_format import read_fid_file
from fido.data.tokenizer import load_tokenizer

SMALL = dict(n_train=200, n_dev=40, n_test=40)


@pytest.fixture(scope="module")
def data():
  return synthetic.generate(seed=3, **SMALL)


def _contains(passage, answer):
  text = passage["title"] + " | " + passage["text"]
  return re.search(r"\b" + re.escape(answer) + r"\b", text, re.IGNORECASE) is not None


def _entity(question):
  return next(re.fullmatch(q.replace("?", r"\?").format(e="(.+)"), question).group(1)
              for _, q, _ in synthetic.ATTRIBUTES if re.fullmatch(
                  q.replace("?", r"\?").format(e=".+"), question))


def test_deterministic_from_seed(data):
  assert synthetic.generate(seed=3, **SMALL) == data
  assert synthetic.generate(seed=4, **SMALL) != data


def test_sizes_and_passage_counts(data):
  assert [len(data[s]) for s in ("train", "dev", "test")] == [200, 40, 40]
  assert all(len(r["ctxs"]) == 10 for s in ("train", "dev", "test") for r in data[s])
  wide = synthetic.generate(seed=0, n_train=20, n_dev=4, n_test=4, n_passages=14)
  assert len(wide["dev"][0]["ctxs"]) == 14


def test_answer_in_exactly_one_passage(data):
  for split in ("train", "dev", "test"):
    for r in data[split]:
      assert sum(_contains(c, r["answers"][0]) for c in r["ctxs"]) == 1, r


def _cell(passage):
  return tuple(passage["id"].rsplit("/", 1))


def test_passages_form_a_grid_that_counting_cannot_solve(data):
  counting_finds_gold = []
  for r in data["train"]:
    entity = _entity(r["question"])
    gold = next(c for c in r["ctxs"] if _contains(c, r["answers"][0]))
    attribute = _cell(gold)[1]
    cells = [_cell(c) for c in r["ctxs"]]
    assert _cell(gold) == (entity, attribute) and len(set(cells)) == 10
    entities, attributes = {e for e, _ in cells}, {a for _, a in cells}
    # A grid: every entity-attribute pair but at most len(attributes) - 1 dropped cells.
    assert len(entities) * len(attributes) - 10 < len(attributes)
    # Distractors sharing the entity and distractors sharing the attribute: both are needed.
    assert any(e == entity and a != attribute for e, a in cells)
    assert any(e != entity and a == attribute for e, a in cells)
    # Counting titles and facts: the gold passage is the unique most frequent one only by chance.
    score = {c: sum(e == c[0] for e, _ in cells) + sum(a == c[1] for _, a in cells) for c in cells}
    counting_finds_gold.append(sorted(score.values())[-2:] != [score[_cell(gold)]] * 2 and
                               score[_cell(gold)] == max(score.values()))
  assert np.mean(counting_finds_gold) < 0.3


def test_two_word_invented_answers_unique_in_their_record(data):
  for r in data["train"]:
    values = [c["text"] for c in r["ctxs"]]
    assert len(r["answers"][0].split()) == 2
    assert sum(r["answers"][0] in v for v in values) == 1
    assert len({c["title"] for c in r["ctxs"]}) == len({_cell(c)[0] for c in r["ctxs"]})


def test_dev_and_test_entities_unseen_in_training(data):
  def entities(split):
    titles = {c["title"] for r in data[split] for c in r["ctxs"]}
    return titles | {_entity(r["question"]) for r in data[split]}
  train = entities("train")
  assert not train & entities("dev") and not train & entities("test")
  assert not entities("dev") & entities("test")
  answers = lambda split: {r["answers"][0] for r in data[split]}
  assert not answers("train") & (answers("dev") | answers("test"))
  corpus_words = re.findall(r"\w+|[^\w\s]", " ".join(data["corpus"]))  # punctuation separates
  corpus_bigrams = set(zip(corpus_words, corpus_words[1:]))
  assert not any(tuple(e.split()) in corpus_bigrams for e in entities("dev") | entities("test"))
  assert all(tuple(e.split()) in corpus_bigrams for e in list(entities("train"))[:20])


def test_scores_decrease_and_rank_the_gold_passage_like_a_retriever(data):
  positions = []
  for r in data["train"]:
    scores = [c["score"] for c in r["ctxs"]]
    assert scores == sorted(scores, reverse=True)
    positions.append(next(i for i, c in enumerate(r["ctxs"]) if _contains(c, r["answers"][0])))
  # Usually first (it shares entity and attribute), but not always: the reader must still match.
  top1 = positions.count(0) / len(positions)
  assert 0.6 < top1 < 0.95, top1
  assert len(set(positions)) >= 3


def test_late_variant_puts_the_answer_after_the_first_words():
  early = synthetic.generate(seed=1, n_train=50, n_dev=10, n_test=10)
  late = synthetic.generate(seed=1, n_train=50, n_dev=10, n_test=10, answer_position="late")
  def word_offsets(d):  # where the answer starts in its passage's text, in words
    out = []
    for r in d["train"]:
      gold = next(c for c in r["ctxs"] if _contains(c, r["answers"][0]))
      out.append(len(gold["text"][:gold["text"].index(r["answers"][0])].split()))
    return np.array(out)
  assert word_offsets(early).max() <= 7 < 10 <= word_offsets(late).min()
  assert all(c["text"].endswith(".") for r in late["train"] for c in r["ctxs"])
  with pytest.raises(ValueError, match="answer_position"):
    synthetic.generate(seed=1, answer_position="middle")


def test_prepare_writes_readable_files_idempotently(tmp_path):
  paths = synthetic.prepare_synthetic(tmp_path, seed=0, **SMALL, vocab_size=600)
  for split, n in (("train", 200), ("dev", 40), ("test", 40)):
    records, report = read_fid_file(getattr(paths, split), n_passages=10)
    assert len(records) == n and not report.skipped and not report.warnings
  tok = load_tokenizer(paths.tokenizer)
  assert tok.num_pieces == 600 and tok.vocab_size == 768
  assert len(open(paths.corpus).read().splitlines()) == 200  # one document per training record
  stamp = {p: os.stat(p).st_mtime_ns for p in (paths.train, paths.tokenizer)}
  assert synthetic.prepare_synthetic(tmp_path, seed=0, **SMALL, vocab_size=600) == paths
  assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp  # nothing rewritten
  synthetic.prepare_synthetic(tmp_path, seed=1, **SMALL, vocab_size=600)
  assert json.load(open(paths.manifest))["seed"] == 1
  assert os.stat(paths.train).st_mtime_ns != stamp[paths.train]


def test_default_sizes_fit_a_small_cpu_model(tmp_path):
  """The embedded default: a 600-piece tokenizer, two-token names and answers, short passages."""
  paths = synthetic.prepare_synthetic(tmp_path, seed=0)
  tok = load_tokenizer(paths.tokenizer)
  assert tok.num_pieces == 600 and tok.vocab_size == 768
  dev, _ = read_fid_file(paths.dev)
  assert len(read_fid_file(paths.train)[0]) == 3000 and len(dev) == 300
  assert all(len(tok.encode(r["answers"][0])) == 2 for r in dev)
  assert all(len(tok.encode(c["title"])) == 2 for r in dev[:30] for c in r["ctxs"])
  passages = [len(tok.encode(features.fid_passage_text(r["question"], c["title"], c["text"])))
              for r in dev for c in r["ctxs"]]
  assert max(passages) + 1 <= 28  # with EOS: the embedded passage_len keeps every passage whole
  assert tok.encode("question:")[0] == tok.encode("question: x")[0]  # the FiD keywords are pieces
  assert len(tok.encode("question: title: context:")) <= 6
