"""Local FiD files and text corpora -> TFDS array_record data sets, written and read without TF.

Each split is streamed into one array_record file of TFDS-serialized examples, with TFDS's
metadata beside it (`tfds.folder_dataset.write_metadata`); reading goes through
`tfds.builder_from_directory(...).as_data_source(split)`, a random-access source that grain
consumes directly. (TFDS's GeneratorBasedBuilder would write the same files, but it holds a split
in memory and spills one over 1 GB through TensorFlow.)

  prepare_fid_dataset(data_dir, "nq", {"train": "NQ/train.json", "dev": ..., "test": ...})
      -> {data_dir}/fid_qa/nq/1.0.0/   (features: question, answers, target,
                                         ctxs{title,text,score,id}, source, record_number;
                                         ctxs already sorted by score)
  prepare_text_corpus(data_dir, "wiki", {"train": ["a.txt", "b.jsonl.gz"]})
      -> {data_dir}/text_corpus/wiki/1.0.0/  (feature: text; one document per line of a .txt file or
                                               per JSONL record's `text_field`)
  load_fid_source(data_dir, "nq", "dev")[i]      -> normalized record (fido.data.fid_format)
  load_text_source(data_dir, "text_corpus/wiki") -> documents as str
  load_text_source(data_dir, "c4/en")            -> catalog C4, if prepared there as array_record
Records keep the input order: an example_index maps back to the file's records.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from array_record.python import array_record_module
from etils import epath

from fido.data import fid_format
from fido.data.errors import DataError

FID_BUILDER = "fid_qa"
TEXT_BUILDER = "text_corpus"
VERSION = "1.0.0"
_FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def _fid_features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "question": text(), "answers": tfds.features.Sequence(text()), "target": text(),
      "ctxs": tfds.features.Sequence(
          {"title": text(), "text": text(), "score": text(), "id": text()}),
      "source": text(), "record_number": np.int64,
  })


def record_to_example(record: Mapping) -> dict:
  """Normalized record -> TFDS example (None -> ''). Scores are stored as repr strings: TFDS keeps
  floats as float32 (tf.train.Example), and a string round-trips a float64 exactly."""
  return {
      "question": record["question"], "answers": list(record["answers"]),
      "target": record["target"] or "",
      "ctxs": [{"title": c["title"], "text": c["text"],
                "score": "" if c["score"] is None else repr(c["score"]), "id": c["id"] or ""}
               for c in record["ctxs"]],
      "source": record["source"], "record_number": record["record_number"],
  }


def _str(b) -> str:
  return b.decode("utf-8") if isinstance(b, bytes) else str(b)


def example_to_record(ex: Mapping) -> dict:
  """Decoded TFDS example -> normalized record (inverse of record_to_example)."""
  c = ex["ctxs"]
  ctxs = [{"title": _str(t), "text": _str(x), "score": float(_str(s)) if _str(s) else None,
           "id": _str(i) or None} for t, x, s, i in zip(c["title"], c["text"], c["score"], c["id"])]
  return {"question": _str(ex["question"]), "answers": [_str(a) for a in ex["answers"]],
          "target": _str(ex["target"]) or None, "ctxs": ctxs, "source": _str(ex["source"]),
          "record_number": int(ex["record_number"])}


class Prepared(NamedTuple):
  """A prepared data set: its directory, records per split, and (when this call wrote it) each FiD
  split's ReadReport (what was skipped or warned about)."""
  path: str
  records: dict[str, int]
  reports: dict[str, fid_format.ReadReport]


