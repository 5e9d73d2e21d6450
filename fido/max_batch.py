"""The largest batch at which encode + greedy decode of a config's bench workload runs (FiDO
Table 1): by real allocations on an accelerator, from the memory model (`fido.analysis.max_batch`)
on CPU. `max_batch_search` is the entry point; the sweeps' `max_batch=1` calls it.
"""

import gc
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from fido import analysis
from fido.decoding import greedy_decode_from_encoding
from fido.model.fid import make_model

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
