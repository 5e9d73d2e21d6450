"""Tests for fido.data.pipeline: shapes/masks, determinism, exact resume, sharding, eval padding."""

import grain
import numpy as np
import pytest

from fido.data import pipeline, synthetic
from fido.data.errors import DataError
from fido.data.tokenizer import load_tokenizer, train_tokenizer

B, P, L, T = 4, 10, 48, 12
QA = dict(batch_size=B, n_passages=P, passage_len=L, target_len=T)


@pytest.fixture(scope="module")
def data():
  return synthetic.generate(seed=0, n_train=64, n_dev=10, n_test=10)


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory):
  return load_tokenizer(train_tokenizer(data["corpus"], tmp_path_factory.mktemp("tok") / "sp", 250,
                                        model_type="bpe"))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
                                  for x, y in zip(a, b))


def test_qa_batch_shapes_dtypes_masks(data, tok):
  batch = next(iter(pipeline.qa_train_loader(data["train"], tok, seed=0, shard_index=0,
                                             shard_count=1, **QA)))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "passage_ids": ((B, P, L), np.int32), "passage_mask": ((B, P, L), bool),
      "target_ids": ((B, T), np.int32), "target_mask": ((B, T), bool),
      "example_index": ((B,), np.int32)}
  np.testing.assert_array_equal(batch["passage_mask"], batch["passage_ids"] != 0)
  np.testing.assert_array_equal(batch["target_mask"], batch["target_ids"] != 0)
  lengths = batch["target_mask"].sum(1)
  assert (batch["target_ids"][np.arange(B), lengths - 1] == tok.eos_id).all()
  for b, i in enumerate(batch["example_index"]):  # targets are the records' answers
    assert tok.decode(batch["target_ids"][b]) == data["train"][i]["answers"][0]


def test_deterministic_given_seed(data, tok):
  make = lambda seed: pipeline.qa_train_loader(data["train"], tok, seed=seed, shard_index=0,
                                               shard_count=1, **QA)
  assert _same(_take(iter(make(1)), 3), _take(iter(make(1)), 3))
  assert not _same(_take(iter(make(1)), 3), _take(iter(make(2)), 3))


def test_exact_resume_from_state_across_epochs(data, tok):
  make = lambda: pipeline.qa_train_loader(data["train"], tok, seed=5, answer_choice="random",
                                          shard_index=0, shard_count=1, **QA)
  it = iter(make())
  _take(it, 14)  # 64 records / 4 = 16 batches per epoch: resume crosses the epoch boundary
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = _take(it, 5)
  restored = iter(make())  # a fresh loader, as after a restart
  restored.set_state(state)
  assert _same(_take(restored, 5), expected)


def test_resume_with_orbax_checkpoint_manager(data, tok, tmp_path):
  import orbax.checkpoint as ocp
  make = lambda: pipeline.qa_train_loader(data["train"], tok, seed=5, shard_index=0,
                                          shard_count=1, **QA)
  it = iter(make())
  _take(it, 3)
  mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  expected = _take(it, 2)
  restored = iter(make())
  mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert _same(_take(restored, 2), expected)


def test_epoch_visits_every_record_once_sharded(data, tok):
  seen = []
  for shard in range(2):
    loader = pipeline.qa_train_loader(data["train"], tok, seed=0, num_epochs=1, shard_index=shard,
                                      shard_count=2, **QA)
    seen.append(np.concatenate([b["example_index"] for b in loader]))
  assert len(seen[0]) == len(seen[1]) == 32
  assert sorted(np.concatenate(seen).tolist()) == list(range(64))


