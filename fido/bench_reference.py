"""Reference timings: the same FiD workload through Hugging Face transformers' T5 (PyTorch, CPU) or
CTranslate2 (`config.bench.reference='hf'` or `'ct2'`).

Bench-only dependencies (requirements-test.txt); fido never imports torch, transformers or
ctranslate2 at run time. The reference is FiD with the config's encoder size for both stacks
(neither has multi-query attention, layer-sparse cross-attention or asymmetric widths): the
baseline FiDO is measured against.

HFReference follows `fido.bench`: encoder = `model.encoder` on [B*P, L]; decoder = `generate` from
the fused encoder states, exactly `target_len` greedy steps with the KV cache.

CT2Reference serves `fido.bench_step` (decode steps): fido FiD parameters -> a Hugging Face T5
checkpoint (`fido.convert.save_hf_t5`) -> CTranslate2's own T5 converter -> a model directory,
loaded in float32 and in int8 (CTranslate2 quantises the weights at load time). Its Translator takes
source tokens, not encoder states, and needs an encoder: the checkpoint keeps one encoder layer (of
the given parameters), so that CTranslate2's encoder over the fused P * L tokens costs little and
cancels from the decode step, and its output -- `encoder_output`, computed by transformers -- is
the encoder output that fido's decoder can be given to decode the same tokens.
"""

import os
import pathlib
import tempfile
from typing import Any

import ml_collections
import numpy as np

from fido import convert


