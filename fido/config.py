"""Model configuration: the T5.1.1 size table, FiD/FiDO model configs and their validation.

A model config is an `ml_collections.ConfigDict`:

  model.encoder / model.decoder   one stack each (sizes are independent: FiDO's asymmetric decoder)
    size                          name from SIZES ('small', 'base', ..., 'tiny'), or 'custom'
    d_model, d_ff, num_heads, d_kv, num_layers
    num_kv_heads                  self-attention key/value heads: num_heads (MHA), 1 (MQ), between (GQA)
    position_bias_init_std        std of the normal init of the stack's relative position bias (1.0)
    mimetic_qk, mimetic_vo        mimetic init of self-attention (fido.model.attention; 0.0 = T5's)
  model.decoder only:
    cross_num_kv_heads            cross-attention key/value heads (FiDO: 1)
    cross_attention_period        K: decoder layer i (1-based) cross-attends iff i % K == 0 (FiD: 1)
  model.vocab_size, dropout_rate, layer_norm_epsilon, relative_attention_num_buckets,
  model.relative_attention_max_distance
  model.fid_light_k               FiD-Light: decoder sees the first passage_len // k tokens per passage
  model.dtype                     compute dtype ('float32' or 'bfloat16'); parameters stay float32
  model.decoder_weights           inference storage of the decode step's weight matrices: 'float32',
                                  'bfloat16' or 'int8' (fido.model.weights; made at load time)

A schema: it imports nothing of the library but `fido.errors`, so the model can read it. The
sections every experiment has are assembled above the library, in `fido.experiment`.
"""

import glob
import importlib.util
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_collections

from fido.errors import UserError, did_you_mean


class StackSize(NamedTuple):
  d_model: int
  d_ff: int
  num_heads: int
  d_kv: int
  num_layers: int


# T5.1.1 sizes (d_model, d_ff, heads, d_kv, layers); 'tiny', 'micro' and 'mini' are ours, for CPUs.
SIZES: Mapping[str, StackSize] = {
    'tiny': StackSize(32, 64, 4, 8, 2),
    'micro': StackSize(64, 128, 4, 16, 2),
    'mini': StackSize(128, 256, 4, 32, 4),
    'small': StackSize(512, 1024, 6, 64, 8),
    'base': StackSize(768, 2048, 12, 64, 12),
    'large': StackSize(1024, 2816, 16, 64, 24),
    'xl': StackSize(2048, 5120, 32, 64, 24),
    'xxl': StackSize(4096, 10240, 64, 64, 24),
}

T5_VOCAB_SIZE = 32128
COMPUTE_DTYPES = ('float32', 'bfloat16')
DECODER_WEIGHTS = ('float32', 'bfloat16', 'int8')  # fido.model.weights.WEIGHT_FORMATS


class ConfigError(UserError, ValueError):
  """An impossible configuration; the message names the offending field and value."""


def stack_config(size: str, num_kv_heads: int | None = None, **overrides: Any) -> ml_collections.ConfigDict:
  """One encoder or decoder stack of a named size; `num_kv_heads=None` means MHA."""
  if size not in SIZES:
    raise ConfigError(f'unknown model size {size!r}; expected one of {sorted(SIZES)}')
  dims = SIZES[size]._asdict()
  dims.update(overrides)
  config = ml_collections.ConfigDict(dict(size=size, **dims))
  config.num_kv_heads = config.num_heads if num_kv_heads is None else num_kv_heads
  config.position_bias_init_std = 1.0
  config.mimetic_qk = 0.0
  config.mimetic_vo = 0.0
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
    decoder_weights: str = 'float32',
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
      decoder_weights=decoder_weights,
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
  init_std = stack.get('position_bias_init_std', 1.0)
  _check(isinstance(init_std, (int, float)) and init_std > 0, f'{name}.position_bias_init_std',
         init_std, 'must be a number > 0')
  mimetic_qk, mimetic_vo = stack.get('mimetic_qk', 0.0), stack.get('mimetic_vo', 0.0)
  _check(isinstance(mimetic_qk, (int, float)) and mimetic_qk >= 0, f'{name}.mimetic_qk',
         mimetic_qk, 'must be a number >= 0 (0 = T5 init)')
  _check(isinstance(mimetic_vo, (int, float)) and 0 <= mimetic_vo <= 1, f'{name}.mimetic_vo',
         mimetic_vo, 'must be a number in [0, 1] (0 = T5 init)')
  _check(stack.num_heads % stack.num_kv_heads == 0, f'{name}.num_kv_heads', stack.num_kv_heads,
         f'{name}.num_heads={stack.num_heads} must be divisible by it (MHA = num_heads, MQ = 1)')
  if stack.size in SIZES:
    expected = SIZES[stack.size]
    mismatched = [f for f in StackSize._fields if stack[f] != getattr(expected, f)]
    _check(not mismatched, f'{name}.size', stack.size,
           f'{name}.{"/".join(mismatched)} differ from the {stack.size!r} size table '
           f'{expected}; set {name}.size="custom" for non-standard shapes')


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
  weights = decoder_weights(config)
  _check(weights in DECODER_WEIGHTS, 'decoder_weights', weights,
         f'must be one of {DECODER_WEIGHTS} (int8: per-channel weights, for inference)')


