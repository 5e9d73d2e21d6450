"""Hugging Face T5.1.1 checkpoints <-> fido FiD parameter trees.

  load_hf_t5(dir) -> (hf_config, tensors)          config.json + model.safetensors (or sharded), no torch
  fid_config_from_hf(hf_config) -> config.model    FiD: every decoder layer cross-attends, MHA, symmetric
  hf_to_params(hf_config, tensors, config.model)   -> Haiku params (float32 numpy)
  params_to_hf(params, config.model)               -> HF tensors;  save_hf_t5(...) writes a loadable dir

One table (`tensor_map`) pairs every HF tensor with its Haiku parameter and both layouts; both directions
walk it, so a tensor is never silently dropped or left unset. HF's torch Linear weights are [out, in]:
q [H*E, D] <-> query [D, H, E]; k/v [K*E, D_in] <-> key/value [D_in, K, E]; o [D, H*E] <-> output
[H, E, D]; wi [F, D] <-> [D, F]; lm_head [V, D] <-> output_projection/w [D, V]. FiDO conversion
(issue #6: mean-pooled kv heads, dropped cross-attention layers, asymmetric) adds transforms to the same
table; until then hf_to_params/params_to_hf accept FiD configs only.
"""

import json
import math
import pathlib
from typing import Any, NamedTuple

import ml_collections
import ml_dtypes
import numpy as np
import safetensors
from safetensors import safe_open
from safetensors.numpy import save_file

from fido.config import SIZES, StackSize, cross_attention_layers, model_config, validate_model_config
from fido.errors import CheckpointError, ConversionError
from fido.model.kv_heads import kv_shape

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = 'config.json', 'model.safetensors', 'model.safetensors.index.json'
# Tensors HF itself ignores or ties to `shared.weight`; accepted only as exact copies of it (or ignored).
_IGNORED = frozenset({'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight'})
_TIED_INPUTS = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


# ---------------------------------------------------------------- reading HF checkpoints


def check_hf_architecture(hf_config: dict[str, Any], source: str = 'config.json') -> None:
  """Raises ConversionError unless `hf_config` describes a T5.1.1 model (gated-GELU, untied, unscaled)."""
  def reject(why):
    raise ConversionError(f'{source}: unsupported architecture: {why}; fido converts T5.1.1 only')
  if hf_config.get('model_type') != 't5':
    reject(f'model_type={hf_config.get("model_type")!r} (expected "t5")')
  ff = hf_config.get('feed_forward_proj', 'relu')  # HF's default is T5 v1.0's ReLU
  if ff != 'gated-gelu':
    reject(f'feed_forward_proj={ff!r} (T5 v1.0 uses "relu"; T5.1.1 is "gated-gelu")')
  # transformers>=5 always writes tie_word_embeddings=true and records the v1.0 logit scaling as
  # scale_decoder_outputs; older configs say tie_word_embeddings=false for T5.1.1 (default true).
  scaled = hf_config.get('scale_decoder_outputs', hf_config.get('tie_word_embeddings', True))
  if scaled is not False:
    reject('tie_word_embeddings=true without scale_decoder_outputs=false: a T5 v1.0-style output layer '
           'tied to the embedding with d_model**-0.5 logit scaling (fido: untied, unscaled)')
  if not hf_config.get('is_encoder_decoder', True):
    reject('is_encoder_decoder=false')
  start = hf_config.get('decoder_start_token_id', hf_config.get('pad_token_id', 0))
  if start not in (None, 0):
    reject(f'decoder_start_token_id={start} (fido decodes from id 0, as T5)')


