"""`run.py --mode=convert`: Hugging Face T5.1.1 checkpoint(s) -> an orbax checkpoint of config.model.

  python run.py --mode=convert --config=experiments/uptrain.py:convert,model=base-xl,root=R \
    --config.convert.encoder_checkpoint=/hf/t5-v1_1-base --config.convert.decoder_checkpoint=...

Reads `config.convert` (`default_config()` below), `config.model` (the target) and, for the
aligned cross-attention K/V init, `config.data`'s corpus and tokenizer; the conversion itself is
fido/convert_fido.py.
"""

import os
from typing import Any

import ml_collections

from fido.config import ConfigError
from fido.convert_fido import (REPORT_FILE, convert_to_fido, corpus_alignment_ids,
                               random_alignment_ids, write_fido_checkpoint)
from fido.data.sources import resolve_data
from fido.data.tokenizer import load_tokenizer
from fido.errors import MissingInputError


def default_config() -> ml_collections.ConfigDict:
  """The `config.convert` section (the target model is config.model)."""
  return ml_collections.ConfigDict(dict(
      encoder_checkpoint='',     # HF T5.1.1 directory (config.json + safetensors)
      decoder_checkpoint='',     # another one for the decoder and output layer; '' = the encoder's
      out_dir='',                # gets checkpoints/ (orbax, step 0) and conversion_report.json
      overwrite=False,           # replace an existing out_dir/checkpoints
      shared_embedding='encoder',  # equal widths, two checkpoints: whose shared.weight the stacks tie
      cross_kv_init='aligned',   # new cross-attention K/V when widths differ: one of CROSS_KV_INITS
      seed=0,                    # 'random' init, random alignment tokens, the checkpoint's rng
      alignment=dict(
          source='corpus',       # 'corpus' (config.data's corpus + tokenizer) | 'random' token ids
          num_sequences=256, length=64,  # token sample: num_sequences x length
          ridge=1e-3,            # lambda, relative to the mean eigenvalue of the Gram matrix
          batch_size=16),
  ))


def run_convert(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`run.py --mode=convert`: converts config.convert's checkpoint(s) to config.model; a summary."""
  if 'convert' not in config:
    raise ConfigError('the config has no convert section (fido.convert_checkpoint.default_config()); use '
                      'e.g. --config=experiments/uptrain.py:convert')
  c = config.convert
  if not c.encoder_checkpoint or not c.out_dir:
    raise ConfigError('set config.convert.encoder_checkpoint (an HF T5.1.1 directory) and '
                      'config.convert.out_dir')
  model = config.model
  ids = mask = None
  if (model.encoder.d_model != model.decoder.d_model and c.cross_kv_init == 'aligned'):
    a = c.alignment
    if a.source == 'corpus':
      data = resolve_data(config.data)
      if not data.corpus or not os.path.isfile(data.corpus):
        raise MissingInputError(f'config.data.corpus={data.corpus!r}: the aligned cross K/V init '
                                "needs a text corpus, or set config.convert.alignment.source='random'")
      tokenizer = load_tokenizer(data.tokenizer, model.vocab_size)
      with open(data.corpus, encoding='utf-8') as f:
        documents = [line.strip() for line in f if line.strip()]
      ids, mask = corpus_alignment_ids(documents, tokenizer, a.num_sequences, a.length, c.seed)
    elif a.source == 'random':
      ids, mask = random_alignment_ids(model.vocab_size, a.num_sequences, a.length, c.seed)
    else:
      raise ConfigError(f"config.convert.alignment.source={a.source!r}; expected 'corpus' or 'random'")
  params, report = convert_to_fido(
      c.encoder_checkpoint, c.decoder_checkpoint or None, model,
      shared_embedding=c.shared_embedding, cross_kv_init=c.cross_kv_init, alignment_ids=ids,
      alignment_mask=mask, ridge=c.alignment.ridge, batch_size=c.alignment.batch_size, seed=c.seed)
  out = write_fido_checkpoint(params, model, c.out_dir, report, config=config, seed=c.seed,
                              overwrite=c.overwrite)
  return dict(out_dir=str(out), report=str(out / REPORT_FILE), counts=report['counts'],
              cross_kv_init=report['transforms']['cross_kv_init'], notes=report['notes'])