def hf_t5_config(model: ml_collections.ConfigDict):
  import transformers  # pylint: disable=g-import-not-at-top  (optional: bench-only reference)
  enc = model.encoder
  return transformers.T5Config(
      vocab_size=model.vocab_size, d_model=enc.d_model, d_ff=enc.d_ff, d_kv=enc.d_kv,
      num_heads=enc.num_heads, num_layers=enc.num_layers, num_decoder_layers=enc.num_layers,
      feed_forward_proj='gated-gelu', tie_word_embeddings=False, dropout_rate=0.0,
      relative_attention_num_buckets=model.relative_attention_num_buckets,
      relative_attention_max_distance=model.relative_attention_max_distance,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


class HFReference:
  """transformers' T5 FiD (random weights) as zero-argument calls for `fido.bench.run_bench`."""

  def __init__(self, config: ml_collections.ConfigDict):
    try:
      import torch  # pylint: disable=g-import-not-at-top  (optional: requirements-test.txt)
      import transformers  # pylint: disable=g-import-not-at-top  (optional, as torch)
    except ImportError as e:
      raise RuntimeError('config.bench.reference="hf" needs torch and transformers: '
                         'pip install -r requirements-test.txt') from e
    self.torch, self.transformers, self.config = torch, transformers, config
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[config.model.dtype]
    torch.manual_seed(config.bench.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    self.model = transformers.T5ForConditionalGeneration(
        hf_t5_config(config.model)).to(dtype).eval()

  def calls(self, batch: int, rng: np.random.Generator):
    """(encode, decode) on one random batch: encoder on [B*P, L]; `generate` from the fused states."""
    torch, bench, model = self.torch, self.config.bench, self.model
    shape = (batch * bench.n_passages, bench.passage_len)
    ids = torch.from_numpy(rng.integers(3, self.config.model.vocab_size, size=shape)).long()
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def encode():
      return model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state

    outputs = self.transformers.modeling_outputs.BaseModelOutput(
        last_hidden_state=encode().reshape(batch, bench.n_passages * bench.passage_len, -1))
    fused_mask = mask.reshape(batch, -1)

    @torch.inference_mode()
    def decode():
      return model.generate(
          encoder_outputs=outputs, attention_mask=fused_mask, max_new_tokens=bench.target_len,
          min_new_tokens=bench.target_len, do_sample=False, num_beams=1, use_cache=True)

    assert decode().shape[1] == bench.target_len + 1  # the start token plus target_len steps
    return encode, decode

  def result(self, batch: int, timings: dict[str, Any]) -> dict[str, Any]:
    bench = self.config.bench
    return dict(
        name=f'hf-transformers-t5-{self.config.model.encoder.size}', batch=batch,
        n_passages=bench.n_passages, passage_len=bench.passage_len, target_len=bench.target_len,
        **timings, repeats=bench.repeats, dtype=self.config.model.dtype, device='cpu (torch)',
        torch=self.torch.__version__, transformers=self.transformers.__version__,
        threads=self.torch.get_num_threads())


def fid_twin(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`model` itself if it is a FiD (what Hugging Face T5 can hold), else the FiD of its encoder size."""
  try:
    convert.hf_config_from_fid(model)
    return model
  except convert.ConversionError:
    fid = ml_collections.ConfigDict(model.to_dict())
    fid.encoder.num_kv_heads = fid.encoder.num_heads
    fid.decoder.update({k: v for k, v in fid.encoder.items()})
    fid.decoder.update(cross_num_kv_heads=fid.decoder.num_heads, cross_attention_period=1)
    fid.update(fid_light_k=1, decoder_weights='float32')
    return fid


def one_encoder_layer(params, model: ml_collections.ConfigDict):
  """(params, config.model) of the same FiD with only its first encoder layer."""
  one = ml_collections.ConfigDict(model.to_dict())
  one.encoder.update(size='custom', num_layers=1)
  kept = {m: leaves for m, leaves in params.items()
          if not m.startswith('encoder/~/layer_') or m.startswith('encoder/~/layer_00/')}
  return kept, one


class _Vocabulary:
  """The tokenizer interface CTranslate2's T5 converter reads: token i is '<pad>', '</s>', '<unk>'
  for ids 0-2 (T5's), else its decimal id."""
  pad_token, eos_token, unk_token = '<pad>', '</s>', '<unk>'

  def __init__(self, vocab_size: int):
    self.tokens = ['<pad>', '</s>', '<unk>'] + [str(i) for i in range(3, vocab_size)]

  def get_vocab(self) -> dict[str, int]:
    return {token: i for i, token in enumerate(self.tokens)}

  def convert_ids_to_tokens(self, i: int) -> str:
    return self.tokens[i]


class CT2Reference:
  """CTranslate2's T5 from fido FiD parameters (see the module docstring), float32 and int8."""

  COMPUTE_TYPES = ('float32', 'int8')

  def __init__(self, params, model: ml_collections.ConfigDict):
    try:
      import ctranslate2  # pylint: disable=g-import-not-at-top  (optional: requirements-test.txt)
      from ctranslate2.converters import transformers as ct2_transformers  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top  (optional, as ctranslate2)
      import transformers  # pylint: disable=g-import-not-at-top  (optional, as ctranslate2)
    except ImportError as e:
      raise RuntimeError('config.bench.reference="ct2" needs ctranslate2, torch and transformers: '
                         'pip install -r requirements-test.txt') from e
    self.ctranslate2, self.torch = ctranslate2, torch
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    params, model = one_encoder_layer(params, model)
    self.vocabulary = _Vocabulary(model.vocab_size)
    self.ids = self.vocabulary.get_vocab()
    with tempfile.TemporaryDirectory() as tmp:
      hf_dir = convert.save_hf_t5(params, model, pathlib.Path(tmp) / 'hf')
      self.hf_model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
      spec = ct2_transformers.T5Loader()(self.hf_model, self.vocabulary)
      spec.validate()
      spec.optimize()
      ct2_dir = pathlib.Path(tmp) / 'ct2'
      ct2_dir.mkdir()
      spec.save(str(ct2_dir))
      self.translators = {ct: ctranslate2.Translator(str(ct2_dir), device='cpu', compute_type=ct,
                                                     inter_threads=1,
                                                     intra_threads=os.cpu_count() or 1)
                          for ct in self.COMPUTE_TYPES}

  def encoder_output(self, ids_BxS: np.ndarray) -> np.ndarray:
    """The (one-layer) encoder's output [B, S, D] float32 that CTranslate2 decodes from."""
    with self.torch.inference_mode():
      return self.hf_model.encoder(input_ids=self.torch.from_numpy(np.asarray(ids_BxS))
                                   ).last_hidden_state.numpy()

  def decode(self, ids_BxS: np.ndarray, steps: int, compute_type: str) -> np.ndarray:
    """Exactly `steps` greedy tokens per row (int [B, steps]), encoding `ids_BxS` first."""
    source = [[self.vocabulary.tokens[i] for i in row] for row in np.asarray(ids_BxS)]
    results = self.translators[compute_type].translate_batch(
        source, beam_size=1, max_input_length=0, max_decoding_length=steps,
        min_decoding_length=steps)
    return np.array([[self.ids[t] for t in r.hypotheses[0]] for r in results])

  def version(self) -> str:
    return self.ctranslate2.__version__
