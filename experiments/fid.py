"""FiD baselines (Izacard & Grave, 2021) on T5.1.1: cross-attention in every layer, multi-head.

  python run.py --mode=bench --config=experiments/fid.py:base
  python run.py --mode=bench --config=experiments/fid.py:small,bench=cpu
  python run.py --mode=bench --config=experiments/fid.py:base,light=6   # FiD-Light, first L/6 tokens
  python run.py --mode=bench --config=experiments/fid.py:tiny,smoke

Variants: tiny, mini, small, base, large, xl, xxl (the T5.1.1 size of both stacks).
Arguments: bench=paper|cpu, smoke (a benchmark workload of seconds: for CPUs and tests), light=k
(FiD-Light), lsa=K (FiD-LSA: cross-attention every K layers), dtype=float32|bfloat16.
"""

from fido import config as fido_config
from fido import experiment


VARIANTS = tuple(fido_config.SIZES)


def get_config(arg: str | None = None):
  arg = fido_config.parse_arg(arg, variants=VARIANTS, variant='base',
                              bench='paper', smoke=False, light=1, lsa=1, dtype='float32')
  config = experiment.default_config()
  config.name = f'fid-{arg.variant}'
  config.model = fido_config.model_config(arg.variant, cross_attention_period=arg.lsa,
                                          fid_light_k=arg.light, dtype=arg.dtype)
  config.bench = fido_config.bench_config('tiny' if arg.smoke else arg.bench)
  return config
