"""The decode step, ours against CTranslate2's (`--mode=bench`, `config.bench.reference='ct2'`).

Decode step = (time of a `target_len`-token greedy loop - time of a 2-token loop) / (target_len - 2),
both from the same encoder output: the cross-attention key/value projection, CTranslate2's
encoder (see fido.bench_reference.CT2Reference) and call overheads cancel, leaving what one more
token costs a batch. Every loop of every engine alternates call by call (fido.timing), so the
ratios (CTranslate2's step over ours, > 1: ours is faster) are taken round by round.

Engines: our model (the config's, and each config in `config.bench.step_models`) with its decode-step
weights stored in each of `config.bench.weight_formats` (fido.model.weights), and CTranslate2 in
float32 and int8 on the FiD of the config's encoder size (the config's own weights when it is a FiD).

Next to each step, what it reads (`step_bytes`: the step's weight matrices as stored, the
cross-attention keys/values of every cross-attention layer and the self-attention caches, in the
compute dtype) and the bound that sets at the memory bandwidth measured in the same run
(`fido.analysis.probe_bandwidth`): bound_ms = bytes / bandwidth, and the step over that bound.
"""

import os
import statistics
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fido import analysis
from fido import bench_reference
from fido.config import ConfigError, cross_attention_layers, load_config_file
from fido.decoding import greedy_decode_from_encoding
from fido.model import weights
from fido.model.fid import make_model
from fido.timing import time_interleaved

SHORT_LOOP = 2  # tokens of the loop subtracted


def step_bytes(model: ml_collections.ConfigDict, params, batch: int, n_encoder_tokens: int,
               max_length: int) -> dict[str, int]:
  """Bytes one decode step of `batch` rows reads: weights (as stored in `params`) and caches."""
  dec = model.decoder
  itemsize = jnp.dtype(model.dtype).itemsize
  cross = len(cross_attention_layers(dec)) * 2 * batch * n_encoder_tokens * dec.cross_num_kv_heads
  self_ = dec.num_layers * 2 * batch * max_length * dec.num_kv_heads
  caches = (cross + self_) * dec.d_kv * itemsize
  matrices = weights.step_bytes(params)
  return dict(weights=matrices, caches=caches, total=matrices + caches)


def step_seconds(long_s: Sequence[float], short_s: Sequence[float], steps: int) -> list[float]:
  """Per round, (long loop - short loop) / the steps between them."""
  return [(a - b) / steps for a, b in zip(long_s, short_s, strict=True)]


def _ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
  ratios = sorted(n / d for n, d in zip(numerator, denominator, strict=True))
  return [round(ratios[0], 2), round(statistics.median(ratios), 2), round(ratios[-1], 2)]


def our_loops(model, params, enc, enc_mask, target_len: int) -> tuple[Callable, Callable]:
  """Zero-argument compiled calls: greedy loops of `target_len` and SHORT_LOOP tokens from `enc`."""
  def loop(length):
    fn = jax.jit(lambda p, e, m: greedy_decode_from_encoding(
        model, p, e, m, max_length=length, stop_at_eos=False).tokens)
    jax.block_until_ready(fn(params, enc, enc_mask))
    return lambda: fn(params, enc, enc_mask)
  return loop(target_len), loop(SHORT_LOOP)