_NP_DTYPES = {'F64': 'f8', 'F32': 'f4', 'F16': 'f2', 'I64': 'i8', 'I32': 'i4', 'I16': 'i2', 'I8': 'i1',
              'U8': 'u1', 'BOOL': '?'}


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of one file, in their stored dtype (bfloat16 via ml_dtypes; numpy has none)."""
  if not path.is_file():
    raise CheckpointError(f'missing checkpoint shard {path}')
  with safe_open(str(path), framework='np') as f:
    names = list(f.keys())
    if all(f.get_slice(n).get_dtype() != 'BF16' for n in names):
      return {n: f.get_tensor(n) for n in names}
  return {name: np.frombuffer(t['data'], ml_dtypes.bfloat16 if t['dtype'] == 'BF16'
                              else np.dtype(_NP_DTYPES[t['dtype']])).reshape(t['shape'])
          for name, t in safetensors.deserialize(path.read_bytes())}


def load_hf_t5(checkpoint_dir) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Reads a `save_pretrained` T5.1.1 directory: (config.json as a dict, tensors by HF name)."""
  root = pathlib.Path(checkpoint_dir)
  if not root.is_dir():
    raise CheckpointError(f'checkpoint directory {root} does not exist')
  if not (root / CONFIG_FILE).is_file():
    raise CheckpointError(f'no {CONFIG_FILE} in {root}')
  hf_config = json.loads((root / CONFIG_FILE).read_text())
  check_hf_architecture(hf_config, source=str(root / CONFIG_FILE))
  if (root / WEIGHTS_FILE).is_file():
    return hf_config, _read_safetensors(root / WEIGHTS_FILE)
  if not (root / INDEX_FILE).is_file():
    others = sorted(p.name for p in root.glob('*.bin')) + sorted(p.name for p in root.glob('*.h5'))
    hint = f' (found {", ".join(others)}: re-save it with safe_serialization=True)' if others else ''
    raise CheckpointError(f'no {WEIGHTS_FILE} or {INDEX_FILE} in {root}{hint}')
  weight_map = json.loads((root / INDEX_FILE).read_text()).get('weight_map', {})
  tensors = {}
  for shard in sorted(set(weight_map.values())):
    tensors.update(_read_safetensors(root / shard))
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise ConversionError(f'{root / INDEX_FILE} lists tensors its shards lack: {missing[:5]}')
  return hf_config, tensors


# ---------------------------------------------------------------- configs


def _stack(size: StackSize) -> ml_collections.ConfigDict:
  name = next((n for n, s in SIZES.items() if s == size), 'custom')
  stack = ml_collections.ConfigDict(dict(size=name, **size._asdict()))
  stack.num_kv_heads = size.num_heads
  stack.position_bias_init_std = 1.0  # unused: the checkpoint's trained bias is loaded
  stack.mimetic_qk = stack.mimetic_vo = 0.0  # unused: the trained attention weights are loaded
  return stack


def fid_config_from_hf(hf_config: dict[str, Any]) -> ml_collections.ConfigDict:
  """The FiD config.model of a T5.1.1 checkpoint (K=1, MHA, symmetric widths, FiD-Light off)."""
  check_hf_architecture(hf_config)
  absent = [k for k in StackSize._fields + ('vocab_size',) if k not in hf_config]
  if absent:
    raise ConversionError(f'config.json lacks {absent}')
  enc = StackSize(*(hf_config[k] for k in StackSize._fields))
  dec = enc._replace(num_layers=hf_config.get('num_decoder_layers') or enc.num_layers)
  config = model_config('tiny', vocab_size=hf_config['vocab_size'],
                        dropout_rate=float(hf_config.get('dropout_rate', 0.1)))
  config.encoder = _stack(enc)
  config.decoder = _stack(dec)
  config.decoder.cross_num_kv_heads = dec.num_heads
  config.decoder.cross_attention_period = 1
  config.layer_norm_epsilon = float(hf_config.get('layer_norm_epsilon', 1e-6))
  config.relative_attention_num_buckets = hf_config.get('relative_attention_num_buckets', 32)
  config.relative_attention_max_distance = hf_config.get('relative_attention_max_distance', 128)
  validate_model_config(config)
  return config


def _check_fid(config: ml_collections.ConfigDict) -> None:
  """HF T5 has one width for both stacks, MHA everywhere and cross-attention in every decoder layer."""
  validate_model_config(config)
  enc, dec = config.encoder, config.decoder
  problems = [f'decoder.{f}={dec[f]} != encoder.{f}={enc[f]}'
              for f in ('d_model', 'd_ff', 'num_heads', 'd_kv') if enc[f] != dec[f]]
  problems += [f'{n}={v} != num_heads' for n, v in [('encoder.num_kv_heads', enc.num_kv_heads),
               ('decoder.num_kv_heads', dec.num_kv_heads),
               ('decoder.cross_num_kv_heads', dec.cross_num_kv_heads)] if v != enc.num_heads]
  if dec.cross_attention_period != 1:
    problems.append(f'decoder.cross_attention_period={dec.cross_attention_period} != 1')
  if problems:
    raise ConversionError('HF T5 conversion supports FiD configs only (symmetric widths, MHA, '
                          f'cross-attention in every layer; FiDO conversion is issue #6): '
                          f'config.model.{"; config.model.".join(problems)}')


