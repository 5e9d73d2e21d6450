"""Inference benchmark: encoder and decoder milliseconds per sample, compile time excluded.

The encoder time covers embedding and encoding all passages; the decoder time covers projecting the
cross-attention keys/values once plus the whole greedy loop of `target_len` steps (EOS ignored so
that random weights decode the full length). Each is the median over `repeats` timed runs after
`warmup` untimed ones, with `block_until_ready`, divided by the batch size. With a reference
(`config.bench.reference='hf'`), our calls and the reference's alternate round-robin, so that the
machine's drift (other tenants, clock changes) hits both alike and the printed ratios are in-run.

`max_batch_search` finds the largest batch that encode + greedy decode can run at (paper Table 1):
by real allocations on an accelerator, from the memory model (`fido.analysis.max_batch`) on CPU.
"""

import gc
import json
import os
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fido import analysis
from fido.decoding import greedy_decode_from_encoding
from fido.model.fid import make_model


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def time_interleaved(fns: Sequence[Callable[[], Any]], repeats: int,
                     warmup: int) -> list[list[float]]:
  """Seconds per call of each of `fns`, called round-robin (`warmup` untimed rounds first).

  jax results are waited for; other results (torch tensors) pass `block_until_ready` unchanged.
  No idling between calls: measured on the 2-core CPU, a 0.1-0.5 s pause before each call slows
  our decoder ~10% (worker threads fall asleep), with or without another runtime in between.
  """
  for _ in range(warmup):
    for fn in fns:
      jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, seconds in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds.append(time.perf_counter() - start)
  return times


def timing_fields(encoder_s: list[float], decoder_s: list[float], batch: int) -> dict[str, Any]:
  """Median and [min, max] milliseconds per sample of the encoder, the decoder and their sum."""
  def per_sample_ms(seconds):
    ms = [1000.0 * s / batch for s in seconds]
    return statistics.median(ms), [round(min(ms), 3), round(max(ms), 3)]

  (enc, enc_range), (dec, dec_range) = per_sample_ms(encoder_s), per_sample_ms(decoder_s)
  return dict(encoder_ms=round(enc, 3), decoder_ms=round(dec, 3), total_ms=round(enc + dec, 3),
              encoder_ms_range=enc_range, decoder_ms_range=dec_range)


def random_inputs(rng: np.random.Generator, batch: int, n_passages: int, passage_len: int,
                  vocab_size: int):
  """Random token ids [B, P, L] (ids >= 3: no pad/EOS/unk) and an all-true mask."""
  ids = rng.integers(3, vocab_size, size=(batch, n_passages, passage_len), dtype=np.int32)
  return jnp.asarray(ids), jnp.ones(ids.shape, bool)


def random_params(config: ml_collections.ConfigDict, model, rng: np.random.Generator):
  """Randomly initialised parameters of `model` (seeded by config.bench.seed)."""
  ids, mask = random_inputs(rng, 1, 1, 8, config.model.vocab_size)
  return jax.jit(model.init)(jax.random.PRNGKey(config.bench.seed), ids, mask,
                             jnp.zeros((1, 4), jnp.int32))


def fido_calls(config: ml_collections.ConfigDict, batch: int, rng: np.random.Generator,
               model=None, params=None) -> tuple[Callable, Callable, float]:
  """(encode, decode, first_call_s): zero-argument calls timing our model on one random batch.

  first_call_s is the first (compiling) encode + decode; the calls themselves are compiled.
  """
  bench = config.bench
  model = model or make_model(config.model)
  if params is None:
    params = random_params(config, model, rng)
  encode = jax.jit(model.encode)
  decode = jax.jit(lambda p, enc, enc_mask: greedy_decode_from_encoding(
      model, p, enc, enc_mask, max_length=bench.target_len, stop_at_eos=False).tokens)
  ids, mask = random_inputs(rng, batch, bench.n_passages, bench.passage_len,
                            config.model.vocab_size)
  start = time.perf_counter()
  enc, enc_mask = jax.block_until_ready(encode(params, ids, mask))
  jax.block_until_ready(decode(params, enc, enc_mask))
  first_call_s = time.perf_counter() - start
  return (lambda: encode(params, ids, mask)), (lambda: decode(params, enc, enc_mask)), first_call_s


