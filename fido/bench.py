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

`fido.max_batch.max_batch_search` finds the largest batch the same workload fits at (Table 1).
"""

import json
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fido import analysis
from fido import bench_reference
from fido import bench_step
from fido.config import ConfigError
from fido.decoding import greedy_decode_from_encoding
from fido.model import weights
from fido.model.fid import make_model, make_policy
from fido.timing import paired_ratios, time_interleaved


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


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


REFERENCES = ('', 'hf', 'ct2')


def decoder_step_matrices(params) -> list[weights.Matrix]:
  """The weight matrices one decode step multiplies by, each as 2-D [in, out]; the output layer last.

  Per decoder layer: self-attention query/key/value/output, cross-attention query/output (its
  key/value projections run once per sequence, in init_cache) and the MLP's wi_0/wi_1/wo; as stored
  (fido.model.weights: float32, bfloat16, or int8 with its per-column scale; converted trees hold
  query|key|value and wi_0|wi_1 fused, as one matrix each).
  """
  matrices = []
  for module in sorted(params):
    if module == 'output_projection':  # last, below
      continue
    for name in weights.step_matrix_names(module):  # none outside the decoder's step modules
      if name not in params[module]:
        continue
      w, scale = params[module][name], params[module].get(name + weights.SCALE_SUFFIX)
      n_in = weights.input_axes(name)
      d_in = int(np.prod(w.shape[:n_in]))
      matrices.append(weights.Matrix(w.reshape(d_in, -1),
                                     None if scale is None else scale.reshape(-1)))
  output = params['output_projection']
  return matrices + [weights.Matrix(output['w'], output.get('w' + weights.SCALE_SUFFIX))]


def weights_only_decode(matrices: Sequence[weights.Matrix | jax.Array], embeddings_VxD: jax.Array,
                        batch: int, steps: int, dtype: str = 'float32') -> jax.Array:
  """`steps` greedy steps that only multiply by `matrices` (as the model: float32 ones cast to
  `dtype` at use, others by fido.model.weights.matmul).

  Each matrix multiplies the running activation [batch, D] (tiled or cut to its input width) and
  the mean of the product is added back, so every product is needed at every step; the output
  layer's argmax picks the next token, whose embedding starts the next step. Returns int32 [batch].
  """
  policy = make_policy(dtype)
  matrices = [m if isinstance(m, weights.Matrix) else weights.Matrix(m) for m in matrices]

  def step(_, token_B):
    x_BxD = embeddings_VxD[token_B]
    for m in matrices[:-1]:
      d_in = m.w.shape[0]
      x_in = jnp.tile(x_BxD, (1, -(-d_in // x_BxD.shape[1])))[:, :d_in]
      product = weights.matmul(x_in.astype(dtype), m, policy, out_dtype=jnp.float32)
      x_BxD = x_BxD + jnp.mean(product, axis=-1, keepdims=True)
    logits_BxV = weights.matmul(x_BxD.astype(dtype), matrices[-1], policy, out_dtype=jnp.float32)
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


def _append(result: dict[str, Any], output: str) -> dict[str, Any]:
  if output:
    with open(output, 'a') as f:
      f.write(json.dumps(result) + '\n')
  return result


def run_bench(config: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """`run.py --mode=bench`: yields a result per batch size as it is measured (and appends each to
  `config.bench.output` if set).

  With `config.bench.reference='ct2'`, yields per batch size the decode step of each engine of
  fido.bench_step (ours in each weight format, CTranslate2 in float32 and int8), with the ratios.
  With `config.bench.reference='hf'`, also times Hugging Face transformers' T5 FiD on the same
  workload, interleaved with ours call by call, and yields per batch size three results: ours,
  the reference's, and the ratios reference / ours (> 1: we are faster), of the medians and per
  round as [min, median, max].
  """
  bench = config.bench
  if bench.reference not in REFERENCES:
    raise ConfigError(f'config.bench.reference={bench.reference!r}: expected one of {REFERENCES}')
  if bench.reference == 'ct2':
    for batch in bench.batch_sizes:
      for line in bench_step.compare_decode_steps(config, batch):
        yield _append(line, bench.output)
    return
  if not bench.reference:
    for result in bench_model(config):
      yield _append(result, bench.output)
    return
  model = make_model(config.model)
  rng = np.random.default_rng(bench.seed)
  params = random_params(config, model, rng)
  reference = bench_reference.HFReference(config)
  for batch in bench.batch_sizes:
    for line in bench_batch(config, batch, rng, model, params, reference):
      yield _append(line, bench.output)
