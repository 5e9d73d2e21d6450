"""FiDO from public T5.1.1 checkpoints (issue #6): one or two Hugging Face checkpoint directories ->
an orbax checkpoint of a FiDO config.model, plus a JSON report of what happened to every tensor.

  convert_to_fido(encoder_dir, decoder_dir, config.model) -> (params, report)
  write_fido_checkpoint(params, config.model, out_dir, report, config=config)
                            out_dir/checkpoints (step 0, params only, `config` saved with them) +
                            out_dir/conversion_report.json; fine-tune or uptrain from it with
                            config.init.checkpoint=out_dir, config.init.carry_second_moments=False
  `run.py --mode=convert` (config.convert + config.model) is fido/convert_checkpoint.py.

Each checkpoint is first imported as the FiD model it is (fido.convert: every tensor checked and
consumed); the target's parameters, walked with the same `tensor_map`, are then filled from it:

  multi-query / grouped-query  key/value heads are mean-pooled over each group of H/K adjacent heads,
      the group whose query heads share them in fido.model.attention (query head h -> kv head
      h // (H/K)). GQA (Ainslie et al., 2023, §2.1, and its conversion ablation): mean-pooling beats
      keeping the first head of each group or random init. Any stack: decoder self/cross, encoder.
      The layout and the pooling are fido.model.kv_heads' (here with float64 accumulation).
  layer-sparse cross-attention  decoder layer i (1-based) keeps its cross-attention iff i % K == 0
      (FiDO §3.1); the other layers' cross-attention and pre-cross-attention norms are dropped.
  asymmetric  encoder stack from encoder_dir, decoder stack and output layer from decoder_dir
      (FiDO §3.3). At different widths each stack keeps its own checkpoint's `shared.weight` as its
      embedding; at equal widths the model ties one table, taken from `shared_embedding`'s checkpoint.
      When the widths differ the decoder checkpoint's cross-attention key/value projections read a
      d_dec-wide encoder and cannot read the d_enc-wide one: they are newly initialised
      (`cross_kv_init`):
    'aligned' (default) fit, by ridge least squares, the linear map A [d_enc, d_dec] that best predicts
        the decoder checkpoint's own encoder output from the new encoder's output on the same tokens,
        and set W_new = A @ pool(W_dec). Then enc_new(x) @ W_new is the least-squares estimate of
        enc_dec(x) @ W_dec: the keys and values the pre-trained decoder learnt to read, as far as a
        linear map can recover them, instead of noise its pre-trained queries cannot match. It costs one
        forward pass of both encoders over a small token sample (config.convert.alignment); the fit's
        R^2 goes into the report.
    'random' T5's init, N(0, d_enc**-0.5), the scale fido.model.attention uses (unit-variance keys and
        values for unit-RMS encoder outputs); data-free, but the decoder must learn them anew.
The report lists every tensor of both checkpoints (copied, pooled, projected, dropped: each with its
destination or reason) and every fido parameter (copied, pooled, initialized: each with its source).
"""

import json
import logging
import os
import pathlib
import re
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fido import checkpoint as checkpoint_lib
from fido.config import StackSize, cross_attention_layers, validate_model_config
from fido.convert import (_IGNORED, _TIED_INPUTS, ConversionError, TensorSpec, fid_config_from_hf,
                          hf_to_params, load_hf_t5, tensor_map)
from fido.errors import OutputExistsError
from fido.model import kv_heads
from fido.model.fid import make_model

_LOG = logging.getLogger(__name__)
REPORT_FILE = 'conversion_report.json'
CROSS_KV_INITS = ('aligned', 'random')


# ---------------------------------------------------------------------------- checkpoints


class _Source(NamedTuple):
  """One HF checkpoint imported as the FiD model it is."""
  directory: str
  hf_config: dict[str, Any]
  config: ml_collections.ConfigDict           # its FiD config.model
  params: dict[str, dict[str, np.ndarray]]    # its FiD params
  file_shapes: dict[str, tuple[int, ...]]     # every tensor in its files, by HF name
  by_hf: dict[str, TensorSpec]                # its tensor map, by HF name


def _load(directory) -> _Source:
  hf_config, tensors = load_hf_t5(directory)
  config = fid_config_from_hf(hf_config)
  params = hf_to_params(hf_config, tensors, config)
  shapes = {name: tuple(t.shape) for name, t in tensors.items()}
  return _Source(str(directory), hf_config, config, params, shapes,
                 {s.hf_name: s for s in tensor_map(config)})


