"""Tests for fido.data.fid_format: round-trips on fixtures and every kind of bad input."""

import gzip
import json
import pathlib

import pytest

from fido.data.errors import DataError
from fido.data.fid_format import iter_fid_file, normalize_record, read_fid_file, ReadReport

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
GOOD = {"question": "q?", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}


def _write(tmp_path, lines, name="f.jsonl"):
  path = tmp_path / name
  path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
  return path


def _jsonl(tmp_path, *records):
  return _write(tmp_path, [json.dumps(r) for r in records])


def test_reads_nq_json_array_with_dpr_string_scores():
  records, report = read_fid_file(FIXTURES / "nq_dpr.json")
  assert (report.read, report.kept, sum(report.skipped.values())) == (3, 3, 0)
  first = records[0]
  assert first["question"] == "who wrote the opera carmen"
  assert first["answers"] == ["Georges Bizet", "Bizet"]
  assert first["target"] is None
  # sorted by descending score; string scores parsed; ids kept as strings
  assert [c["id"] for c in first["ctxs"]] == ["102", "101", "103"]
  assert [c["score"] for c in first["ctxs"]] == [83.2, 81.5, 79.0]
  assert first["ctxs"][0] == {
      "title": "Opera", "score": 83.2, "id": "102",
      "text": "Opera is a form of theatre in which music is a fundamental component."}
  assert first["source"] == str(FIXTURES / "nq_dpr.json")
  assert [r["record_number"] for r in records] == [1, 2, 3]


def test_reads_jsonl_with_target_and_gzip_gives_same_records(tmp_path):
  plain, _ = read_fid_file(FIXTURES / "tqa_dpr.jsonl")
  assert plain[0]["target"] == "Mars"
  assert plain[1]["target"] is None
  gz = tmp_path / "tqa.jsonl.gz"
  gz.write_bytes(gzip.compress((FIXTURES / "tqa_dpr.jsonl").read_bytes()))
  zipped, report = read_fid_file(gz)
  assert report.kept == 2
  assert [{**r, "source": None} for r in zipped] == [{**r, "source": None} for r in plain]


def test_gzip_detected_by_content_not_name(tmp_path):
  path = tmp_path / "data.json"
  path.write_bytes(gzip.compress((FIXTURES / "nq_dpr.json").read_bytes()))
  records, _ = read_fid_file(path)
  assert len(records) == 3


@pytest.mark.parametrize("name", ["nq_open.jsonl", "webq.jsonl"])
def test_closed_book_files_rejected_when_passages_required(name):
  message = f"{name}: line 1: field 'ctxs': missing: passages are required"
  with pytest.raises(DataError, match=message):
    read_fid_file(FIXTURES / name)


def test_closed_book_files_accepted_without_passages():
  nq_open, _ = read_fid_file(FIXTURES / "nq_open.jsonl", require_passages=False)
  assert nq_open[0]["answers"] == ["Coral Sea", "Queensland, Australia"]
  assert nq_open[0]["ctxs"] == []
  webq, _ = read_fid_file(FIXTURES / "webq.jsonl", require_passages=False)
  assert webq[0]["answers"] == ["Portuguese"]  # a single-string `answer` becomes a list


def test_fewer_passages_than_n_passages_is_a_counted_warning():
  records, report = read_fid_file(FIXTURES / "nq_dpr.json", n_passages=3)
  assert len(records) == 3
  assert report.warnings == {"fewer than 3 passages (padded and masked)": 1}
  assert "fewer than 3 passages (padded and masked): 1" in report.summary()


def test_mixed_scores_keep_file_order_with_warning(tmp_path):
  rec = {**GOOD, "ctxs": [{"title": "a", "text": "x", "score": 1}, {"title": "b", "text": "y"}]}
  records, report = read_fid_file(_jsonl(tmp_path, rec))
  assert [c["title"] for c in records[0]["ctxs"]] == ["a", "b"]
  assert report.warnings["some passages lack 'score' (kept file order)"] == 1


def test_skip_mode_counts_every_skipped_record(tmp_path):
  no_title = {**GOOD, "ctxs": [{"title": "t", "text": "x"}, {"text": "y"}]}
  path = _write(tmp_path, [json.dumps(GOOD), "{not json", "", json.dumps({"answers": ["a"]}),
                           json.dumps({**GOOD, "answers": "a"}), json.dumps(no_title),
                           json.dumps(GOOD)])
  records, report = read_fid_file(path, on_error="skip")
  assert len(records) == 2
  assert [r["record_number"] for r in records] == [1, 7]
  assert report.read == 6 and report.kept == 2
  assert report.skipped == {"malformed JSON": 1, "question: missing": 1,
                            "answers: expected a list of strings": 1, "ctxs[].title: missing": 1}
  assert report.warnings == {"blank lines": 1}
  assert "read 6 records, kept 2, skipped 4" in report.summary()


def test_iter_updates_a_given_report():
  report = ReadReport("x")
  assert len(list(iter_fid_file(FIXTURES / "tqa_dpr.jsonl", report))) == 2
  assert report.kept == 2


