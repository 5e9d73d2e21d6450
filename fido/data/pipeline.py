"""grain pipelines producing fixed-shape numpy batches (grain 0.2 DataLoader API).

Shapes: B = batch_size (per process), P = n_passages, L = passage_len, T = target_len.
QA batch:
  passage_ids int32 [B, P, L] (0 pad), passage_mask bool [B, P, L] (absent passage: all False),
  target_ids int32 [B, T] (answer + EOS, 0 pad), target_mask bool [B, T] (answer tokens and EOS),
  example_index int32 [B] (position of the record in `records`; -1 for a padding example).
Span-corruption batch:
  inputs int32 [B, L_in], inputs_mask bool [B, L_in], targets int32 [B, L_tgt], targets_mask bool;
  with qa_shaped=True the QA keys instead, with P = 1: passage_ids [B, 1, L_in], ...,
  target_ids [B, L_tgt].

Determinism and resume: every loader is a function of (records, config, seed, shard); randomness
(shuffle order, answer choice, span noise) comes from grain's per-record rngs derived from `seed`.
`it = iter(loader)`; `state = it.get_state()` (bytes) can be stored (or saved with orbax through
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`); `it2 = iter(loader);
it2.set_state(state)` continues exactly where `it` stopped. `seek(it, n)` positions a fresh
training iterator after its first n batches from n alone: with worker_count=0, the n-th global batch
(process batches side by side) holds the same records whatever the number of processes, so a run
can resume on another process count.

Multi-host: records are sharded by process (shard_index/shard_count default to
jax.process_index() / jax.process_count()); `batch_size` is the per-process batch. Eval loaders
visit every record once and pad with masked examples so that every process yields the same number of
full batches. Batches depend on `worker_count` (grain interleaves workers): resume with the same
count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grain
import jax
import numpy as np

from fido.data import features, span_corruption
from fido.data.errors import DataError
from fido.data.tokenizer import Tokenizer


class _Indexed:
  """Random-access source yielding (index, record); index -1 / record None for a padding slot."""

  def __init__(self, source: Sequence, indices: Sequence[int] | None = None):
    self._source = source
    self._indices = None if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._source) if self._indices is None else len(self._indices)

  def __getitem__(self, i: int):
    i = int(i) if self._indices is None else int(self._indices[i])
    return (i, self._source[i]) if i >= 0 else (-1, None)

  def __repr__(self) -> str:
    # grain checks repr(data_source) when restoring iterator state: no memory addresses here.
    source = self._source
    if isinstance(source, (list, tuple)) or type(source).__repr__ is object.__repr__:
      source = f"{type(source).__name__}[{len(source)}]"
    return f"_Indexed({source}, indices={None if self._indices is None else len(self._indices)})"


class _EncodeQA(grain.transforms.RandomMap):
  """(index, record) -> one QA example (see fido.data.features)."""

  def __init__(self, tokenizer: Tokenizer, n_passages: int, passage_len: int, target_len: int,
               answer_choice: str, answer_first: bool = False):
    self.tokenizer, self.answer_choice, self.answer_first = tokenizer, answer_choice, answer_first
    self.lengths = dict(n_passages=n_passages, passage_len=passage_len, target_len=target_len)

  def random_map(self, element, rng: np.random.Generator) -> dict:
    index, record = element
    if record is None:
      return features.empty_qa_example(**self.lengths)
    if self.answer_first:
      record = features.answer_first(record)
    return features.encode_qa_example(self.tokenizer, record, answer_choice=self.answer_choice,
                                      rng=rng, example_index=index, **self.lengths)


class _SpanCorrupt(grain.transforms.RandomMap):
  """(index, text) -> one span-corruption example."""

  def __init__(self, tokenizer: Tokenizer, **kwargs):
    self.tokenizer, self.kwargs = tokenizer, kwargs

  def random_map(self, element, rng: np.random.Generator) -> dict:
    _, text = element
    return span_corruption.span_corrupt_example(self.tokenizer.encode(text), self.tokenizer, rng,
                                                **self.kwargs)


class _AsQA(grain.transforms.Map):
  def map(self, element: dict) -> dict:
    return span_corruption.as_qa_example(element)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None and shard_count is None:
    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None or not 0 <= shard_index < shard_count:
    raise DataError(f"bad shard: index {shard_index} of {shard_count}")
  return shard_index, shard_count


def _read_options(source: Sequence, read_options: grain.ReadOptions | None) -> grain.ReadOptions:
  """Given options, else none of grain's reader threads for in-memory data (grain's advice: they
  only contend for the GIL), else grain's defaults (16 threads) for file-backed sources."""
  if read_options is not None:
    return read_options
  if isinstance(source, (list, tuple)):
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions()


def _train_loader(source: Sequence, transform, *, batch_size: int, seed: int,
                  num_epochs: int | None, shard_index: int | None, shard_count: int | None,
                  worker_count: int, read_options: grain.ReadOptions | None,
                  extra_ops: Sequence = ()) -> grain.DataLoader:
  index, count = _shard(shard_index, shard_count)
  if len(source) < count * batch_size:
    raise DataError(f"{len(source)} records cannot fill one batch of {batch_size} on each of "
                    f"{count} processes")
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shuffle=True, num_epochs=num_epochs, seed=seed)
  return grain.DataLoader(
      data_source=_Indexed(source), sampler=sampler,
      operations=[transform, grain.transforms.Batch(batch_size, drop_remainder=True), *extra_ops],
      shard_options=grain.sharding.ShardOptions(index, count, drop_remainder=True),
      worker_count=worker_count, read_options=_read_options(source, read_options))