def _check_sources(target, enc: _Source, dec: _Source) -> None:
  """Sizes requested in config.model must be the checkpoints' own; shared settings must agree."""
  problems = []
  for stack, src in (('encoder', enc), ('decoder', dec)):
    for field in StackSize._fields:
      if target[stack][field] != src.config[stack][field]:
        problems.append(f'config.model.{stack}.{field}={target[stack][field]} but {src.directory} '
                        f'has {stack} {field}={src.config[stack][field]}')
  for field in ('vocab_size', 'layer_norm_epsilon', 'relative_attention_num_buckets',
                'relative_attention_max_distance'):
    if enc.config[field] != dec.config[field]:
      problems.append(f'the checkpoints differ in {field}: {enc.config[field]} ({enc.directory}) vs '
                      f'{dec.config[field]} ({dec.directory})')
    elif target[field] != enc.config[field]:
      problems.append(f'config.model.{field}={target[field]} but the checkpoint has {enc.config[field]}')
  if problems:
    raise ConversionError('the requested model does not match the checkpoint(s); set config.model to '
                          'their sizes (kv heads, cross_attention_period and the decoder/encoder '
                          'pairing are what conversion changes): ' + '; '.join(problems))


# ---------------------------------------------------------------------------- transforms


def _pool(w_DxHxE: np.ndarray, num_kv_heads: int) -> np.ndarray:
  """fido.model.kv_heads.pool_heads of a checkpoint tensor: float64 accumulation, float32 out."""
  return kv_heads.pool_heads(w_DxHxE, num_kv_heads, accumulate_dtype=np.float64, dtype=np.float32)


def _encoder_outputs(src: _Source, ids_NxL: np.ndarray, mask_NxL: np.ndarray, batch_size: int):
  """Yields the source checkpoint's encoder outputs at the unmasked positions, [n, D] float64."""
  config = ml_collections.ConfigDict(src.config.to_dict())
  config.update(dtype='float32', dropout_rate=0.0, fid_light_k=1)
  encode = jax.jit(make_model(config).encode)
  params = {m: jax.tree.map(jnp.asarray, leaves) for m, leaves in src.params.items()
            if m.startswith('encoder') or m == 'shared_embedding'}  # all that encode reads
  for start in range(0, len(ids_NxL), batch_size):
    ids, mask = ids_NxL[start:start + batch_size], mask_NxL[start:start + batch_size]
    enc, _ = encode(params, jnp.asarray(ids[:, None], jnp.int32), jnp.asarray(mask[:, None]))
    yield np.asarray(enc, np.float64)[mask.astype(bool)]


def fit_alignment(enc: _Source, dec: _Source, ids_NxL: np.ndarray, mask_NxL: np.ndarray, *,
                  ridge: float = 1e-3, batch_size: int = 16) -> tuple[np.ndarray, dict[str, Any]]:
  """A [d_enc, d_dec] = argmin ||X_e A - X_d||^2 + lam ||A||^2 over both encoders' outputs on the
  same tokens (lam = ridge x mean eigenvalue of X_e^T X_e); returns (A float32, fit statistics)."""
  gram = cross = None
  sum_d = sq_d = 0.0
  rows = 0
  for x_e, x_d in zip(_encoder_outputs(enc, ids_NxL, mask_NxL, batch_size),
                      _encoder_outputs(dec, ids_NxL, mask_NxL, batch_size)):
    gram = x_e.T @ x_e if gram is None else gram + x_e.T @ x_e
    cross = x_e.T @ x_d if cross is None else cross + x_e.T @ x_d
    sum_d = sum_d + x_d.sum(0)
    sq_d = sq_d + float(np.sum(x_d * x_d))
    rows += len(x_e)
  if not rows:
    raise ConversionError('the alignment sample has no unmasked tokens')
  lam = ridge * np.trace(gram) / len(gram)
  a = np.linalg.solve(gram + lam * np.eye(len(gram)), cross)
  # ||X_e A - X_d||^2 from the sufficient statistics.
  residual = float(np.sum(a * (gram @ a)) - 2 * np.sum(a * cross) + sq_d)
  total = sq_d - float(np.sum(sum_d * sum_d)) / rows
  stats = dict(tokens=rows, d_enc=int(gram.shape[0]), d_dec=int(cross.shape[1]), ridge=ridge,
               r2=round(1.0 - residual / total, 6))
  if rows < 4 * gram.shape[0]:
    stats['warning'] = (f'only {rows} tokens for a {gram.shape[0]}-dimensional fit; raise '
                        'config.convert.alignment.num_sequences/length')
  return a.astype(np.float32), stats