def _result(config: ml_collections.ConfigDict, batch: int, params, encoder_s: list[float],
            decoder_s: list[float], first_call_s: float) -> dict[str, Any]:
  bench = config.bench
  return dict(
      name=config.name, batch=batch, n_passages=bench.n_passages,
      passage_len=bench.passage_len, target_len=bench.target_len,
      **timing_fields(encoder_s, decoder_s, batch),
      repeats=bench.repeats, first_call_s=round(first_call_s, 2), dtype=config.model.dtype,
      device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
      params=count_params(params),
      encoder=config.model.encoder.size, decoder=config.model.decoder.size,
      cross_attention_period=config.model.decoder.cross_attention_period,
      decoder_kv_heads=config.model.decoder.num_kv_heads,
      cross_kv_heads=config.model.decoder.cross_num_kv_heads,
      fid_light_k=config.model.fid_light_k)


def bench_model(config: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """Yields one result dict per batch size in `config.bench.batch_sizes`."""
  bench = config.bench
  model = make_model(config.model)
  rng = np.random.default_rng(bench.seed)
  params = random_params(config, model, rng)
  for batch in bench.batch_sizes:
    encode, decode, first_call_s = fido_calls(config, batch, rng, model, params)
    encoder_s, decoder_s = time_interleaved([encode, decode], bench.repeats, bench.warmup)
    yield _result(config, batch, params, encoder_s, decoder_s, first_call_s)


def _emit(result: dict[str, Any], output: str) -> None:
  line = json.dumps(result)
  print(line, flush=True)
  if output:
    with open(output, 'a') as f:
      f.write(line + '\n')


def run_bench(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Prints one JSON line per result (and appends them to `config.bench.output` if set).

  With `config.bench.reference='hf'`, also times Hugging Face transformers' T5 FiD on the same
  workload, interleaved with ours call by call, and prints the ratios reference / ours (> 1: we
  are faster). Returns our results.
  """
  bench = config.bench
  if bench.reference not in ('', 'hf'):
    raise ValueError(f'config.bench.reference={bench.reference!r}: expected "" or "hf"')
  if not bench.reference:
    results = list(bench_model(config))
    for result in results:
      _emit(result, bench.output)
    return results
  from fido import bench_reference  # pylint: disable=g-import-not-at-top
  model = make_model(config.model)
  rng = np.random.default_rng(bench.seed)
  params = random_params(config, model, rng)
  reference = bench_reference.HFReference(config)
  results = []
  for batch in bench.batch_sizes:
    encode, decode, first_call_s = fido_calls(config, batch, rng, model, params)
    hf_encode, hf_decode = reference.calls(batch, rng)
    ours_enc, theirs_enc, ours_dec, theirs_dec = time_interleaved(
        [encode, hf_encode, decode, hf_decode], bench.repeats, bench.warmup)
    ours = _result(config, batch, params, ours_enc, ours_dec, first_call_s)
    theirs = reference.result(batch, timing_fields(theirs_enc, theirs_dec, batch))
    _emit(ours, bench.output)
    _emit(theirs, bench.output)
    _emit(dict(name=f'speedup {ours["name"]} vs {theirs["name"]}', batch=batch,
               encoder=round(theirs['encoder_ms'] / ours['encoder_ms'], 2),
               decoder=round(theirs['decoder_ms'] / ours['decoder_ms'], 2),
               total=round(theirs['total_ms'] / ours['total_ms'], 2), interleaved=True),
          bench.output)
    results.append(ours)
  return results


# ------------------------------------------------------------------------------------ max batch

_OOM_MARKERS = ('resource_exhausted', 'out of memory')  # matched case-insensitively


def is_resource_exhausted(error: BaseException) -> bool:
  """True for XLA's out-of-memory errors (at allocation or at compile time), False otherwise."""
  return (isinstance(error, (jax.errors.JaxRuntimeError, MemoryError))
          and any(marker in str(error).lower() for marker in _OOM_MARKERS))


def largest_fitting(fits: Callable[[int], bool], *, start: int = 1, limit: int = 4096
                    ) -> tuple[int, list[tuple[int, bool]]]:
  """The largest batch in [1, limit] with `fits(batch)`, assuming fits is monotone (a threshold).

  `start` is the first guess: if it fits, doubles from it until a batch fails (or `limit` is
  reached); if it does not, the answer lies below it. Then bisects between the largest batch known
  to fit (0 if none) and the smallest known to fail. Returns (0 if batch 1 does not fit, the tries
  [(batch, fit), ...] in order).
  """
  if not 1 <= start <= limit:
    raise ValueError(f'need 1 <= start <= limit, got start={start}, limit={limit}')
  tries = []

  def attempt(batch: int) -> bool:
    ok = bool(fits(batch))
    tries.append((batch, ok))
    return ok

  lo, hi = 0, start                                  # fits(lo) (0: trivially), fails(hi)
  if attempt(start):
    lo = start
    while lo < limit:
      candidate = min(2 * lo, limit)
      if not attempt(candidate):
        hi = candidate
        break
      lo = candidate
    else:
      return lo, tries
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
  return lo, tries


def _zero_params(model, config: ml_collections.ConfigDict):
  """Zero parameters of the bench model's shapes: as much memory as real ones, no init compile."""
  ids = jnp.zeros((1, 1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(config.bench.seed), ids, ids > 0,
                          jnp.zeros((1, 4), jnp.int32))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _allocation_probe(config: ml_collections.ConfigDict) -> Callable[[int], bool]:
  """fits(batch): runs encode + greedy decode at `batch` on the default device; False on OOM."""
  bench = config.bench
  model = make_model(config.model)
  params = _zero_params(model, config)
  encode = jax.jit(model.encode)
  decode = jax.jit(lambda p, enc, enc_mask: greedy_decode_from_encoding(
      model, p, enc, enc_mask, max_length=bench.target_len, stop_at_eos=False).tokens)
  make_ids = jax.jit(  # on the device: no host-side [B, P, L] array at large batches
      lambda key, batch: jax.random.randint(key, (batch, bench.n_passages, bench.passage_len), 3,
                                            config.model.vocab_size, jnp.int32),
      static_argnums=1)

  def run(batch: int) -> None:  # its buffers die with its frame
    ids = make_ids(jax.random.PRNGKey(bench.seed), batch)
    enc, enc_mask = encode(params, ids, jnp.ones(ids.shape, bool))
    jax.block_until_ready(decode(params, enc, enc_mask))

  def fits(batch: int) -> bool:
    try:
      run(batch)
      return True
    except Exception as e:  # pylint: disable=broad-except
      if not is_resource_exhausted(e):
        raise
      return False
    finally:  # free this try's buffers and executables before the next one
      gc.collect()
      jax.clear_caches()

  return fits


def _host_memory_device() -> analysis.Device:
  """The host as a memory-only Device (max_batch needs nothing else; no timing probe)."""
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return analysis.Device(f'cpu ({os.cpu_count()} cores)', 0.0, 0.0, float(memory))


def max_batch_search(config: ml_collections.ConfigDict, *, start: int = 1, limit: int = 4096,
                     method: str = 'auto', fits: Callable[[int], bool] | None = None
                     ) -> dict[str, Any]:
  """The largest batch at which encode + greedy decode of `config.bench`'s workload runs.

  method 'allocation_search' (the default on accelerators): doubling then bisection
  (`largest_fitting`) over real allocations (zero parameters, device-generated inputs; buffers and
  executables freed between tries); an XLA RESOURCE_EXHAUSTED / out-of-memory error means "does
  not fit" and any other error propagates. The answer is relative to the memory JAX may use (on
  GPUs by default 75% of it, preallocated; see XLA_PYTHON_CLIENT_MEM_FRACTION / _PREALLOCATE).
  method 'memory_model' (the default on CPU, whose RAM is no device limit worth probing):
  `fido.analysis.max_batch` against host RAM, capped at `limit` (`start` is not used).
  `start=limit=B` asks only "does batch B fit, and if not, what does?" (one try when it fits).
  `fits` replaces the allocation probe (tests); it implies method 'allocation_search'.

  Returns the config's name and workload, `method`, `max_batch` (0: not even batch 1 fits),
  `hit_limit`, `device`, `seconds`, and per method `tries` [[batch, fit], ...] or `memory_bytes`.
  """
  if method not in ('auto', 'allocation_search', 'memory_model'):
    raise ValueError(f"method={method!r}: expected 'auto', 'allocation_search' or 'memory_model'")
  bench = config.bench
  device = jax.devices()[0]
  if method == 'auto':
    method = ('allocation_search' if fits is not None or device.platform != 'cpu'
              else 'memory_model')
  result = dict(name=config.get('name', ''), method=method, n_passages=bench.n_passages,
                passage_len=bench.passage_len, target_len=bench.target_len,
                dtype=config.model.dtype, start=start, limit=limit)
  begin = time.perf_counter()
  if method == 'memory_model':
    host = _host_memory_device()
    setting = analysis.setting_from_config(config, 1)
    best = min(limit, analysis.max_batch(config.model, setting, host))
    result.update(max_batch=best, device=host.name, memory_bytes=host.memory_bytes,
                  overhead=analysis.MEMORY_OVERHEAD)
  else:
    probe = fits if fits is not None else _allocation_probe(config)
    best, tries = largest_fitting(probe, start=start, limit=limit)
    result.update(max_batch=best, device='injected' if fits is not None else device.device_kind,
                  tries=[[b, ok] for b, ok in tries])
  result.update(hit_limit=result['max_batch'] == limit,
                seconds=round(time.perf_counter() - begin, 2))
  return result
