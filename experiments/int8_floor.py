"""Where the floor of the int8 decode step is on this CPU (issue #17), in one run at batch 4.

  nice -n 10 python experiments/int8_floor.py [--config=experiments/fido.py:small,bench=cpu]
                                              [--batch=4] [--repeats=7]

Times, interleaved call by call (fido.timing), each as (16-step loop - 2-step loop) / 14:
  model      the config's decode step with int8 decoder weights (fused, as `--mode=bench`)
  chain      the step's own int8 matrices, one int8 x int8 matmul each, in the step's order
             (fido.bench.weights_only_decode: the model without attention, norms or caches)
  separate   the same chain with query/key/value and wi_0/wi_1 as separate matrices (before fusing)
  one dot    a single int8 x int8 matmul [D, N] of the same bytes as the chain (one op per step)
  f32 sum    a float32 sum over as many bytes (XLA's plain read rate at this size, no matmul)
and the memory bandwidth fido.analysis.probe_bandwidth measures (float32 sum or x + 1 over 256 MiB).
model / chain: what our model adds to its matmuls; chain / one dot: the cost of many ops over one;
one dot / f32 sum: the int8 matmul kernel's per-byte rate at `batch` rows against a plain read.
"""

import argparse
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fido import analysis, bench, bench_step  # noqa: E402
from fido.config import load_config_file  # noqa: E402
from fido.model import weights  # noqa: E402
from fido.model.fid import make_model  # noqa: E402
from fido.timing import paired_ratios, time_interleaved  # noqa: E402

STEPS, SHORT = 16, 2


def _loops(fn, *args) -> tuple:
  """Zero-argument compiled calls of fn(*args, steps) for STEPS and SHORT steps."""
  calls = []
  for steps in (STEPS, SHORT):
    compiled = jax.jit(lambda *a, s=steps: fn(*a, s))
    jax.block_until_ready(compiled(*args))
    calls.append(lambda c=compiled: c(*args))
  return tuple(calls)


def plain_sum(x: jax.Array, steps: int) -> jax.Array:
  """`steps` sums over every element of `x`, each depending on the last (not hoisted out of the loop)."""
  def step(_, acc):
    return jnp.sum(x + acc) * 1e-9
  return jax.lax.fori_loop(0, steps, step, jnp.zeros([], x.dtype))


def int8_matrix(w) -> weights.Matrix:
  """A float matrix [in, out] as per-output-channel int8 (fido.model.weights.quantize)."""
  return weights.Matrix(*weights.quantize(jnp.asarray(w, jnp.float32), 1))


def matrix_bytes(matrices: list[weights.Matrix]) -> int:
  return sum(m.w.nbytes + m.scale.nbytes for m in matrices)


def engines(config: ml_collections.ConfigDict, batch: int) -> dict[str, tuple]:
  """name -> (long call, short call, bytes one step reads)."""
  rng = np.random.default_rng(0)
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.decoder_weights = 'int8'
  params = bench.random_params(config, make_model(config.model), rng)
  model = make_model(model_config)
  stored = model.load_params(params)
  ids = rng.integers(3, config.model.vocab_size,
                     (batch, config.bench.n_passages, config.bench.passage_len))
  enc, enc_mask = jax.jit(model.encode)(stored, ids, np.ones(ids.shape, bool))
  step_bytes = bench_step.step_bytes(model_config, stored, batch, enc.shape[1], STEPS)

  fused = bench.decoder_step_matrices(stored)
  separate = [int8_matrix(m.w) for m in bench.decoder_step_matrices(params)]
  embeddings = stored['decoder_embedding' if 'decoder_embedding' in stored
                      else 'shared_embedding']['embeddings']
  chain = lambda m, e, steps: bench.weights_only_decode(m, e, batch, steps)
  chain_bytes = matrix_bytes(fused)
  d = embeddings.shape[1]
  big = int8_matrix(rng.normal(size=(d, chain_bytes // d)))
  # The one dot's loop needs an output layer: a tiny one (d x 8), next to nothing to read.
  tiny_out = int8_matrix(rng.normal(size=(d, 8)))
  return {
      'model': (*bench_step.our_loops(model, stored, enc, enc_mask, STEPS), step_bytes['total'],
                len(fused)),
      'chain': (*_loops(chain, fused, embeddings), chain_bytes, len(fused)),
      'separate': (*_loops(chain, separate, embeddings), matrix_bytes(separate), len(separate)),
      'one dot': (*_loops(chain, [big, tiny_out], embeddings[:8]), big.w.nbytes, 2),
      'f32 sum': (*_loops(plain_sum, jnp.ones(big.w.size // 4, jnp.float32)), big.w.nbytes, 0),
  }


def report(named: dict[str, tuple], repeats: int, batch: int) -> None:
  names = list(named)
  calls = [call for name in names for call in named[name][:2]]
  times = time_interleaved(calls, repeats, warmup=1)
  steps = {name: bench_step.step_seconds(times[2 * i], times[2 * i + 1], STEPS - SHORT)
           for i, name in enumerate(names)}
  bandwidth = analysis.probe_bandwidth()
  print(f'probe bandwidth {bandwidth / 1e9:.1f} GB/s; batch {batch}, {repeats} rounds; '
        f'load {os.getloadavg()[0]:.1f}')
  print(f'{"":10} {"matmuls":>7} {"MB":>6} {"ms/step [min-max]":>22} {"GB/s":>6} '
        f'{"over bound":>10}  model over it [min, median, max]')
  for name in names:
    nbytes, ops = named[name][2], named[name][3]
    s = steps[name]
    ms = statistics.median(s) * 1e3
    bound_ms = nbytes / bandwidth * 1e3
    print(f'{name:10} {ops:7d} {nbytes / 1e6:6.1f} {ms:8.2f} [{min(s) * 1e3:.2f}-{max(s) * 1e3:.2f}]'
          f' {nbytes / ms / 1e6:6.1f} {ms / bound_ms:10.2f}  {paired_ratios(steps["model"], s)}')
  for a, b in (('model', 'chain'), ('separate', 'chain'), ('chain', 'one dot'),
               ('one dot', 'f32 sum')):
    print(f'{a} / {b}: {paired_ratios(steps[a], steps[b])}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='experiments/fido.py:small,bench=cpu')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  print(subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip())
  report(engines(load_config_file(args.config), args.batch), args.repeats, args.batch)


if __name__ == '__main__':
  main()
