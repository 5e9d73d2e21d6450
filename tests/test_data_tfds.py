"""Tests for fido.data.tfds_builders: array_record round-trips with no TensorFlow."""

import gzip
import json
import pathlib
import shutil
import sys

import pytest

from fido.data import pipeline, synthetic, tfds_builders
from fido.data.errors import DataError
from fido.data.fid_format import read_fid_file
from fido.data.tokenizer import load_tokenizer, train_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = tfds_builders.prepare_fid_dataset(
      data_dir, "toy",
      {"train": str(FIXTURES / "nq_dpr.json"), "dev": str(FIXTURES / "tqa_dpr.jsonl")})
  return data_dir, builder


def test_no_tensorflow_import(prepared):
  assert "tensorflow" not in sys.modules


def test_fid_round_trip_keeps_order_and_fields(prepared):
  data_dir, builder = prepared
  assert (data_dir / "fid_qa" / "toy" / "1.0.0" / "dataset_info.json").is_file()
  assert builder.reports["train"].kept == 3 and builder.reports["dev"].kept == 2
  for split, name in (("train", "nq_dpr.json"), ("dev", "tqa_dpr.jsonl")):
    source = tfds_builders.load_fid_source(data_dir, "toy", split)
    expected, _ = read_fid_file(FIXTURES / name)
    assert len(source) == len(expected)
    assert [source[i] for i in range(len(source))] == expected
  assert "fid_qa/toy:dev[2]" == repr(tfds_builders.load_fid_source(data_dir, "toy", "dev"))


def test_prepare_is_idempotent(prepared):
  data_dir, _ = prepared
  again = tfds_builders.prepare_fid_dataset(data_dir, "toy", {"train": "/nonexistent.json"})
  assert again.reports == {}  # already prepared: nothing read
  assert len(tfds_builders.load_fid_source(data_dir, "toy", "train")) == 3


def test_closed_book_round_trip(tmp_path):
  tfds_builders.prepare_fid_dataset(tmp_path, "webq", {"test": str(FIXTURES / "webq.jsonl")},
                                    require_passages=False)
  record = tfds_builders.load_fid_source(tmp_path, "webq", "test")[1]
  assert record["answers"] == ["Caribbean"] and record["ctxs"] == [] and record["target"] is None


def test_bad_fid_file_fails_preparation_with_data_error(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q", "answers": "a", "ctxs": []}) + "\n")
  with pytest.raises(DataError, match="bad.jsonl: line 1: field 'answers'"):
    tfds_builders.prepare_fid_dataset(tmp_path / "dd", "bad", {"train": str(bad)})
  with pytest.raises(DataError, match="no usable records"):
    tfds_builders.prepare_fid_dataset(tmp_path / "dd2", "bad", {"train": str(bad)}, on_error="skip")


def test_missing_dataset_and_split(prepared, tmp_path):
  data_dir, _ = prepared
  with pytest.raises(DataError, match="no prepared dataset 'fid_qa/nope'.*data/README.md"):
    tfds_builders.load_fid_source(data_dir, "nope", "train")
  with pytest.raises(DataError, match="no split 'test'"):
    tfds_builders.load_fid_source(data_dir, "toy", "test")
  with pytest.raises(DataError, match="no prepared dataset 'c4/en'"):
    tfds_builders.load_text_source(tmp_path, "c4/en")
  with pytest.raises(DataError, match="dataset name"):
    tfds_builders.prepare_fid_dataset(tmp_path, "bad/name", {})


def test_text_corpus_from_txt_jsonl_and_gz(tmp_path):
  gz = tmp_path / "more.jsonl.gz"
  gz.write_bytes(gzip.compress((FIXTURES / "corpus.jsonl").read_bytes()))
  tfds_builders.prepare_text_corpus(
      tmp_path, "mix", {"train": [str(FIXTURES / "corpus.txt"), str(FIXTURES / "corpus.jsonl")],
                        "validation": str(gz)})
  docs = tfds_builders.load_text_source(tmp_path, "text_corpus/mix", "train")
  assert len(docs) == 6  # 3 non-blank lines + 3 JSONL records
  assert docs[0] == "The quick brown fox jumps over the lazy dog."
  assert docs[2] == "Rivers flow to the sea and the sea returns to the clouds."
  assert docs[3] == "C4-like document one. It has two sentences."
  val = tfds_builders.load_text_source(tmp_path, "text_corpus/mix:1.0.0", "validation")
  assert [val[i] for i in range(3)] == [json.loads(l)["text"] for l in
                                        (FIXTURES / "corpus.jsonl").read_text().splitlines()]


def test_bad_text_corpus(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(DataError, match="bad.jsonl: line 2: field 'text'"):
    tfds_builders.prepare_text_corpus(tmp_path, "bad", {"train": str(bad)})
  latin1 = tmp_path / "latin1.txt"
  latin1.write_bytes(b"caf\xe9\n")
  with pytest.raises(DataError, match="latin1.txt: not valid UTF-8"):
    tfds_builders.prepare_text_corpus(tmp_path, "latin", {"train": str(latin1)})


def test_catalog_style_name_is_read_from_data_dir(tmp_path):
  """A C4 prepared as array_record under data_dir is found by its catalog name 'c4/en'."""
  tfds_builders.prepare_text_corpus(tmp_path / "build", "en",
                                    {"train": str(FIXTURES / "corpus.jsonl")})
  shutil.copytree(tmp_path / "build" / "text_corpus" / "en" / "1.0.0",
                  tmp_path / "c4" / "en" / "3.1.0")
  docs = tfds_builders.load_text_source(tmp_path, "c4/en", "train")
  assert len(docs) == 3 and docs[1] == "C4-like document two."


def test_grain_pipelines_read_tfds_sources(tmp_path):
  data = synthetic.generate(seed=0, n_train=40, n_dev=8, n_test=8)
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in data["train"]))
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(data["corpus"]) + "\n")
  tok = load_tokenizer(train_tokenizer(corpus, tmp_path / "sp", 250, model_type="bpe"))
  tfds_builders.prepare_fid_dataset(tmp_path, "syn", {"train": str(train)})
  tfds_builders.prepare_text_corpus(tmp_path, "syn", {"train": str(corpus)})
  records = tfds_builders.load_fid_source(tmp_path, "syn", "train")
  loader = pipeline.qa_train_loader(records, tok, batch_size=4, n_passages=10, passage_len=48,
                                    target_len=8, seed=0, shard_index=0, shard_count=1)
  it = iter(loader)
  next(it)
  state = it.get_state()
  expected = next(it)
  fresh = tfds_builders.load_fid_source(tmp_path, "syn", "train")
  again = iter(pipeline.qa_train_loader(fresh, tok, batch_size=4, n_passages=10, passage_len=48,
                                        target_len=8, seed=0, shard_index=0, shard_count=1))
  again.set_state(state)
  assert all((expected[k] == v).all() for k, v in next(again).items())
  docs = tfds_builders.load_text_source(tmp_path, "text_corpus/syn")
  loader = pipeline.span_corruption_loader(docs, tok, batch_size=4, seed=0, inputs_length=32,
                                           shard_index=0, shard_count=1)
  batch = next(iter(loader))
  assert batch["inputs"].shape == (4, 32)
