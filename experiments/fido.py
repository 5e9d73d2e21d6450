"""FiDO (de Jong et al., 2022): layer-sparse cross-attention every 6 layers (§3.1), multi-query
attention in the decoder (§3.2) and a decoder two T5.1.1 sizes larger than the encoder (§3.3).

  python run.py --mode=bench --config=experiments/fido.py:base-xl
  python run.py --mode=bench --config=experiments/fido.py:small,bench=cpu     # symmetric FiDO-small
  python run.py --mode=bench --config=experiments/fido.py:tiny,smoke

Variants: small-large, base-xl, large-xxl, xl-xxl (the paper's), any symmetric size name
(small, base, ...: LSA + MQ without the larger decoder), and tiny (tiny encoder, mini decoder).
Arguments: bench=paper|cpu, smoke (a benchmark workload of seconds: for CPUs and tests), lsa=K
(cross-attention period; default 6 as in the paper, capped at the decoder depth), mq=0|1,
dtype=float32|bfloat16.
"""

from fido import config as fido_config
from fido import experiment

ASYMMETRIC = {
    'small-large': ('small', 'large'),
    'base-xl': ('base', 'xl'),
    'large-xxl': ('large', 'xxl'),
    'xl-xxl': ('xl', 'xxl'),
    'tiny': ('tiny', 'mini'),
}
VARIANTS = (*ASYMMETRIC, *(s for s in fido_config.SIZES if s not in ASYMMETRIC))


def get_config(arg: str | None = None):
  arg = fido_config.parse_arg(arg, variants=VARIANTS, variant='base-xl', bench='paper', smoke=False,
                              lsa=0, mq=True, dtype='float32')
  encoder, decoder = ASYMMETRIC.get(arg.variant, (arg.variant, arg.variant))
  kv_heads = 1 if arg.mq else None
  config = experiment.default_config()
  config.name = f'fido-{arg.variant}'
  # The paper's period 6, capped for decoders shallower than 6 layers (tiny); an explicit lsa=K is kept.
  lsa = arg.lsa or min(6, fido_config.stack_config(decoder).num_layers)
  config.model = fido_config.model_config(encoder, decoder, cross_attention_period=lsa,
                                          decoder_kv_heads=kv_heads, cross_kv_heads=kv_heads,
                                          dtype=arg.dtype)
  config.bench = fido_config.bench_config('tiny' if arg.smoke else arg.bench)
  return config
