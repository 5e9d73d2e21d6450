"""Inference benchmark: encoder and decoder milliseconds per sample, compile time excluded.

The encoder time covers embedding and encoding all passages; the decoder time covers projecting the
cross-attention keys/values once plus the whole greedy loop of `target_len` steps (EOS ignored so
that random weights decode the full length). Each is the median over `repeats` timed runs after
`warmup` untimed ones, with `block_until_ready`, divided by the batch size. With a reference
(`config.bench.reference='hf'`), our calls and the reference's alternate round-robin, so that the
machine's drift (other tenants, clock changes) hits both alike and the printed ratios are in-run.

`weights_only_call` times a loop that does nothing but a decode step's weight matmuls, at the same
batch and number of steps (`config.bench.weights_only`): how close the decoder is to the cost of
reading its weights once per step, whatever the hardware.

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
from fido import bench_reference
from fido.config import ConfigError
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


def paired_ratios(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> list[float]:
  """[min, median, max] over rounds of numerator / denominator (times taken in the same round).

  Round by round, drift on a shared machine cancels; the spread shows how much it moved the ratio.
  """
  ratios = [n / d for n, d in zip(numerator_s, denominator_s, strict=True)]
  return [round(min(ratios), 2), round(statistics.median(ratios), 2), round(max(ratios), 2)]


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


_STEP_MODULES = ('self_attention', 'cross_attention', 'mlp')


def decoder_step_matrices(params) -> list[jax.Array]:
  """The weight matrices one decode step multiplies by, each as 2-D [in, out]; the output layer last.

  Per decoder layer: self-attention query/key/value/output, cross-attention query/output (its
  key/value projections run once per sequence, in init_cache) and the MLP's wi_0/wi_1/wo.
  """
  matrices = []
  for module in sorted(params):
    kind = module.split('/')[-1]
    if module.split('/')[0] != 'decoder' or kind not in _STEP_MODULES:
      continue
    for name, w in sorted(params[module].items()):
      if kind == 'cross_attention' and name in ('key', 'value'):
        continue
      matrices.append(w.reshape(-1, w.shape[-1]) if name == 'output' else w.reshape(w.shape[0], -1))
  return matrices + [params['output_projection']['w']]


def weights_only_decode(matrices: Sequence[jax.Array], embeddings_VxD: jax.Array, batch: int,
                        steps: int, dtype: str = 'float32') -> jax.Array:
  """`steps` greedy steps that only multiply by `matrices` (cast to `dtype` at use, as the model).

  Each matrix multiplies the running activation [batch, D] (tiled or cut to its input width) and
  the mean of the product is added back, so every product is needed at every step; the output
  layer's argmax picks the next token, whose embedding starts the next step. Returns int32 [batch].
  """
  def step(_, token_B):
    x_BxD = embeddings_VxD[token_B]
    for w in matrices[:-1]:
      d_in = w.shape[0]
      x_in = jnp.tile(x_BxD, (1, -(-d_in // x_BxD.shape[1])))[:, :d_in]
      product = jnp.dot(x_in.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
      x_BxD = x_BxD + jnp.mean(product, axis=-1, keepdims=True)
    logits_BxV = jnp.dot(x_BxD.astype(dtype), matrices[-1].astype(dtype),
                         preferred_element_type=jnp.float32)
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  return jax.lax.fori_loop(0, steps, step, jnp.zeros((batch,), jnp.int32))


def weights_only_call(config: ml_collections.ConfigDict, params, batch: int) -> Callable:
  """A zero-argument, compiled call of `weights_only_decode` for our model's decoder."""
  embedding = 'decoder_embedding' if 'decoder_embedding' in params else 'shared_embedding'
  matrices, embeddings = decoder_step_matrices(params), params[embedding]['embeddings']
  fn = jax.jit(lambda m, e: weights_only_decode(m, e, batch, config.bench.target_len,
                                                config.model.dtype))
  jax.block_until_ready(fn(matrices, embeddings))
  return lambda: fn(matrices, embeddings)