def _write_dataset(data_dir: str, builder: str, name: str, features: tfds.features.FeaturesDict,
                   splits: Mapping[str, Callable[[], Iterable[dict]]], description: str
                   ) -> tuple[str, dict[str, int], bool]:
  """Writes {data_dir}/{builder}/{name}/{VERSION}/: one array_record file per split of the
  serialized examples `splits[split]()` yields, in order, and TFDS's metadata
  (tfds.folder_dataset.write_metadata), so that builder_from_directory / as_data_source read it.
  A no-op when that directory exists; written into a temporary directory renamed when complete.
  Returns (path, records per split, whether it wrote).

  Memory stays flat whatever the size (one example at a time): TFDS's own builders buffer a split
  in memory and above 1 GB spill it through TensorFlow, which fido does not install.
  """
  root = os.path.join(os.path.expanduser(data_dir), builder, name)
  path = os.path.join(root, VERSION)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    info = tfds.builder_from_directory(path).info
    return path, {k: v.num_examples for k, v in info.splits.items()}, False
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=root, prefix=f".incomplete-{VERSION}-")
  try:
    split_infos, counts = [], {}
    for split, examples in splits.items():
      template = tfds.core.ShardedFileTemplate(
          data_dir=epath.Path(tmp), template=_FILE_TEMPLATE, dataset_name=builder, split=split,
          filetype_suffix="array_record")
      writer = array_record_module.ArrayRecordWriter(
          os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
      n = size = 0
      for example in tqdm.tqdm(examples(), desc=f"preparing {builder}/{name} {split}",
                               unit=" records", file=sys.stderr):
        data = features.serialize_example(example)
        writer.write(data)
        n, size = n + 1, size + len(data)
      writer.close()
      counts[split] = n
      split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=size,
                                             filename_template=template))
    tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=features, split_infos=split_infos, version=VERSION,
        filename_template=_FILE_TEMPLATE, check_data=False, description=description)
    os.rename(tmp, path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return path, counts, True


def _fid_examples(path: str, report: fid_format.ReadReport, read_options: Mapping):
  for record in fid_format.iter_fid_file(path, report, **read_options):
    yield record_to_example(record)
  if not report.kept:
    raise DataError(f"{report.summary()}: no usable records")
  if report.skipped or report.warnings:
    logging.warning("%s", report.summary())


def iter_text_documents(path: str, text_field: str = "text"):
  """Documents of a plain-text file (one per non-blank line) or JSONL file (`text_field` of each
  record); .gz allowed. Yields (line number, document)."""
  opener = gzip.open if path.endswith(".gz") else open
  jsonl = path.removesuffix(".gz").endswith((".jsonl", ".json"))
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        if not jsonl:
          yield n, line.rstrip("\r\n")
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}: line {n} column {e.colno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
          raise DataError(f"{path}: line {n}: field '{text_field}': missing or not a string")
        yield n, obj[text_field]
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not valid UTF-8 ({e})") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e})") from e


def _text_examples(paths: Sequence[str], text_field: str):
  n = 0
  for path in paths:
    for _, doc in iter_text_documents(os.fspath(path), text_field):
      n += 1
      yield {"text": doc}
  if not n:
    raise DataError(f"{', '.join(map(str, paths))}: no documents")


def _check_name(name: str) -> None:
  if not name or not name.replace("_", "").isalnum() or not name[0].isalpha():
    raise DataError(f"dataset name must be letters, digits, '_', starting with a letter: {name!r}")


def prepare_fid_dataset(data_dir: str | os.PathLike, name: str, files: Mapping[str, str],
                        **read_options) -> Prepared:
  """Converts FiD files {split: path} to {data_dir}/fid_qa/{name}/1.0.0; no-op if already prepared.

  read_options go to fid_format.iter_fid_file (require_passages, require_answers, on_error, ...).
  The result's `.reports` holds each split's ReadReport (empty if prepared before).
  """
  _check_name(name)
  reports = {split: fid_format.ReadReport(os.fspath(p)) for split, p in files.items()}
  splits = {split: functools.partial(_fid_examples, os.fspath(p), reports[split], read_options)
            for split, p in files.items()}
  path, counts, wrote = _write_dataset(os.fspath(data_dir), FID_BUILDER, name, _fid_features(),
                                       splits, f"FiD files: {dict(files)}")
  return Prepared(path, counts, reports if wrote else {})


