"""Tests for fido.data.features: the FiD input string, passage/target arrays, masks, errors."""

import pathlib

import numpy as np
import pytest

from fido.data import features, synthetic
from fido.data.errors import DataError
from fido.data.fid_format import read_fid_file
from fido.data.tokenizer import load_tokenizer, train_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
T5_SPIECE = pathlib.Path(__file__).resolve().parent / "fixtures" / "t5_spiece.model"  # T5's own, Apache-2.0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  lines = synthetic.generate(seed=0, n_train=80, n_dev=20, n_test=20)["corpus"]
  for name in ("nq_dpr.json", "tqa_dpr.jsonl", "webq.jsonl", "corpus.txt"):
    lines += (FIXTURES / name).read_text().splitlines()
  return load_tokenizer(train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "sp", 300,
                                        model_type="bpe"))


@pytest.fixture(scope="module")
def nq():
  return read_fid_file(FIXTURES / "nq_dpr.json")[0]


def test_fid_input_string_format():
  assert (features.fid_passage_text("who?", "Carmen", "An opera.")
          == "question: who? title: Carmen context: An opera.")
  assert features.closed_book_text("who?") == "question: who?"


def test_passages_shapes_order_eos_and_padding(tok, nq):
  record = nq[1]  # two passages
  ids, mask = features.encode_passages(tok, record, n_passages=4, passage_len=64)
  assert ids.shape == mask.shape == (4, 64)
  assert ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(mask, ids != 0)
  assert not mask[2:].any() and not ids[2:].any()  # missing passages: padded and masked
  for p, ctx in enumerate(record["ctxs"]):  # ctxs already by descending score
    n = mask[p].sum()
    assert ids[p, n - 1] == tok.eos_id
    expected = features.fid_passage_text(record["question"], ctx["title"], ctx["text"])
    assert tok.decode(ids[p]) == expected
  assert tok.decode(ids[0]).endswith("Paris is the capital and most populous city of France.")


def test_first_n_passages_by_score(tok, nq):
  ids, _ = features.encode_passages(tok, nq[0], n_passages=1, passage_len=64)
  assert "title: Opera" in tok.decode(ids[0])  # the highest score (83.2), not the first in the file


def test_truncation_keeps_eos(tok, nq):
  ctx = nq[0]["ctxs"][0]
  length = len(tok.encode(f"question: {nq[0]['question']} title: {ctx['title']} context:")) + 5
  ids, mask = features.encode_passages(tok, nq[0], n_passages=1, passage_len=length)
  assert mask.all()
  assert ids[0, -1] == tok.eos_id
  full = tok.encode(features.fid_passage_text(nq[0]["question"], ctx["title"], ctx["text"]))
  assert len(full) > length
  assert list(ids[0, :-1]) == full[:length - 1]


def test_prefix_longer_than_passage_len_is_an_error(tok, nq):
  prefix = len(tok.encode("question: who wrote the opera carmen"))
  with pytest.raises(DataError, match=r"nq_dpr.json: record 1: field 'question': passage prefix"):
    features.encode_passages(tok, nq[0], n_passages=2, passage_len=prefix)
  long_title = {**nq[0], "ctxs": [{**nq[0]["ctxs"][0], "title": "word " * 40}]}
  with pytest.raises(DataError, match=r"field 'ctxs\[0\].title': passage prefix .* passage_len=32"):
    features.encode_passages(tok, long_title, n_passages=1, passage_len=32)


def test_config_checks(tok):
  features.check_qa_lengths(tok, 10, 32, 8)
  with pytest.raises(DataError, match="n_passages must be >= 1, got 0"):
    features.check_qa_lengths(tok, 0, 32, 8)
  with pytest.raises(DataError, match="passage_len 4 is smaller than the passage prefix"):
    features.check_qa_lengths(tok, 1, 4, 8)
  with pytest.raises(DataError, match="target_len must be >= 2"):
    features.check_qa_lengths(tok, 1, 32, 1)