def decoder_weights(config: ml_collections.ConfigDict) -> str:
  """config.model.decoder_weights; 'float32' for configs saved before the field existed."""
  return config.get('decoder_weights', 'float32')


def cross_attention_layers(decoder: ml_collections.ConfigDict) -> list[int]:
  """0-based indices of decoder layers with cross-attention: 1-based i with i % K == 0 (LSA, §3.1)."""
  period = decoder.cross_attention_period
  return [i for i in range(decoder.num_layers) if (i + 1) % period == 0]


def shares_embedding(config: ml_collections.ConfigDict) -> bool:
  """T5 shares the input embedding between encoder and decoder; only possible at equal widths."""
  return config.encoder.d_model == config.decoder.d_model


class _Missing:
  def __repr__(self) -> str:
    return 'nothing'


MISSING = _Missing()  # the value of a field that one side of `config_diff` does not have


def flatten(tree: Any, prefix: str = 'config') -> dict[str, Any]:
  """{'config.section.field': value} of a ConfigDict or nested mapping; tuples become lists (as
  after a JSON round trip, so a config compares equal to its saved JSON)."""
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  if isinstance(tree, Mapping):
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f'{prefix}.{key}').items()}
  return {prefix: list(tree) if isinstance(tree, tuple) else tree}


def config_diff(old: Any, new: Any, *, prefix: str = 'config',
                ignore: Callable[[str], bool] = lambda name: False
                ) -> list[tuple[str, Any, Any]]:
  """(dotted field name, old value, new value) of every field where two configs differ, by name.

  Configs are ConfigDicts or nested mappings (e.g. read back from JSON); a field that only one side
  has is paired with MISSING. `ignore(name)` drops fields from the comparison.
  """
  a, b = flatten(old, prefix), flatten(new, prefix)
  return [(name, a.get(name, MISSING), b.get(name, MISSING)) for name in sorted(set(a) | set(b))
          if not ignore(name) and a.get(name, MISSING) != b.get(name, MISSING)]


def parse_arg(arg: str | None, variants: Sequence[str] = (), **defaults: Any
              ) -> ml_collections.ConfigDict:
  """Parses a config-file argument 'variant,key=value,flag' (big_vision style).

  The first bare word is the variant (one of `variants`, when given); `key=value` pairs override
  `defaults` (values parsed as Python literals when possible); a bare `flag` after the variant sets
  it to True.
  """
  parsed = dict(defaults)
  arguments = sorted(k for k in defaults if k != 'variant')
  for i, part in enumerate(p.strip() for p in (arg or '').split(',') if p.strip()):
    key, has_value, value = part.partition('=')
    if has_value and key in arguments:
      try:
        parsed[key] = _parse_value(value, defaults[key])
      except ValueError as e:
        raise ConfigError(f'config argument {key}={value!r}: {e}') from None
    elif i == 0 and not has_value and 'variant' in defaults:
      parsed['variant'] = part
    elif not has_value and part in arguments:
      parsed[part] = True
    else:
      raise ConfigError(f'unknown config argument {key!r} in {arg!r}{did_you_mean(key, arguments)}; '
                        f'known: {", ".join(arguments)}')
  if variants and parsed.get('variant') not in variants:
    raise ConfigError(f'unknown variant {parsed.get("variant")!r}'
                      f'{did_you_mean(str(parsed.get("variant")), variants)}; expected one of '
                      f'{", ".join(variants)}')
  return ml_collections.ConfigDict(parsed)