def _models(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  models = [(config.name, config.model)]
  for spec in config.bench.step_models.split():
    other = load_config_file(spec)
    models.append((other.get('name', spec), other.model))
  return models


def _random_params(model_config, seed: int):
  model = make_model(model_config)
  ids = np.full((1, 1, 8), 3, np.int32)
  return jax.jit(model.init)(jax.random.PRNGKey(seed), ids, ids > 0, np.zeros((1, 4), np.int32))


class Engine:
  """One timed engine: its two loops and what a step reads."""

  def __init__(self, name: str, loops: tuple[Callable, Callable], nbytes: dict[str, int],
               **info: Any):
    self.name, self.loops, self.bytes, self.info = name, loops, nbytes, info


def _ours(config, rng, batch) -> tuple[list[Engine], dict]:
  bench = config.bench
  engines, float_params = [], {}
  ids = rng.integers(3, config.model.vocab_size, (batch, bench.n_passages, bench.passage_len))
  for name, model_config in _models(config):
    params = _random_params(model_config, bench.seed)
    float_params[name] = (model_config, params)
    for weight_format in bench.weight_formats:
      variant = ml_collections.ConfigDict(model_config.to_dict())
      variant.decoder_weights = weight_format
      model = make_model(variant)
      stored = model.load_params(params)
      enc, enc_mask = jax.jit(model.encode)(stored, ids, np.ones(ids.shape, bool))
      engines.append(Engine(
          f'fido {name} {weight_format}', our_loops(model, stored, enc, enc_mask, bench.target_len),
          step_bytes(variant, stored, batch, enc.shape[1], bench.target_len),
          weights=weight_format))
  return engines, float_params


def _ct2(config, float_params, rng, batch) -> list[Engine]:
  """CTranslate2 engines on the FiD twin of the config's model, checked against our decoder."""
  bench = config.bench
  main_model, main_params = float_params[config.name]
  twin = bench_reference.fid_twin(main_model)
  params = main_params if twin is main_model else _random_params(twin, bench.seed)
  reference = bench_reference.CT2Reference(params, twin)
  source = rng.integers(3, twin.vocab_size, (batch, bench.n_passages * bench.passage_len))
  enc = reference.encoder_output(source)
  engines = []
  for compute_type in reference.COMPUTE_TYPES:
    variant = ml_collections.ConfigDict(twin.to_dict())
    variant.decoder_weights = compute_type
    model = make_model(variant)
    stored = model.load_params(params)
    # The same tokens from the same encoder output: the conversion carried the weights over.
    ours = greedy_decode_from_encoding(model, stored, enc, np.ones(source.shape, bool),
                                       max_length=bench.target_len, stop_at_eos=False).tokens
    theirs = reference.decode(source, bench.target_len, compute_type)
    engines.append(Engine(
        f'ctranslate2 {twin.encoder.size} {compute_type}',
        (lambda ct=compute_type: reference.decode(source, bench.target_len, ct),
         lambda ct=compute_type: reference.decode(source, SHORT_LOOP, ct)),
        step_bytes(variant, stored, batch, source.shape[1], bench.target_len),
        weights=compute_type, ctranslate2=reference.version(),
        tokens_agree_with_fido=round(float(np.mean(np.asarray(ours) == theirs)), 4)))
  return engines


def compare_decode_steps(config: ml_collections.ConfigDict, batch: int) -> list[dict[str, Any]]:
  """One result per engine (ours, then CTranslate2's) at `batch`; see the module docstring."""
  bench = config.bench
  if bench.target_len <= SHORT_LOOP:
    raise ConfigError(f'config.bench.target_len={bench.target_len}: the decode step needs '
                      f'more than {SHORT_LOOP} tokens')
  for weight_format in bench.weight_formats:
    if weight_format not in weights.WEIGHT_FORMATS:
      raise ConfigError(f'config.bench.weight_formats: {weight_format!r} is not one of '
                        f'{weights.WEIGHT_FORMATS}')
  rng = np.random.default_rng(bench.seed)
  engines, float_params = _ours(config, rng, batch)
  engines += _ct2(config, float_params, rng, batch)
  bandwidth = analysis.probe_bandwidth()
  times = time_interleaved([loop for e in engines for loop in e.loops], bench.repeats, bench.warmup)
  steps = bench.target_len - SHORT_LOOP
  step_s = {e.name: step_seconds(times[2 * i], times[2 * i + 1], steps)
            for i, e in enumerate(engines)}
  ct2 = {e.info['weights']: step_s[e.name] for e in engines if e.name.startswith('ctranslate2')}
  results = []
  for engine in engines:
    seconds = step_s[engine.name]
    step_ms = 1000 * statistics.median(seconds)
    bound_ms = 1000 * engine.bytes['total'] / bandwidth
    results.append(dict(
        name=engine.name, batch=batch, decode_step_ms=round(step_ms, 3),
        decode_step_ms_range=[round(1000 * min(seconds), 3), round(1000 * max(seconds), 3)],
        step_mb=round(engine.bytes['total'] / 1e6, 1),
        step_weights_mb=round(engine.bytes['weights'] / 1e6, 1),
        bound_ms=round(bound_ms, 2), step_over_bound=round(step_ms / bound_ms, 2),
        **{f'ctranslate2_{ct}_over_this': _ratios(s, seconds) for ct, s in ct2.items()},
        **engine.info, n_passages=bench.n_passages, passage_len=bench.passage_len,
        target_len=bench.target_len, repeats=bench.repeats,
        bandwidth_gb_per_s=round(bandwidth / 1e9, 1), load_average=round(os.getloadavg()[0], 1)))
  return results