# Each bad input -> DataError whose message names the file, the record and the field.
BAD_RECORDS = [
    ({"answers": ["a"], "ctxs": []}, "field 'question': missing"),
    ({**GOOD, "question": "  "}, "field 'question': empty"),
    ({**GOOD, "question": 7}, "field 'question': expected a string: got int"),
    ({**GOOD, "answers": "a"}, "field 'answers': expected a list of strings: got str"),
    ({**GOOD, "answers": ["a", 3]}, r"field 'answers\[1\]': expected a string: got int"),
    ({**GOOD, "answers": ["a", ""]}, r"field 'answers\[1\]': empty"),
    ({**GOOD, "answers": []}, "field 'answers': empty: no answers and no 'target'"),
    ({"question": "q", "ctxs": GOOD["ctxs"]}, "field 'answers': missing"),
    ({**GOOD, "target": ["a"]}, "field 'target': expected a string: got list"),
    ({"question": "q", "answers": ["a"]}, "field 'ctxs': missing"),
    ({**GOOD, "ctxs": {"title": "t"}}, "field 'ctxs': expected a list: got dict"),
    ({**GOOD, "ctxs": []}, "field 'ctxs': zero passages"),
    ({**GOOD, "ctxs": ["passage"]}, r"field 'ctxs\[0\]': expected an object: got str"),
    ({**GOOD, "ctxs": [{"text": "x"}]}, r"field 'ctxs\[0\].title': missing"),
    ({**GOOD, "ctxs": [{"title": 1, "text": "x"}]}, r"field 'ctxs\[0\].title': expected a string"),
    ({**GOOD, "ctxs": [{"title": "t", "text": None}]}, r"field 'ctxs\[0\].text': missing"),
    ({**GOOD, "ctxs": [{"title": "t", "text": "x", "score": "high"}]},
     r"field 'ctxs\[0\].score': expected a number: got 'high'"),
    ({**GOOD, "ctxs": [{"title": "t", "text": "x", "score": [1]}]},
     r"field 'ctxs\[0\].score': expected a number: got list"),
    ({**GOOD, "ctxs": [{"title": "t", "text": "x", "id": 1.5}]}, r"field 'ctxs\[0\].id'"),
    (["not", "an", "object"], "field '<record>': expected a JSON object: got list"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_record_in_jsonl_names_file_line_field(tmp_path, record, message):
  path = _write(tmp_path, [json.dumps(GOOD), json.dumps(record)])
  with pytest.raises(DataError, match=f"^{path}: line 2: {message}"):
    read_fid_file(path)


@pytest.mark.parametrize("record,message", BAD_RECORDS[:4])
def test_bad_record_in_json_array_names_record_number(tmp_path, record, message):
  path = tmp_path / "f.json"
  path.write_text(json.dumps([GOOD, GOOD, record], indent=1))
  with pytest.raises(DataError, match=f"^{path}: record 3: {message}"):
    read_fid_file(path)


def test_malformed_jsonl_reports_line(tmp_path):
  path = _write(tmp_path, [json.dumps(GOOD), "", '{"question": "q", "answers": [}'])
  with pytest.raises(DataError, match=f"^{path}: line 3 column 31: malformed JSON"):
    read_fid_file(path)


def test_malformed_json_array_reports_line(tmp_path):
  path = tmp_path / "f.json"
  path.write_text('[\n{"question": "q",\n "answers": ["a"]\n "ctxs": []}\n]')
  with pytest.raises(DataError, match=f"^{path}: line 4 column 2: malformed JSON"):
    read_fid_file(path)


def test_json_value_that_is_not_an_array(tmp_path):
  path = tmp_path / "f.json"
  path.write_text('[1, 2]\n')
  with pytest.raises(DataError, match="record 1: field '<record>'"):
    read_fid_file(path)


def test_non_utf8_jsonl(tmp_path):
  path = _write(tmp_path, [json.dumps(GOOD), b'{"question": "caf\xe9", "answers": ["a"]}'])
  with pytest.raises(DataError, match=f"^{path}: line 2: not valid UTF-8"):
    read_fid_file(path)


def test_non_utf8_json_array(tmp_path):
  path = tmp_path / "f.json"
  path.write_bytes(b'[\n{"question": "ok"},\n{"question": "caf\xe9"}\n]')
  with pytest.raises(DataError, match=f"^{path}: line 3: not valid UTF-8"):
    read_fid_file(path)


@pytest.mark.parametrize("content", [b"", b"\n  \n", gzip.compress(b"", mtime=0)],
                         ids=["zero-bytes", "blank-lines", "empty-gzip"])
def test_empty_file(tmp_path, content):
  path = tmp_path / "empty.jsonl"
  path.write_bytes(content)
  with pytest.raises(DataError, match=f"^{path}: file is empty"):
    read_fid_file(path)


def test_empty_json_array(tmp_path):
  path = tmp_path / "empty.json"
  path.write_text("[]")
  with pytest.raises(DataError, match="the JSON array holds no records"):
    read_fid_file(path)


def test_all_records_skipped_is_an_error(tmp_path):
  path = _jsonl(tmp_path, {"question": ""})
  with pytest.raises(DataError, match="read 1 records, kept 0, skipped 1 .*no usable records"):
    read_fid_file(path, on_error="skip")


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="nope.json: file not found"):
    read_fid_file(tmp_path / "nope.json")


def test_corrupt_gzip(tmp_path):
  path = tmp_path / "bad.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"question": "q"}\n' * 50)[:-20])
  with pytest.raises(DataError, match="bad.jsonl.gz: cannot read"):
    read_fid_file(path)


def test_bad_on_error_value():
  with pytest.raises(ValueError, match="on_error"):
    read_fid_file(FIXTURES / "nq_dpr.json", on_error="ignore")


def test_normalize_record_is_pure():
  rec, warnings = normalize_record(GOOD)
  assert rec == {"question": "q?", "answers": ["a"], "target": None,
                 "ctxs": [{"title": "t", "text": "x", "score": None, "id": None}]}
  assert warnings == []
