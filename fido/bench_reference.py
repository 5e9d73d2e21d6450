"""Reference timings: the same FiD workload through Hugging Face transformers' T5 (PyTorch, CPU).

A bench-only dependency (requirements-test.txt); fido never imports torch at run time. The reference
is FiD with the config's encoder size for both stacks (transformers' T5 has no multi-query attention,
layer-sparse cross-attention or asymmetric widths): the baseline FiDO is measured against.
Timing follows `fido.bench`: encoder = `model.encoder` on [B*P, L]; decoder = `generate` from the
fused encoder states, exactly `target_len` greedy steps with the KV cache.
"""

import os
from typing import Any

import ml_collections
import numpy as np


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