def seek(iterator, batches: int, *, batch_size: int, shard_index: int | None = None,
         shard_count: int | None = None) -> None:
  """Positions a fresh iterator of a training loader (`_train_loader`'s, same batch_size and
  shard) after its first `batches` batches, without reading them.

  grain's DataLoader state is in sampler positions: shard p of n (with w workers; 0 counts as
  one stream) reads positions p + j*n + m*w*n in worker j, which batches them b at a time, and
  the loader takes its batches from the workers in turn. After t batches worker j has made
  c_j = ceil((t - j) / w) of them, so its last position is p + j*n + (c_j*b - 1)*w*n.
  """
  index, count = _shard(shard_index, shard_count)
  state = json.loads(iterator.get_state())
  workers = state["worker_count"]
  streams = max(workers, 1)
  made = [max(0, -(-(batches - j) // streams)) for j in range(streams)]
  state["last_seen_indices"] = {
      str(j): index + j * count + (made[j] * batch_size - 1) * streams * count
      for j in range(streams)}
  state["last_worker_index"] = batches % workers - 1 if workers else -1
  iterator.set_state(json.dumps(state).encode())


def qa_train_loader(records: Sequence[dict], tokenizer: Tokenizer, *, batch_size: int,
                    n_passages: int, passage_len: int, target_len: int, seed: int,
                    answer_choice: str = "first", answer_first: bool = False,
                    num_epochs: int | None = None,
                    shard_index: int | None = None, shard_count: int | None = None,
                    worker_count: int = 0, read_options: grain.ReadOptions | None = None
                    ) -> grain.DataLoader:
  """Shuffled (per epoch, from `seed`), repeated (num_epochs=None: forever) full QA batches.

  records: normalized FiD records (fid_format.read_fid_file, or tfds_builders.load_fid_source).
  answer_first: take the P passages after moving answer-bearing ones to the front
  (features.answer_first), so every example holds its gold passage.
  """
  features.check_qa_lengths(tokenizer, n_passages, passage_len, target_len)
  transform = _EncodeQA(tokenizer, n_passages, passage_len, target_len, answer_choice, answer_first)
  return _train_loader(records, transform, batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                       shard_index=shard_index, shard_count=shard_count, worker_count=worker_count,
                       read_options=read_options)


def eval_indices(num_records: int, batch_size: int, shard_index: int,
                 shard_count: int) -> np.ndarray:
  """This shard's record indices (i % shard_count == shard_index), padded with -1 so that every
  shard has the same number of full batches. int64 [num_batches * batch_size]."""
  per_shard = -(-num_records // shard_count)
  padded = -(-per_shard // batch_size) * batch_size
  own = np.arange(shard_index, num_records, shard_count)
  return np.concatenate([own, -np.ones(padded - len(own), np.int64)])


def qa_eval_loader(records: Sequence[dict], tokenizer: Tokenizer, *, batch_size: int,
                   n_passages: int, passage_len: int, target_len: int,
                   shard_index: int | None = None, shard_count: int | None = None,
                   worker_count: int = 0, read_options: grain.ReadOptions | None = None
                   ) -> grain.DataLoader:
  """Every record once, in order, in full batches padded with masked examples (example_index -1)."""
  features.check_qa_lengths(tokenizer, n_passages, passage_len, target_len)
  if not len(records):
    raise DataError("no records to evaluate")
  index, count = _shard(shard_index, shard_count)
  source = _Indexed(records, eval_indices(len(records), batch_size, index, count))
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=False, num_epochs=1,
                                        seed=0)
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[_EncodeQA(tokenizer, n_passages, passage_len, target_len, "first"),
                  grain.transforms.Batch(batch_size, drop_remainder=True)],
      shard_options=grain.sharding.NoSharding(), worker_count=worker_count,
      read_options=_read_options(records, read_options))


def span_corruption_loader(documents: Sequence[str], tokenizer: Tokenizer, *, batch_size: int,
                           seed: int, inputs_length: int = 512, targets_length: int | None = None,
                           noise_density: float = 0.15, mean_span_length: float = 3.0,
                           qa_shaped: bool = False, num_epochs: int | None = None,
                           shard_index: int | None = None, shard_count: int | None = None,
                           worker_count: int = 0, read_options: grain.ReadOptions | None = None
                           ) -> grain.DataLoader:
  """T5 span-corruption batches, one example per document per epoch (a random window of a long one).

  documents: random-access strings (a list, or tfds_builders.load_text_source). targets_length
  defaults to what inputs_length needs (114 for 512). qa_shaped=True emits the QA keys with P = 1.
  """
  tokens_length, needed = span_corruption.span_corruption_lengths(
      inputs_length, noise_density, mean_span_length)
  span_corruption.check_span_config(tokens_length, noise_density, mean_span_length)
  if targets_length is not None and targets_length < needed:
    raise DataError(f"targets_length {targets_length} < {needed} needed for inputs_length "
                    f"{inputs_length}")
  transform = _SpanCorrupt(tokenizer, inputs_length=inputs_length, targets_length=targets_length,
                           noise_density=noise_density, mean_span_length=mean_span_length)
  return _train_loader(documents, transform, batch_size=batch_size, seed=seed,
                       num_epochs=num_epochs,
                       shard_index=shard_index, shard_count=shard_count, worker_count=worker_count,
                       read_options=read_options, extra_ops=[_AsQA()] if qa_shaped else [])
