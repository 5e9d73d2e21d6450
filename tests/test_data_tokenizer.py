"""Tests for fido.data.tokenizer: T5 conventions with the real vocabulary, training, bad files."""

import pathlib

import pytest
import sentencepiece as spm

from fido.data import synthetic
from fido.data import tokenizer as tokenizer_lib
from fido.data.errors import DataError
from fido.data.tokenizer import Tokenizer, load_tokenizer, round_up, train_tokenizer

T5_SPIECE = pathlib.Path(__file__).resolve().parent / "fixtures" / "t5_spiece.model"  # T5's own, Apache-2.0
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def t5():
  return load_tokenizer(T5_SPIECE)


def _corpus():
  lines = synthetic.generate(seed=0, n_train=80, n_dev=20, n_test=20)["corpus"]
  return lines + (FIXTURES / "corpus.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  path = train_tokenizer(_corpus(), tmp_path_factory.mktemp("tok") / "sp", 250, model_type="bpe")
  return load_tokenizer(path)


def test_t5_special_ids_and_sizes(t5):
  assert (t5.pad_id, t5.eos_id, t5.unk_id) == (0, 1, 2)
  assert t5.num_pieces == 32000
  assert t5.vocab_size == 32128
  assert t5.num_sentinels == 100


def test_t5_sentinels_count_down_from_top(t5):
  assert t5.sentinel_id(0) == 32099
  assert t5.sentinel_id(1) == 32098
  assert t5.sentinel_id(99) == 32000
  assert t5.is_sentinel(32000) and t5.is_sentinel(32099)
  assert not t5.is_sentinel(31999) and not t5.is_sentinel(32100)
  assert t5.piece(32099) == "<extra_id_0>"
  with pytest.raises(DataError, match="sentinel index 100"):
    t5.sentinel_id(100)


def test_t5_encode_matches_known_ids(t5):
  # Ids of T5's spiece.model (as the HF T5 tokenizer produces them, without the EOS it appends).
  assert t5.encode("question: who won? title: Foo context: bar") == [
      822, 10, 113, 751, 58, 2233, 10, 4452, 32, 2625, 10, 1207]
  assert 1 not in t5.encode("no eos is added")


def test_t5_decode_stops_at_eos_drops_pad_shows_sentinels(t5):
  ids = t5.encode("Hello world")
  assert t5.decode(ids) == "Hello world"
  assert t5.decode(ids + [1] + t5.encode("ignored")) == "Hello world"
  assert t5.decode([0] + ids + [0, 0]) == "Hello world"
  assert t5.decode(ids[:1] + [32099] + ids[1:]) == "Hello<extra_id_0> world"
  assert "⁇" in t5.decode([32120])  # in the padded rows beyond the sentinels: shown as unknown


def test_t5_model_vocab_check(t5):
  t5.check_model_vocab(32128)
  t5.check_model_vocab(32100)
  message = "smaller than the 32000 SentencePiece pieces \\+ 100 sentinels"
  with pytest.raises(DataError, match=message):
    t5.check_model_vocab(32000)
  with pytest.raises(DataError, match="32099"):
    load_tokenizer(T5_SPIECE, model_vocab_size=32099)


def test_trained_tokenizer_has_t5_conventions(small):
  assert (small.pad_id, small.eos_id, small.unk_id) == (0, 1, 2)
  assert small.num_pieces == 250
  assert small.vocab_size == round_up(350) == 384
  assert small.sentinel_id(0) == 250 + 100 - 1
  assert small.sentinel_id(99) == 250
  text = "question: What is the capital of Paris? title: Foo context: The quick brown fox."
  assert small.decode(small.encode(text)) == text


def test_train_from_file_is_deterministic(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(_corpus()) + "\n")
  a = train_tokenizer(corpus, tmp_path / "a", 200)
  b = train_tokenizer(str(corpus), tmp_path / "b" / "sp", 200)
  assert a == str(tmp_path / "a.model")
  ta, tb = load_tokenizer(a), load_tokenizer(b)
  assert ta.num_pieces == tb.num_pieces == 200
  assert [ta.piece(i) for i in range(200)] == [tb.piece(i) for i in range(200)]


def test_tokenizer_pickles(small):
  import pickle
  copy = pickle.loads(pickle.dumps(small))
  assert copy.encode("the capital") == small.encode("the capital")
  assert copy.vocab_size == small.vocab_size


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(DataError, match=f"{tmp_path}/nope.model: tokenizer file not found"):
    load_tokenizer(tmp_path / "nope.model")


def test_non_sentencepiece_file(tmp_path):
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"this is not a sentencepiece model\x00\xff")
  with pytest.raises(DataError, match="bad.model: not a SentencePiece model"):
    load_tokenizer(bad)


def test_unreadable_tokenizer_file(tmp_path, monkeypatch):
  locked = tmp_path / "locked.model"
  locked.write_bytes(b"x")

  def deny(path, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(path))

  # Root ignores file permissions, so simulate the unreadable file at the module's `open`.
  monkeypatch.setattr(tokenizer_lib, "open", deny, raising=False)
  with pytest.raises(DataError, match="locked.model: cannot read tokenizer file .*Permission"):
    load_tokenizer(locked)


def test_directory_is_not_a_tokenizer(tmp_path):
  with pytest.raises(DataError, match="tokenizer file not found"):
    load_tokenizer(tmp_path)


def test_wrong_special_ids_are_rejected(tmp_path):
  # sentencepiece's defaults: unk 0, bos 1, eos 2, no pad.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()),
                                 model_prefix=str(tmp_path / "d"), vocab_size=200, minloglevel=2)
  with pytest.raises(DataError, match="d.model: special ids .* differ from T5's"):
    load_tokenizer(tmp_path / "d.model")


def test_vocab_too_large_for_corpus(tmp_path):
  with pytest.raises(DataError, match="sentencepiece training failed .*Vocabulary size too high"):
    train_tokenizer(["tiny corpus", "two lines"], tmp_path / "t", 5000)


def test_missing_corpus(tmp_path):
  with pytest.raises(DataError, match="tokenizer corpus not found"):
    train_tokenizer(tmp_path / "nope.txt", tmp_path / "t", 100)


def test_tokenizer_is_a_class_with_repr(small):
  assert isinstance(small, Tokenizer)
  assert "pieces=250" in repr(small)