def test_closed_book_single_passage(tok):
  webq = read_fid_file(FIXTURES / "webq.jsonl", require_passages=False)[0]
  ids, mask = features.encode_passages(tok, webq[0], n_passages=3, passage_len=32)
  assert tok.decode(ids[0]) == "question: what language do they speak in brazil?"
  assert mask[0].any() and not mask[1:].any()
  with pytest.raises(DataError, match="webq.jsonl: record 1: field 'question': closed-book input"):
    features.encode_passages(tok, webq[0], n_passages=1, passage_len=4)


def test_target_prefers_target_field_then_first_answer():
  tqa = read_fid_file(FIXTURES / "tqa_dpr.jsonl")[0]
  assert features.choose_target(tqa[0]) == "Mars"
  assert features.choose_target(tqa[1]) == "Leonardo da Vinci"
  assert features.choose_target({"answers": [], "target": None}) == ""


def test_random_answer_is_deterministic_and_covers_answers(nq):
  picks = [features.choose_target(nq[0], "random", np.random.default_rng(s)) for s in range(20)]
  assert set(picks) == {"Georges Bizet", "Bizet"}
  again = [features.choose_target(nq[0], "random", np.random.default_rng(s)) for s in range(20)]
  assert picks == again
  with pytest.raises(DataError, match="answer_choice must be one of"):
    features.choose_target(nq[0], "longest")


def test_target_arrays(tok):
  ids, mask = features.encode_target(tok, "Leonardo da Vinci", 16)
  n = len(tok.encode("Leonardo da Vinci"))
  assert ids.shape == mask.shape == (16,)
  assert ids[n] == tok.eos_id and mask.sum() == n + 1 and not ids[n + 1:].any()
  assert tok.decode(ids) == "Leonardo da Vinci"
  ids, mask = features.encode_target(tok, "Leonardo da Vinci", 3)  # truncated to T-1 + EOS
  assert list(ids) == tok.encode("Leonardo da Vinci")[:2] + [tok.eos_id] and mask.all()
  ids, mask = features.encode_target(tok, "", 4)
  assert list(ids) == [tok.eos_id, 0, 0, 0] and list(mask) == [True, False, False, False]


def test_example_and_padding_example(tok, nq):
  ex = features.encode_qa_example(tok, nq[2], n_passages=5, passage_len=40, target_len=16,
                                  example_index=7)
  assert ex["example_index"] == 7 and ex["example_index"].dtype == np.int32
  assert ex["passage_mask"].sum(axis=1).astype(bool).tolist() == [True] * 4 + [False]
  assert tok.decode(ex["target_ids"]) == "9 November 1989"
  empty = features.empty_qa_example(5, 40, 16)
  assert {k: v.shape for k, v in empty.items()} == {k: v.shape for k, v in ex.items()}
  assert empty["example_index"] == -1 and not any(empty[k].any() for k in empty if "mask" in k)


def test_t5_ids_match_hf_convention(nq):
  t5 = load_tokenizer(T5_SPIECE)
  ids, _ = features.encode_passages(t5, nq[1], n_passages=1, passage_len=64)
  text = features.fid_passage_text(nq[1]["question"], "Paris", nq[1]["ctxs"][0]["text"])
  expected = t5.encode(text) + [1]
  assert list(ids[0, :len(expected)]) == expected
  assert expected[:3] == [822, 10, 125]  # '▁question', ':', '▁what'


def test_answer_first_moves_gold_passages_to_the_front_in_order():
  ctxs = [{"title": t, "text": x} for t, x in
          (("a", "no"), ("b", "has Vel"), ("c", "no"), ("d", "Vel again"))]
  record = {"question": "q", "answers": ["vel"], "ctxs": ctxs}
  out = features.answer_first(record)
  assert [c["title"] for c in out["ctxs"]] == ["b", "d", "a", "c"]
  assert [c["title"] for c in record["ctxs"]] == ["a", "b", "c", "d"]  # input untouched
