"""Inference benchmark: encoder and decoder milliseconds per sample, compile time excluded.

The encoder time covers embedding and encoding all passages; the decoder time covers projecting the
cross-attention keys/values once plus the whole greedy loop of `target_len` steps (EOS ignored so
that random weights decode the full length). Each is the median over `repeats` timed runs after
`warmup` untimed ones, with `block_until_ready`, divided by the batch size.
"""

import json
import statistics
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fido.decoding import greedy_decode_from_encoding
from fido.model.fid import make_model


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def _time(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _summary(seconds: list[float], batch: int) -> dict[str, float]:
  per_sample_ms = [1000.0 * s / batch for s in seconds]
  return dict(median=statistics.median(per_sample_ms), min=min(per_sample_ms),
              max=max(per_sample_ms))


def random_inputs(rng: np.random.Generator, batch: int, n_passages: int, passage_len: int,
                  vocab_size: int):
  """Random token ids [B, P, L] (ids >= 3: no pad/EOS/unk) and an all-true mask."""
  ids = rng.integers(3, vocab_size, size=(batch, n_passages, passage_len), dtype=np.int32)
  return jnp.asarray(ids), jnp.ones(ids.shape, bool)


def bench_model(config: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """Yields one result dict per batch size in `config.bench.batch_sizes`."""
  bench = config.bench
  model = make_model(config.model)
  rng = np.random.default_rng(bench.seed)
  ids, mask = random_inputs(rng, 1, 1, 8, config.model.vocab_size)
  params = jax.jit(model.init)(jax.random.PRNGKey(bench.seed), ids, mask,
                               jnp.zeros((1, 4), jnp.int32))
  encode = jax.jit(model.encode)
  decode = jax.jit(lambda p, enc, enc_mask: greedy_decode_from_encoding(
      model, p, enc, enc_mask, max_length=bench.target_len, stop_at_eos=False).tokens)
  for batch in bench.batch_sizes:
    ids, mask = random_inputs(rng, batch, bench.n_passages, bench.passage_len,
                              config.model.vocab_size)
    compile_start = time.perf_counter()
    enc, enc_mask = jax.block_until_ready(encode(params, ids, mask))
    jax.block_until_ready(decode(params, enc, enc_mask))
    compile_s = time.perf_counter() - compile_start
    encoder = _time(lambda: encode(params, ids, mask), bench.repeats, bench.warmup)
    decoder = _time(lambda: decode(params, enc, enc_mask), bench.repeats, bench.warmup)
    enc_ms, dec_ms = _summary(encoder, batch), _summary(decoder, batch)
    yield dict(
        name=config.name, batch=batch, n_passages=bench.n_passages,
        passage_len=bench.passage_len, target_len=bench.target_len,
        encoder_ms=round(enc_ms['median'], 3), decoder_ms=round(dec_ms['median'], 3),
        total_ms=round(enc_ms['median'] + dec_ms['median'], 3),
        encoder_ms_range=[round(enc_ms['min'], 3), round(enc_ms['max'], 3)],
        decoder_ms_range=[round(dec_ms['min'], 3), round(dec_ms['max'], 3)],
        repeats=bench.repeats, first_call_s=round(compile_s, 2), dtype=config.model.dtype,
        device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
        params=count_params(params),
        encoder=config.model.encoder.size, decoder=config.model.decoder.size,
        cross_attention_period=config.model.decoder.cross_attention_period,
        decoder_kv_heads=config.model.decoder.num_kv_heads,
        cross_kv_heads=config.model.decoder.cross_num_kv_heads,
        fid_light_k=config.model.fid_light_k)


def _emit(result: dict[str, Any], output: str) -> None:
  line = json.dumps(result)
  print(line, flush=True)
  if output:
    with open(output, 'a') as f:
      f.write(line + '\n')


def run_bench(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Prints one JSON line per result (and appends them to `config.bench.output` if set).

  With `config.bench.reference='hf'`, also times Hugging Face transformers' T5 FiD on the same
  workload and prints the ratios reference / ours (> 1: we are faster).
  """
  results = list(bench_model(config))
  for result in results:
    _emit(result, config.bench.output)
  if config.bench.reference == 'hf':
    from fido.bench_reference import bench_hf_reference  # pylint: disable=g-import-not-at-top
    for ours, theirs in zip(results, bench_hf_reference(config)):
      _emit(theirs, config.bench.output)
      _emit(dict(name=f'speedup {ours["name"]} vs {theirs["name"]}', batch=ours['batch'],
                 encoder=round(theirs['encoder_ms'] / ours['encoder_ms'], 2),
                 decoder=round(theirs['decoder_ms'] / ours['decoder_ms'], 2),
                 total=round(theirs['total_ms'] / ours['total_ms'], 2)), config.bench.output)
  elif config.bench.reference:
    raise ValueError(f'config.bench.reference={config.bench.reference!r}: expected "" or "hf"')
  return results