def _parse_value(value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() not in ('true', 'false', '1', '0'):
      raise ConfigError(f'expected a boolean, got {value!r}')
    return value.lower() in ('true', '1')
  if isinstance(default, (int, float)):
    try:
      return type(default)(value)
    except ValueError:
      raise ConfigError(f'expected {type(default).__name__}, got {value!r}') from None
  return value


def bench_config(setting: str = 'paper') -> ml_collections.ConfigDict:
  """Inference benchmark settings; 'paper' is the paper's (40 x 256 tokens, 32 out, batch 24/64)."""
  settings = {
      # FiDO §4 / Table 3: 40 passages of 256 tokens, 32 output tokens, greedy.
      'paper': dict(batch_sizes=(24, 64), n_passages=40, passage_len=256, target_len=32),
      # The 2-core CPU reference point of issue #2 (T5.1.1-small against Hugging Face's T5).
      'cpu': dict(batch_sizes=(4,), n_passages=10, passage_len=128, target_len=16),
      # Smoke runs and tests (experiments' `smoke` argument).
      'tiny': dict(batch_sizes=(2,), n_passages=3, passage_len=16, target_len=4),
  }
  if setting not in settings:
    raise ConfigError(f'unknown bench setting {setting!r}; expected one of {sorted(settings)}')
  return ml_collections.ConfigDict(dict(
      setting=setting, repeats=5, warmup=1, seed=0, output='', reference='',
      weights_only=False,  # also time a loop of only the decode step's weight matmuls
      # reference='ct2' (fido.bench_step): our decode-step weight formats, and more models
      # (space-separated config files, e.g. 'experiments/fido.py:small') timed in the same run.
      weight_formats=('float32', 'bfloat16', 'int8'), step_models='',
      **settings[setting]))


# The sections of --mode=retrieve and --mode=predict live here, not in their modules: those import
# bm25s, which starts a JAX backend when imported, and config assembly must not (a multi-host run
# initialises jax.distributed first).
def retrieve_config() -> ml_collections.ConfigDict:
  """The `config.retrieve` section: a BM25 index over a passage corpus, top-k per question."""
  return ml_collections.ConfigDict(dict(
      corpus='',             # passages: DPR tsv, JSONL {id, title, text} or text, one per line;
                             # '' = the synthetic data's passages (all splits, pooled)
      corpus_format='auto',  # 'auto' (by name) | 'dpr_tsv' | 'jsonl' | 'text'
      questions='',          # question files, comma-separated; '' = config.data.test
      questions_format='auto',  # 'auto' (by name) | 'fid' | 'dpr_qas'
      top_k=100,             # passages written per question
      k1=0.9, b=0.4,         # BM25 parameters (Anserini's defaults)
      method='lucene',       # bm25s scoring variant
      stopwords='en',        # bm25s stop-word list ('' = none)
      recall_at=(1, 5, 10, 20, 100),
      progress=True,
  ))


def predict_config() -> ml_collections.ConfigDict:
  """The `config.predict` section: answers for questions, with or without gold answers."""
  return ml_collections.ConfigDict(dict(
      questions='',          # a question file (fid or dpr_qas format); '' = config.data.test
      questions_format='auto',
      index='',              # a --mode=retrieve workdir: passages for questions without them
      step=-1,               # checkpoint step; -1 = the latest
      beam_size=1,           # 1 = greedy
      alpha=0.6,             # beam-search length penalty exponent
      batch_size=16,
      max_decode_len=0,      # 0 = config.data.target_len
      crossattention_scores=True,  # each passage's share of the decoder's cross-attention
      progress=True,
  ))


def load_config_module(path: str) -> Any:
  """The config file at `path` as a module (its get_config, VARIANTS, docstring, ...)."""
  if not os.path.isfile(path):
    siblings = glob.glob(os.path.join(os.path.dirname(path), '*.py'))
    raise ConfigError(f'config file {path!r} does not exist{did_you_mean(path, siblings)}')
  module_spec = importlib.util.spec_from_file_location(
      f'fido_experiment_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/file.py[:arg]' by calling its get_config(arg), as `--config` does."""
  path, _, arg = spec.partition(':')
  module = load_config_module(path)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} has no get_config(arg) function')
  try:
    return module.get_config(arg or None)
  except ConfigError as e:
    raise ConfigError(f'--config={spec}: {e}') from e
