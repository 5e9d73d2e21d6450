"""Model configuration: the T5.1.1 size table, FiD/FiDO model configs and their validation.

A model config is an `ml_collections.ConfigDict`:

  model.encoder / model.decoder   one stack each (sizes are independent: FiDO's asymmetric decoder)
    size                          name from SIZES ('small', 'base', ..., 'tiny'), or 'custom'
    d_model, d_ff, num_heads, d_kv, num_layers
    num_kv_heads                  self-attention key/value heads: num_heads (MHA), 1 (MQ), between (GQA)
  model.decoder only:
    cross_num_kv_heads            cross-attention key/value heads (FiDO: 1)
    cross_attention_period        K: decoder layer i (1-based) cross-attends iff i % K == 0 (FiD: 1)
  model.vocab_size, dropout_rate, layer_norm_epsilon, relative_attention_num_buckets,
  model.relative_attention_max_distance
  model.fid_light_k               FiD-Light: decoder sees the first passage_len // k tokens per passage
  model.dtype                     compute dtype ('float32' or 'bfloat16'); parameters stay float32
"""

from typing import Any, Mapping, NamedTuple

import ml_collections


class StackSize(NamedTuple):
  d_model: int
  d_ff: int
  num_heads: int
  d_kv: int
  num_layers: int


# T5.1.1 sizes (d_model, d_ff, heads, d_kv, layers); 'tiny' and 'mini' are ours, for CPU tests.
SIZES: Mapping[str, StackSize] = {
    'tiny': StackSize(32, 64, 4, 8, 2),
    'mini': StackSize(128, 256, 4, 32, 4),
    'small': StackSize(512, 1024, 6, 64, 8),
    'base': StackSize(768, 2048, 12, 64, 12),
    'large': StackSize(1024, 2816, 16, 64, 24),
    'xl': StackSize(2048, 5120, 32, 64, 24),
    'xxl': StackSize(4096, 10240, 64, 64, 24),
}

T5_VOCAB_SIZE = 32128
COMPUTE_DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """An impossible configuration; the message names the offending field and value."""


def stack_config(size: str, num_kv_heads: int | None = None, **overrides: Any) -> ml_collections.ConfigDict:
  """One encoder or decoder stack of a named size; `num_kv_heads=None` means MHA."""
  if size not in SIZES:
    raise ConfigError(f'unknown model size {size!r}; expected one of {sorted(SIZES)}')
  dims = SIZES[size]._asdict()
  dims.update(overrides)
  config = ml_collections.ConfigDict(dict(size=size, **dims))
  config.num_kv_heads = config.num_heads if num_kv_heads is None else num_kv_heads
  return config


def model_config(
    encoder: str = 'base',
    decoder: str | None = None,
    *,
    cross_attention_period: int = 1,
    decoder_kv_heads: int | None = None,
    cross_kv_heads: int | None = None,
    fid_light_k: int = 1,
    vocab_size: int = T5_VOCAB_SIZE,
    dropout_rate: float = 0.0,
    dtype: str = 'float32',
) -> ml_collections.ConfigDict:
  """A FiD (defaults) or FiDO model config; `decoder=None` means the encoder's size.

  FiDO (de Jong et al., 2022) = `cross_attention_period=6` (LSA, §3.1), `decoder_kv_heads=1,
  cross_kv_heads=1` (multi-query, §3.2) and a decoder two sizes up (asymmetric, §3.3).
  """
  enc = stack_config(encoder)
  dec = stack_config(decoder or encoder, num_kv_heads=decoder_kv_heads)
  dec.cross_num_kv_heads = dec.num_heads if cross_kv_heads is None else cross_kv_heads
  dec.cross_attention_period = cross_attention_period
  config = ml_collections.ConfigDict(dict(
      encoder=enc,
      decoder=dec,
      vocab_size=vocab_size,
      dropout_rate=dropout_rate,
      layer_norm_epsilon=1e-6,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      fid_light_k=fid_light_k,
      dtype=dtype,
  ))
  validate_model_config(config)
  return config