def random_alignment_ids(vocab_size: int, num_sequences: int, length: int, seed: int = 0):
  """Token ids drawn uniformly from [2, vocab_size) (no pad/EOS), all unmasked."""
  ids = np.random.default_rng(seed).integers(2, vocab_size, size=(num_sequences, length))
  return ids.astype(np.int32), np.ones((num_sequences, length), bool)


def corpus_alignment_ids(documents, tokenizer, num_sequences: int, length: int, seed: int = 0):
  """Consecutive `length`-token windows of the shuffled documents (EOS between them)."""
  order = np.random.default_rng(seed).permutation(len(documents))
  stream, needed = [], num_sequences * length
  for i in order:
    stream += tokenizer.encode(documents[i]) + [tokenizer.eos_id]
    if len(stream) >= needed:
      break
  n = max(1, min(num_sequences, len(stream) // length))
  ids = np.zeros((n, length), np.int32)
  flat = np.asarray(stream[:n * length], np.int32)
  ids.reshape(-1)[:len(flat)] = flat
  return ids, ids != 0


# ---------------------------------------------------------------------------- conversion


def _source_of(hf_name: str, enc: _Source, dec: _Source, shared_from: str) -> tuple[_Source, str]:
  """The checkpoint and HF tensor that fill the target's tensor `hf_name` (tensor_map naming)."""
  if hf_name == 'shared.weight':
    return (enc if shared_from == 'encoder' else dec), 'shared.weight'
  if hf_name == 'encoder.embed_tokens.weight':  # asymmetric: each stack its own checkpoint's table
    return enc, 'shared.weight'
  if hf_name == 'decoder.embed_tokens.weight':
    return dec, 'shared.weight'
  return (enc if hf_name.startswith('encoder.') else dec), hf_name


def _file_name(src: _Source, hf_name: str) -> str:
  """lm_head.weight is absent from transformers>=5 files: it is then `shared.weight` (unscaled)."""
  return hf_name if hf_name in src.file_shapes else 'shared.weight'


def convert_to_fido(encoder_dir, decoder_dir, config: ml_collections.ConfigDict, *,
                    shared_embedding: str = 'encoder', cross_kv_init: str = 'aligned',
                    alignment_ids: np.ndarray | None = None, alignment_mask: np.ndarray | None = None,
                    ridge: float = 1e-3, batch_size: int = 16, seed: int = 0
                    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
  """Params (float32 numpy) of the FiDO model `config` (config.model) and the conversion report.

  `decoder_dir=None` takes both stacks from `encoder_dir`. `alignment_ids`/`alignment_mask` [N, L]:
  the token sample of the 'aligned' cross K/V init (default: 256 x 64 random ids).
  """
  validate_model_config(config)
  if cross_kv_init not in CROSS_KV_INITS:
    raise ConversionError(f'cross_kv_init={cross_kv_init!r}; expected one of {CROSS_KV_INITS}')
  if shared_embedding not in ('encoder', 'decoder'):
    raise ConversionError(f"shared_embedding={shared_embedding!r}; expected 'encoder' or 'decoder'")
  enc = _load(encoder_dir)
  two = decoder_dir is not None and os.path.abspath(decoder_dir) != os.path.abspath(encoder_dir)
  dec = _load(decoder_dir) if two else enc
  _check_sources(config, enc, dec)
  d_enc, d_dec = config.encoder.d_model, config.decoder.d_model
  cross_layers = cross_attention_layers(config.decoder)
  notes = []
  period = config.decoder.cross_attention_period
  if config.decoder.num_layers % period:
    notes.append(f'decoder.num_layers={config.decoder.num_layers} is not a multiple of '
                 f'cross_attention_period={period}: the last {config.decoder.num_layers % period} '
                 'layers never cross-attend')
  if two and d_enc == d_dec:
    notes.append('encoder and decoder come from different checkpoints of equal width: the decoder\'s '
                 'cross-attention key/value projections are copied, but were trained on another '
                 f'encoder\'s output space; the tied embedding is the {shared_embedding} checkpoint\'s')

  alignment = init_info = None
  if d_enc != d_dec:
    if cross_kv_init == 'aligned':
      if alignment_ids is None:
        alignment_ids, alignment_mask = random_alignment_ids(config.vocab_size, 256, 64, seed)
      if alignment_mask is None:
        alignment_mask = alignment_ids != 0
      alignment, stats = fit_alignment(enc, dec, np.asarray(alignment_ids), np.asarray(alignment_mask),
                                       ridge=ridge, batch_size=batch_size)
      init_info = dict(method='aligned', fit=stats, why=(
          'W_new = A @ pool(W_dec), A the ridge least-squares map from this encoder\'s output to the '
          'decoder checkpoint\'s own encoder output on the same tokens: the new keys/values estimate '
          'those the pre-trained decoder was trained to read'))
    else:
      init_info = dict(method='random', std=d_enc**-0.5, seed=seed, why=(
          'T5 init N(0, d_enc**-0.5), as fido.model.attention: unit-variance keys/values for '
          'unit-RMS encoder outputs; data-free, learnt anew in uptraining'))
    notes.append(f'encoder width {d_enc} != decoder width {d_dec}: the decoder checkpoint\'s '
                 f'cross-attention key/value projections (input width {d_dec}) cannot read the '
                 f'encoder; newly initialised ({init_info["method"]})')
  rng = np.random.default_rng(seed)

  params: dict[str, dict[str, np.ndarray]] = {}
  param_rows, uses = [], {}  # uses: (source dir, file tensor) -> [(param, action)]
  for spec in tensor_map(config):
    src, hf_name = _source_of(spec.hf_name, enc, dec, shared_embedding)
    src_spec = src.by_hf[hf_name]
    w = src.params[src_spec.module][src_spec.param]
    origin = f'{src.directory}:{_file_name(src, hf_name)}'
    is_kv = spec.param in kv_heads.KV_PARAMS
    k = kv_heads.num_kv_heads_of(spec.shape) if is_kv else None
    new_cross_kv = is_kv and 'cross_attention' in spec.module and w.shape[0] != spec.shape[0]
    row = dict(name=f'{spec.module}/{spec.param}', shape=list(spec.shape))
    if new_cross_kv and alignment is not None:
      value = np.einsum('ab,b...->a...', alignment, _pool(w, k)).astype(np.float32)
      action, hf_action = 'initialized', 'projected'
      row.update(init='aligned', source=[origin])
    elif new_cross_kv:
      value = rng.normal(0.0, d_enc**-0.5, spec.shape).astype(np.float32)
      action, hf_action = 'initialized', None
      row.update(init='random', std=d_enc**-0.5, source=[])
    elif is_kv and k != w.shape[1]:
      value = _pool(w, k)
      action = hf_action = 'pooled'
      row.update(source=[origin], heads=f'{w.shape[1]} -> {k} (mean of groups of '
                 f'{w.shape[1] // k} adjacent heads)')
    else:
      if tuple(w.shape) != spec.shape:  # unreachable after _check_sources; kept as a guard
        raise ConversionError(f'{origin} has shape {w.shape}, expected {spec.shape} for {row["name"]}')
      value, action, hf_action = w, 'copied', 'copied'
      row.update(source=[origin])
    row['action'] = action
    params.setdefault(spec.module, {})[spec.param] = np.ascontiguousarray(value, np.float32)
    param_rows.append(row)
    if hf_action:
      uses.setdefault((src.directory, _file_name(src, hf_name)), []).append((row['name'], hf_action))

  hf_rows = []
  sources = [('encoder', enc), ('decoder', dec)] if two else [('encoder+decoder', enc)]
  for role, src in sources:
    for name, shape in sorted(src.file_shapes.items()):
      row = dict(checkpoint=role, name=name, shape=list(shape))
      used = uses.get((src.directory, name))
      if used:
        actions = sorted({a for _, a in used})
        row.update(action=actions[0] if len(actions) == 1 else '+'.join(actions),
                   to=[p for p, _ in used])
      else:
        row.update(action='dropped', why=_why_dropped(name, role, config, cross_layers, enc, dec,
                                                      two, shared_embedding, cross_kv_init))
      hf_rows.append(row)

  count = lambda rows: {a: sum(r['action'] == a for r in rows) for a in sorted({r['action'] for r in rows})}
  report = dict(
      format='fido-conversion-report/1',
      encoder_checkpoint=enc.directory, decoder_checkpoint=dec.directory,
      target=config.to_dict(),
      transforms=dict(
          kv_heads={f'{stack}.{field}': config[stack][field] for stack, field in (
              ('encoder', 'num_kv_heads'), ('decoder', 'num_kv_heads'),
              ('decoder', 'cross_num_kv_heads'))},
          kv_pooling='mean over each group of num_heads/kv_heads adjacent heads (GQA, Ainslie et '
                     'al. 2023)',
          cross_attention_period=period,
          cross_attention_layers=[i + 1 for i in cross_layers],
          dropped_cross_attention_layers=[i + 1 for i in range(config.decoder.num_layers)
                                          if i not in cross_layers],
          asymmetric=two, shared_embedding=(shared_embedding if two and d_enc == d_dec else None),
          cross_kv_init=init_info),
      counts=dict(hf_tensors=count(hf_rows), params=count(param_rows)),
      notes=notes, hf_tensors=hf_rows, params=param_rows)
  for note in notes:
    _LOG.warning('conversion: %s', note)
  return params, report


def _why_dropped(name, role, config, cross_layers, enc, dec, two, shared_embedding, cross_kv_init):
  """Why HF tensor `name` of checkpoint `role` has no place in the converted model."""
  if name in _IGNORED:
    return 'unused by HF T5 itself (cross-attention has no relative position bias)'
  if name in _TIED_INPUTS:
    return 'a copy of shared.weight (tied input embedding)'
  if two:
    stack = 'encoder' if name.startswith('encoder.') else 'decoder'
    if name == 'shared.weight':
      return (f'the stacks tie one embedding (equal widths), taken from the {shared_embedding} '
              'checkpoint (convert.shared_embedding)')
    if role != stack:
      other = dec if stack == 'decoder' else enc
      aligned = stack == 'encoder' and config.encoder.d_model != config.decoder.d_model
      return (f'the {stack} comes from {other.directory}'
              + (' (this encoder was run only to fit the cross-attention alignment)'
                 if aligned and cross_kv_init == 'aligned' else ''))
  match = re.match(r'decoder\.block\.(\d+)\.layer\.1\.', name)
  if match and int(match.group(1)) not in cross_layers:
    return (f'decoder layer {int(match.group(1)) + 1} has no cross-attention (layer-sparse, '
            f'cross_attention_period={config.decoder.cross_attention_period})')
  if match and re.search(r'EncDecAttention\.[kv]\.weight$', name):
    return (f'reads a {config.decoder.d_model}-wide encoder, the new one is '
            f'{config.encoder.d_model} wide: re-initialised ({cross_kv_init})')
  return 'not used by the target model'


# ---------------------------------------------------------------------------- checkpoint files


def write_fido_checkpoint(params, model_config: ml_collections.ConfigDict, out_dir,
                          report: dict[str, Any] | None = None, *,
                          config: ml_collections.ConfigDict, seed: int = 0,
                          overwrite: bool = False) -> pathlib.Path:
  """Writes out_dir/checkpoints (orbax step 0: params, no optimizer state) and the report.

  `config` is the experiment config saved with it (e.g. fido.experiment.default_config()), with
  `model_config` as its model; `config.init.checkpoint=out_dir` then starts training from it, with
  `config.init.carry_second_moments=False` (there are no second moments to carry).
  """
  validate_model_config(model_config)
  out = pathlib.Path(out_dir)
  ckpt_dir = out / 'checkpoints'
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    if not overwrite:
      raise OutputExistsError(f'{ckpt_dir} already holds a checkpoint; choose another out_dir or '
                              'set config.convert.overwrite=True')
    shutil.rmtree(ckpt_dir)
  saved = ml_collections.ConfigDict(config.to_dict())
  saved.model = ml_collections.ConfigDict(model_config.to_dict())
  saved.init.checkpoint = ''
  state = dict(params=params, opt_state=None, step=np.zeros([], np.int32),
               rng=np.asarray(jax.random.PRNGKey(seed)))
  with checkpoint_lib.Checkpointer(ckpt_dir, keep_last=1, async_save=False) as ckpt:
    ckpt.save(0, state, config=saved, force=True)
  if report is not None:
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + '\n')
  return out