def prepare_text_corpus(data_dir: str | os.PathLike, name: str,
                        files: Mapping[str, str | Sequence[str]],
                        text_field: str = "text") -> Prepared:
  """Converts text/JSONL files {split: path(s)} to {data_dir}/text_corpus/{name}/1.0.0.

  A no-op when already prepared.
  """
  _check_name(name)
  files = {k: [v] if isinstance(v, (str, os.PathLike)) else list(v) for k, v in files.items()}
  splits = {split: functools.partial(_text_examples, paths, text_field)
            for split, paths in files.items()}
  features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
  path, counts, wrote = _write_dataset(os.fspath(data_dir), TEXT_BUILDER, name, features, splits,
                                       f"text corpus: {files}")
  del wrote
  return Prepared(path, counts, {})


def _prepared_dir(data_dir: str, name: str) -> str:
  """{data_dir}/{builder}/{config}/{version} of 'builder/config[:version]' (default: latest)."""
  base, _, version = name.partition(":")
  root = os.path.join(data_dir, *base.split("/"))
  if not version:
    versions = sorted((v for v in (os.listdir(root) if os.path.isdir(root) else [])
                       if os.path.isfile(os.path.join(root, v, "dataset_info.json"))),
                      key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
    version = versions[-1] if versions else ""
  path = os.path.join(root, version)
  if not version or not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise DataError(f"{data_dir}: no prepared dataset '{name}' (expected {root}/<version>/"
                    "dataset_info.json); prepare it first with python run.py --mode=prepare, "
                    "see data/README.md")
  return path


def _data_source(data_dir: str | os.PathLike, name: str, split: str):
  path = _prepared_dir(os.path.expanduser(os.fspath(data_dir)), name)
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise DataError(f"{path}: no split '{split}' (has {sorted(builder.info.splits)})")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format is not None and file_format != "array_record":
    raise DataError(f"{path}: prepared as {file_format}; reading without TensorFlow needs "
                    "array_record (re-prepare with file_format='array_record', see data/README.md)")
  return builder.as_data_source(split)


class _Mapped:
  """Random-access view applying `fn` to each element of `source`; `name` is its stable repr."""

  def __init__(self, source, fn, name: str):
    self._source, self._fn, self._name = source, fn, name

  def __repr__(self) -> str:
    return f"{self._name}[{len(self)}]"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int):
    return self._fn(self._source[i])


class _Head(_Mapped):
  """The first `n` elements of a random-access source."""

  def __init__(self, source, n: int):
    super().__init__(source, lambda x: x, f"{source!r}[:{n}]")
    self._n = min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int):
    if not -self._n <= i < self._n:
      raise IndexError(i)
    return self._source[i % self._n]


def head(source, n: int) -> _Mapped:
  """A random-access view of the first `n` elements of `source` (e.g. load_fid_source's)."""
  return _Head(source, n)


def load_fid_source(data_dir: str | os.PathLike, name: str, split: str) -> _Mapped:
  """Random-access normalized records of a prepared FiD data set (name as given to prepare)."""
  return _Mapped(_data_source(data_dir, f"{FID_BUILDER}/{name}", split), example_to_record,
                 f"{FID_BUILDER}/{name}:{split}")


def load_text_source(data_dir: str | os.PathLike, name: str, split: str = "train",
                     text_field: str = "text") -> _Mapped:
  """Random-access documents (str) of a prepared corpus: 'text_corpus/<name>' or a catalog
  dataset such as 'c4/en' (or 'c4/en:3.1.0') prepared as array_record under data_dir."""
  return _Mapped(_data_source(data_dir, name, split), functools.partial(_text_of, field=text_field),
                 f"{name}:{split}")


def _text_of(ex: Mapping, field: str) -> str:
  return _str(ex[field])