def _check(condition: bool, field: str, value: Any, requirement: str) -> None:
  if not condition:
    raise ConfigError(f'config.model.{field}={value!r} is invalid: {requirement}')


def _validate_stack(stack: ml_collections.ConfigDict, name: str) -> None:
  if stack.size != 'custom' and stack.size not in SIZES:
    raise ConfigError(f'config.model.{name}.size={stack.size!r} is not a known size; '
                      f'expected one of {sorted(SIZES)} or "custom"')
  for field in ('d_model', 'd_ff', 'num_heads', 'd_kv', 'num_layers', 'num_kv_heads'):
    value = stack[field]
    _check(isinstance(value, int) and value >= 1, f'{name}.{field}', value, 'must be an integer >= 1')
  _check(stack.num_heads % stack.num_kv_heads == 0, f'{name}.num_kv_heads', stack.num_kv_heads,
         f'{name}.num_heads={stack.num_heads} must be divisible by it (MHA = num_heads, MQ = 1)')
  if stack.size in SIZES:
    expected = SIZES[stack.size]
    mismatched = [f for f in StackSize._fields if stack[f] != getattr(expected, f)]
    _check(not mismatched, f'{name}.size', stack.size,
           f'{name}.{"/".join(mismatched)} differ from the {stack.size!r} size table '
           f'{expected}; set {name}.size="custom" for non-standard shapes')
  # T5 sizes have d_model == num_heads * d_kv; other splits are allowed but must be intentional.
  _check(stack.d_model == stack.num_heads * stack.d_kv or stack.size == 'custom', f'{name}.d_model',
         stack.d_model, f'must equal num_heads * d_kv = {stack.num_heads * stack.d_kv} '
         f'unless {name}.size="custom"')


def validate_model_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field of the first impossible setting in `config` (config.model)."""
  for name in ('encoder', 'decoder'):
    if name not in config:
      raise ConfigError(f'config.model.{name} is missing')
    _validate_stack(config[name], name)
  dec = config.decoder
  period = dec.cross_attention_period
  _check(isinstance(period, int) and period >= 1, 'decoder.cross_attention_period', period,
         'must be an integer >= 1 (1 = cross-attention in every layer, as FiD)')
  _check(period <= dec.num_layers, 'decoder.cross_attention_period', period,
         f'must be <= decoder.num_layers={dec.num_layers}, or no layer would cross-attend')
  _check(isinstance(dec.cross_num_kv_heads, int) and dec.cross_num_kv_heads >= 1
         and dec.num_heads % dec.cross_num_kv_heads == 0, 'decoder.cross_num_kv_heads',
         dec.cross_num_kv_heads, f'must divide decoder.num_heads={dec.num_heads}')
  _check(isinstance(config.fid_light_k, int) and config.fid_light_k >= 1, 'fid_light_k',
         config.fid_light_k, 'must be an integer >= 1 (1 = off)')
  _check(config.vocab_size >= 2, 'vocab_size', config.vocab_size, 'must be >= 2')
  _check(0.0 <= config.dropout_rate < 1.0, 'dropout_rate', config.dropout_rate, 'must be in [0, 1)')
  _check(config.dtype in COMPUTE_DTYPES, 'dtype', config.dtype, f'must be one of {COMPUTE_DTYPES}')


def cross_attention_layers(decoder: ml_collections.ConfigDict) -> list[int]:
  """0-based indices of decoder layers with cross-attention: 1-based i with i % K == 0 (LSA, §3.1)."""
  period = decoder.cross_attention_period
  return [i for i in range(decoder.num_layers) if (i + 1) % period == 0]


def shares_embedding(config: ml_collections.ConfigDict) -> bool:
  """T5 shares the input embedding between encoder and decoder; only possible at equal widths."""
  return config.encoder.d_model == config.decoder.d_model