def _result(config: ml_collections.ConfigDict, batch: int, params, encoder_s: list[float],
            decoder_s: list[float], first_call_s: float) -> dict[str, Any]:
  bench = config.bench
  timings = timing_fields(encoder_s, decoder_s, batch)
  setting = analysis.setting_from_config(config, batch)
  flops = analysis.flops_per_sample(config.model, setting)
  traffic = analysis.bytes_per_sample(config.model, setting)
  return dict(
      name=config.name, batch=batch, n_passages=bench.n_passages,
      passage_len=bench.passage_len, target_len=bench.target_len, **timings,
      # Achieved rates from fido.analysis's counts: the encoder is compute-bound, decoding reads.
      encoder_gflop_per_s=round(flops['encoder'] / timings['encoder_ms'] / 1e6, 1),
      decoder_gb_per_s=round(traffic['decoder'] / timings['decoder_ms'] / 1e6, 1),
      repeats=bench.repeats, first_call_s=round(first_call_s, 2), dtype=config.model.dtype,
      device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
      params=count_params(params),
      encoder=config.model.encoder.size, decoder=config.model.decoder.size,
      cross_attention_period=config.model.decoder.cross_attention_period,
      decoder_kv_heads=config.model.decoder.num_kv_heads,
      cross_kv_heads=config.model.decoder.cross_num_kv_heads,
      fid_light_k=config.model.fid_light_k)


def bench_batch(config: ml_collections.ConfigDict, batch: int, rng: np.random.Generator, model,
                params, reference=None) -> list[dict[str, Any]]:
  """Times one batch size; returns [ours], or [ours, theirs, speed-ups] with a `reference`.

  `reference` is a `bench_reference.HFReference`. All calls (ours, the reference's, the weights-only
  loop) alternate round-robin, `config.bench.repeats` rounds after `warmup` untimed ones.
  """
  bench = config.bench
  encode, decode, first_call_s = fido_calls(config, batch, rng, model, params)
  if reference is None:
    calls = dict(encode=encode, decode=decode)
  else:
    hf_encode, hf_decode = reference.calls(batch, rng)
    calls = dict(encode=encode, hf_encode=hf_encode, decode=decode, hf_decode=hf_decode)
  if bench.weights_only:
    calls['weights_only'] = weights_only_call(config, params, batch)
  times = dict(zip(calls, time_interleaved(list(calls.values()), bench.repeats, bench.warmup)))
  ours = _result(config, batch, params, times['encode'], times['decode'], first_call_s)
  if bench.weights_only:
    ours.update(
        weights_only_ms=round(1000.0 * statistics.median(times['weights_only']) / batch, 3),
        decoder_over_weights_only=paired_ratios(times['decode'], times['weights_only']))
  if reference is None:
    return [ours]
  theirs = reference.result(batch, timing_fields(times['hf_encode'], times['hf_decode'], batch))
  ours_total = [e + d for e, d in zip(times['encode'], times['decode'])]
  theirs_total = [e + d for e, d in zip(times['hf_encode'], times['hf_decode'])]
  speedup = dict(
      name=f'speedup {ours["name"]} vs {theirs["name"]}', batch=batch,
      encoder=round(theirs['encoder_ms'] / ours['encoder_ms'], 2),
      decoder=round(theirs['decoder_ms'] / ours['decoder_ms'], 2),
      total=round(theirs['total_ms'] / ours['total_ms'], 2), interleaved=True,
      encoder_per_round=paired_ratios(times['hf_encode'], times['encode']),
      decoder_per_round=paired_ratios(times['hf_decode'], times['decode']),
      total_per_round=paired_ratios(theirs_total, ours_total))
  return [ours, theirs, speedup]


def bench_model(config: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """Yields our result dict per batch size in `config.bench.batch_sizes`."""
  model = make_model(config.model)
  rng = np.random.default_rng(config.bench.seed)
  params = random_params(config, model, rng)
  for batch in config.bench.batch_sizes:
    yield bench_batch(config, batch, rng, model, params)[0]


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
  are faster): of the medians, and per round as [min, median, max]. Returns our results.
  """
  bench = config.bench
  if bench.reference not in ('', 'hf'):
    raise ConfigError(f'config.bench.reference={bench.reference!r}: expected "" or "hf"')
  if not bench.reference:
    results = list(bench_model(config))
    for result in results:
      _emit(result, bench.output)
    return results
  model = make_model(config.model)
  rng = np.random.default_rng(bench.seed)
  params = random_params(config, model, rng)
  reference = bench_reference.HFReference(config)
  results = []
  for batch in bench.batch_sizes:
    lines = bench_batch(config, batch, rng, model, params, reference)
    for line in lines:
      _emit(line, bench.output)
    results.append(lines[0])
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
