"""Tests for fido.data.span_corruption: T5's lengths, noise statistics, exact reconstruction."""

import pathlib

import numpy as np
import pytest

from fido.data import span_corruption as sc
from fido.data import synthetic
from fido.data.errors import DataError
from fido.data.tokenizer import load_tokenizer, train_tokenizer

T5_SPIECE = pathlib.Path(__file__).resolve().parent / "fixtures" / "t5_spiece.model"  # T5's own, Apache-2.0


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  lines = synthetic.generate(seed=0, n_train=80, n_dev=20, n_test=20)["corpus"]
  return load_tokenizer(train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "sp", 250,
                                        model_type="bpe"))


def _doc(tok, n, seed=0):
  return np.random.default_rng(seed).integers(3, tok.num_pieces, n).astype(np.int32)


def test_t5_default_lengths():
  assert sc.span_corruption_lengths(512) == (568, 114)
  assert sc.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)


def test_noise_fraction_and_span_length_statistics():
  rng = np.random.default_rng(0)
  length, fractions, span_lengths = 568, [], []
  for _ in range(200):
    mask = sc.random_spans_noise_mask(length, 0.15, 3.0, rng)
    assert not mask[0]  # starts with a non-noise span
    fractions.append(mask.mean())
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    starts, ends = edges[::2], edges[1::2]
    assert len(starts) == 28  # round(85 / 3)
    span_lengths.extend(ends - starts)
  assert np.allclose(fractions, 85 / 568)  # round(568 * 0.15) noise tokens, exactly
  assert abs(np.mean(span_lengths) - 3.0) < 0.1
  assert min(span_lengths) >= 1 and max(span_lengths) > 3  # random lengths, not all equal


def test_corrupt_and_reconstruct(tok):
  rng = np.random.default_rng(1)
  for n in (2, 3, 10, 57, 568):
    tokens = _doc(tok, n, seed=n)
    mask = sc.random_spans_noise_mask(n, 0.15, 3.0, rng)
    inputs, targets = sc.corrupt(tokens, mask, tok)
    assert sc.reconstruct(inputs, targets, tok) == tokens.tolist()
    n_spans = sum(map(tok.is_sentinel, inputs))
    sentinels = [int(t) for t in inputs if tok.is_sentinel(t)]
    assert sentinels == [tok.sentinel_id(i) for i in range(n_spans)]
    assert len(inputs) + len(targets) == n + 2 * n_spans


def test_example_matches_t5_sizes_and_reconstructs_a_window(tok):
  doc = _doc(tok, 2000)
  ex = sc.span_corrupt_example(doc, tok, np.random.default_rng(3))
  assert ex["inputs"].shape == ex["inputs_mask"].shape == (512,)
  assert ex["targets"].shape == ex["targets_mask"].shape == (114,)
  assert ex["inputs_mask"].all() and ex["targets_mask"].all()  # 568 tokens fill both exactly
  assert ex["inputs"][-1] == tok.eos_id and ex["targets"][-1] == tok.eos_id
  assert ex["targets"][0] == tok.sentinel_id(0)
  window = sc.reconstruct(ex["inputs"], ex["targets"], tok)
  assert len(window) == 568
  assert any(doc[s:s + 568].tolist() == window for s in range(len(doc) - 567))


def test_short_document_is_padded(tok):
  ex = sc.span_corrupt_example(_doc(tok, 40), tok, np.random.default_rng(0), inputs_length=64)
  n_in, n_tgt = ex["inputs_mask"].sum(), ex["targets_mask"].sum()
  assert ex["targets"].shape == (14,)
  assert n_in < 64 and not ex["inputs"][n_in:].any() and ex["inputs"][n_in - 1] == tok.eos_id
  assert n_tgt <= 14 and ex["targets"][n_tgt - 1] == tok.eos_id
  assert sc.reconstruct(ex["inputs"], ex["targets"], tok) == _doc(tok, 40).tolist()


@pytest.mark.parametrize("inputs_length", [2, 3, 5, 8, 17, 33, 64, 100, 128, 255])
def test_every_window_fits_its_lengths(tok, inputs_length):
  tokens_length, targets_length = sc.span_corruption_lengths(inputs_length)
  rng = np.random.default_rng(inputs_length)
  for n in range(0, tokens_length + 3):
    ex = sc.span_corrupt_example(_doc(tok, n), tok, rng, inputs_length=inputs_length)
    assert ex["inputs_mask"].sum() <= inputs_length and ex["targets_mask"].sum() <= targets_length


def test_deterministic_given_rng(tok):
  a = sc.span_corrupt_example(_doc(tok, 700), tok, np.random.default_rng(5))
  b = sc.span_corrupt_example(_doc(tok, 700), tok, np.random.default_rng(5))
  c = sc.span_corrupt_example(_doc(tok, 700), tok, np.random.default_rng(6))
  assert all((a[k] == b[k]).all() for k in a)
  assert not (a["inputs"] == c["inputs"]).all()


def test_too_many_spans_for_100_sentinels():
  tokens_length, _ = sc.span_corruption_lengths(4096)
  with pytest.raises(DataError, match="noise spans but the vocabulary has only 100 sentinels"):
    sc.check_span_config(tokens_length, 0.15, 3.0)
  sc.check_span_config(568, 0.15, 3.0)


def test_bad_config(tok):
  with pytest.raises(DataError, match="targets_length 50 is smaller than the 114"):
    sc.span_corrupt_example(_doc(tok, 600), tok, np.random.default_rng(0), targets_length=50)
  with pytest.raises(DataError, match="noise_density"):
    sc.check_span_config(100, 1.5, 3.0)
  with pytest.raises(DataError, match="mean_span_length"):
    sc.check_span_config(100, 0.15, 0.5)


def test_as_qa_example_shapes(tok):
  ex = sc.span_corrupt_example(_doc(tok, 100), tok, np.random.default_rng(0), inputs_length=64)
  qa = sc.as_qa_example(ex)
  assert qa["passage_ids"].shape == (1, 64) and qa["passage_mask"].shape == (1, 64)
  assert qa["target_ids"].shape == (14,)
  batch = {k: np.stack([v, v]) for k, v in ex.items()}
  assert sc.as_qa_example(batch)["passage_ids"].shape == (2, 1, 64)


def test_t5_sentinels_in_real_vocab():
  t5 = load_tokenizer(T5_SPIECE)
  tokens = np.asarray(t5.encode("The cute dog walks in the park. " * 30), np.int32)
  ex = sc.span_corrupt_example(tokens, t5, np.random.default_rng(0), inputs_length=64)
  sentinels = [int(t) for t in ex["inputs"] if t5.is_sentinel(t)]
  assert sentinels[:3] == [32099, 32098, 32097]
  assert "<extra_id_0>" in t5.decode(ex["inputs"])