def test_seek_positions_a_fresh_loader_on_any_shard_count(data, tok):
  """seek(it, n) continues where n batches left off; the n-th global batch (the shards' batches
  side by side) holds the same records for 1, 2 or 4 shards: a run resumes on another count."""
  def loader(shard, count, batch=8):
    return pipeline.qa_train_loader(data["train"], tok, seed=3, shard_index=shard,
                                    shard_count=count, **{**QA, "batch_size": batch // count})
  reference = _take(iter(loader(0, 1)), 12)  # crosses the 64-record epoch (8 batches)
  for count in (1, 2, 4):
    for n in (0, 1, 9):
      shards = []
      for shard in range(count):
        it = iter(loader(shard, count))
        pipeline.seek(it, n, batch_size=8 // count, shard_index=shard, shard_count=count)
        shards.append(_take(it, 3))
        if count == 1:
          assert _same(shards[0], reference[n:n + 3])
      for k in range(3):
        rows = np.concatenate([s[k]["example_index"] for s in shards])
        assert sorted(rows) == sorted(reference[n + k]["example_index"]), (count, n, k)


def test_default_shard_is_jax_process(data, tok):
  loader = pipeline.qa_train_loader(data["train"], tok, seed=0, **QA)
  assert next(iter(loader))["passage_ids"].shape == (B, P, L)
  with pytest.raises(DataError, match="bad shard"):
    pipeline.qa_train_loader(data["train"], tok, seed=0, shard_index=2, shard_count=2, **QA)


def test_eval_pads_to_full_batches_on_every_shard(data, tok):
  per_shard = []
  for shard in range(3):
    batches = list(pipeline.qa_eval_loader(data["dev"], tok, shard_index=shard, shard_count=3,
                                           **QA))
    assert len(batches) == 1  # ceil(ceil(10 / 3) / 4): the same on every shard
    per_shard.append(np.concatenate([b["example_index"] for b in batches]))
    batch = batches[0]
    pad = batch["example_index"] < 0
    assert not batch["passage_mask"][pad].any() and not batch["target_mask"][pad].any()
    assert batch["passage_mask"][~pad].any(axis=(1, 2)).all()
  indices = np.concatenate(per_shard)
  assert sorted(indices[indices >= 0].tolist()) == list(range(10))
  assert pipeline.eval_indices(10, 4, 0, 1).tolist() == list(range(10)) + [-1, -1]


def test_eval_in_order_single_shard(data, tok):
  batches = list(pipeline.qa_eval_loader(data["dev"], tok, shard_index=0, shard_count=1, **QA))
  assert [b["example_index"].tolist() for b in batches] == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]


def test_config_errors(data, tok):
  with pytest.raises(DataError, match="n_passages must be >= 1"):
    pipeline.qa_train_loader(data["train"], tok, seed=0, shard_index=0, shard_count=1,
                             **{**QA, "n_passages": 0})
  with pytest.raises(DataError, match="cannot fill one batch"):
    pipeline.qa_train_loader(data["train"][:3], tok, seed=0, shard_index=0, shard_count=1, **QA)
  with pytest.raises(DataError, match="no records to evaluate"):
    pipeline.qa_eval_loader([], tok, shard_index=0, shard_count=1, **QA)


def test_span_corruption_batches_and_resume(data, tok):
  make = lambda **kw: pipeline.span_corruption_loader(
      data["corpus"], tok, batch_size=B, seed=0, inputs_length=64, shard_index=0, shard_count=1,
      **kw)
  it = iter(make())
  batch = next(it)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((B, 64), np.int32), "inputs_mask": ((B, 64), bool),
      "targets": ((B, 14), np.int32), "targets_mask": ((B, 14), bool)}
  np.testing.assert_array_equal(batch["inputs_mask"], batch["inputs"] != 0)
  assert batch["inputs_mask"].all()  # corpus documents are longer than the 70-token window
  state = it.get_state()
  expected = _take(it, 2)
  again = iter(make())
  again.set_state(state)
  assert _same(_take(again, 2), expected)
  qa = next(iter(make(qa_shaped=True)))
  assert {k: v.shape for k, v in qa.items()} == {
      "passage_ids": (B, 1, 64), "passage_mask": (B, 1, 64), "target_ids": (B, 14),
      "target_mask": (B, 14)}
  np.testing.assert_array_equal(qa["passage_ids"][:, 0], batch["inputs"])


def test_span_corruption_config_errors(data, tok):
  with pytest.raises(DataError, match="100 sentinels"):
    pipeline.span_corruption_loader(data["corpus"], tok, batch_size=B, seed=0, inputs_length=4096,
                                    shard_index=0, shard_count=1)
  with pytest.raises(DataError, match="targets_length 10 < 14"):
    pipeline.span_corruption_loader(data["corpus"], tok, batch_size=B, seed=0, inputs_length=64,
                                    targets_length=10, shard_index=0, shard_count=1)