def hf_config_from_fid(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.json contents of the T5.1.1 model equivalent to a FiD config.model."""
  _check_fid(config)
  enc = config.encoder
  return dict(
      architectures=['T5ForConditionalGeneration'], model_type='t5', is_encoder_decoder=True,
      d_model=enc.d_model, d_ff=enc.d_ff, num_heads=enc.num_heads, d_kv=enc.d_kv,
      num_layers=enc.num_layers, num_decoder_layers=config.decoder.num_layers,
      vocab_size=config.vocab_size, feed_forward_proj='gated-gelu', tie_word_embeddings=False,
      dropout_rate=config.dropout_rate, layer_norm_epsilon=config.layer_norm_epsilon,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


# ---------------------------------------------------------------- the tensor map


class TensorSpec(NamedTuple):
  """One HF tensor and the Haiku parameter holding it.

  `shape` is ours, `hf_shape` HF's; transposed tensors are `ours = hf.T.reshape(shape)`, so both
  directions are a transpose plus a reshape that keeps the element count.
  """
  hf_name: str
  module: str
  param: str
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transposed: bool


# Per-layer templates: (HF name under the block, our module under the layer, parameter, role).
_ATTENTION = (('layer_norm.weight', '{n}_norm', 'scale', 'norm'), ('{A}.q.weight', '{n}', 'query', 'q'),
              ('{A}.k.weight', '{n}', 'key', 'kv'), ('{A}.v.weight', '{n}', 'value', 'kv'),
              ('{A}.o.weight', '{n}', 'output', 'o'))
_MLP = (('layer_norm.weight', 'mlp_norm', 'scale', 'norm'),
        ('DenseReluDense.wi_0.weight', 'mlp', 'wi_0', 'wi'),
        ('DenseReluDense.wi_1.weight', 'mlp', 'wi_1', 'wi'),
        ('DenseReluDense.wo.weight', 'mlp', 'wo', 'wo'))


def _attention(template, hf_attention, module):
  hf_suffix, our_module, param, role = template
  return hf_suffix.format(A=hf_attention), our_module.format(n=module), param, role


def _role_shapes(role, stack, kv_heads, d_in):
  """(HF shape, our shape) of one layer tensor; `d_in` is the width k/v project from."""
  d, f, h, e = stack.d_model, stack.d_ff, stack.num_heads, stack.d_kv
  if role == 'kv':
    return (kv_heads * e, d_in), kv_shape(d_in, kv_heads, e)
  return {'norm': ((d,), (d,)), 'q': ((h * e, d), (d, h, e)), 'o': ((d, h * e), (h, e, d)),
          'wi': ((f, d), (d, f)), 'wo': ((d, f), (f, d))}[role]


def tensor_map(config: ml_collections.ConfigDict) -> list[TensorSpec]:
  """Every HF T5 tensor of the model `config` describes, paired with its Haiku parameter."""
  specs = []

  def add(hf_name, module, param, hf_shape, shape, transposed):
    specs.append(TensorSpec(hf_name, module, param, tuple(hf_shape), tuple(shape), transposed))

  enc, dec, vocab = config.encoder, config.decoder, config.vocab_size
  if enc.d_model == dec.d_model:
    add('shared.weight', 'shared_embedding', 'embeddings', (vocab, enc.d_model), (vocab, enc.d_model), False)
  else:  # asymmetric (issue #6): HF T5 cannot hold this, the names are for completeness
    add('encoder.embed_tokens.weight', 'encoder_embedding', 'embeddings', (vocab, enc.d_model),
        (vocab, enc.d_model), False)
    add('decoder.embed_tokens.weight', 'decoder_embedding', 'embeddings', (vocab, dec.d_model),
        (vocab, dec.d_model), False)
  cross = set(cross_attention_layers(dec))
  for stack_name, stack in (('encoder', enc), ('decoder', dec)):
    buckets = (config.relative_attention_num_buckets, stack.num_heads)
    add(f'{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
        f'{stack_name}/~/relative_position_bias', 'embeddings', buckets, buckets, False)
    for i in range(stack.num_layers):
      # (HF sub-layer, template, kv heads, kv input width); the decoder's MLP is sub-layer 2 in HF
      # whether or not the layer cross-attends (HF T5 layers always do).
      rows = [(0, _attention(t, 'SelfAttention', 'self_attention'), stack.num_kv_heads, stack.d_model)
              for t in _ATTENTION]
      if stack_name == 'decoder' and i in cross:
        rows += [(1, _attention(t, 'EncDecAttention', 'cross_attention'), dec.cross_num_kv_heads,
                  enc.d_model) for t in _ATTENTION]
      rows += [(1 if stack_name == 'encoder' else 2, t, None, None) for t in _MLP]
      for sub, (hf_suffix, module, param, role), kv_heads, d_in in rows:
        hf_shape, shape = _role_shapes(role, stack, kv_heads, d_in)
        add(f'{stack_name}.block.{i}.layer.{sub}.{hf_suffix}',
            f'{stack_name}/~/layer_{i:02d}/~/{module}', param, hf_shape, shape, role != 'norm')
    add(f'{stack_name}.final_layer_norm.weight', f'{stack_name}/~/final_norm', 'scale',
        (stack.d_model,), (stack.d_model,), False)
  add('lm_head.weight', 'output_projection', 'w', (vocab, dec.d_model), (dec.d_model, vocab), True)
  return specs


# ---------------------------------------------------------------- conversion


def hf_to_params(hf_config: dict[str, Any], tensors: dict[str, np.ndarray],
                 config: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
  """Haiku params (float32 numpy) of `config` from HF T5 tensors; any mismatch or leftover is an error."""
  check_hf_architecture(hf_config)
  _check_fid(config)
  for field, default in (('layer_norm_epsilon', 1e-6), ('relative_attention_max_distance', 128)):
    if not math.isclose(hf_config.get(field, default), config[field]):
      raise ConversionError(f'checkpoint {field}={hf_config.get(field, default)} but config.model.'
                            f'{field}={config[field]}')
  tensors = dict(tensors)
  if 'lm_head.weight' not in tensors and 'shared.weight' in tensors:
    # transformers>=5 ties lm_head to shared and omits it; unscaled (checked above), so it is a copy.
    tensors['lm_head.weight'] = tensors['shared.weight']
  shared = tensors.get('shared.weight')
  for name in _TIED_INPUTS:  # older checkpoints store the tied input embeddings too
    if name in tensors and shared is not None and np.array_equal(tensors[name], shared):
      del tensors[name]
  params: dict[str, dict[str, np.ndarray]] = {}
  specs = tensor_map(config)
  missing = [s for s in specs if s.hf_name not in tensors]
  if missing:
    raise ConversionError(f'checkpoint lacks {len(missing)} tensors the model config needs, e.g. '
                          f'{missing[0].hf_name} (expected shape {missing[0].hf_shape}); check '
                          'num_layers/num_decoder_layers against config.model.{encoder,decoder}.num_layers')
  for spec in specs:
    w = tensors.pop(spec.hf_name)
    if tuple(w.shape) != spec.hf_shape:
      raise ConversionError(f'HF tensor {spec.hf_name} has shape {tuple(w.shape)}, expected '
                            f'{spec.hf_shape} for {spec.module}/{spec.param} {spec.shape}')
    w = np.asarray(w, np.float32)
    params.setdefault(spec.module, {})[spec.param] = np.ascontiguousarray(
        w.T.reshape(spec.shape) if spec.transposed else w)
  leftover = sorted(set(tensors) - _IGNORED)
  if leftover:
    raise ConversionError(f'checkpoint has {len(leftover)} tensors the model config has no place for: '
                          f'{leftover[:5]}; check the layer counts and that the embeddings are tied')
  return params


def params_to_hf(params, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """HF T5 tensors (float32, by HF name) of a FiD model's params; every param must be used exactly once."""
  _check_fid(config)
  specs = tensor_map(config)
  expected = {(s.module, s.param) for s in specs}
  present = {(m, p) for m, leaves in params.items() for p in leaves}
  if expected != present:
    raise ConversionError(f'params do not match config.model: missing {sorted(expected - present)[:5]}, '
                          f'unexpected {sorted(present - expected)[:5]}')
  tensors = {}
  for spec in specs:
    w = np.asarray(params[spec.module][spec.param], np.float32)
    if tuple(w.shape) != spec.shape:
      raise ConversionError(f'param {spec.module}/{spec.param} has shape {tuple(w.shape)}, expected '
                            f'{spec.shape} for HF tensor {spec.hf_name} {spec.hf_shape}')
    tensors[spec.hf_name] = np.ascontiguousarray(
        w.reshape(spec.hf_shape[::-1]).T if spec.transposed else w)
  return tensors


def save_hf_t5(params, config: ml_collections.ConfigDict, out_dir) -> pathlib.Path:
  """Writes config.json + model.safetensors that `T5ForConditionalGeneration.from_pretrained` loads."""
  hf_config = hf_config_from_fid(config)
  tensors = params_to_hf(params, config)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + '\n')
  save_file(tensors, str(out / WEIGHTS_FILE), metadata={'format': 'pt'})
  return out
