"""Reference timings: the same FiD workload through Hugging Face transformers' T5 (PyTorch, CPU).

A bench-only dependency (requirements-test.txt); fido never imports torch at run time. The reference
is FiD with the config's encoder size for both stacks (transformers' T5 has no multi-query attention,
layer-sparse cross-attention or asymmetric widths): the baseline FiDO is measured against.
Timing follows `fido.bench`: encoder = `model.encoder` on [B*P, L]; decoder = `generate` from the
fused encoder states, exactly `target_len` greedy steps with the KV cache.
"""

import os
from typing import Any, Iterator

import ml_collections
import numpy as np

from fido.bench import time_calls, timing_fields


def hf_t5_config(model: ml_collections.ConfigDict):
  import transformers  # pylint: disable=g-import-not-at-top
  enc = model.encoder
  return transformers.T5Config(
      vocab_size=model.vocab_size, d_model=enc.d_model, d_ff=enc.d_ff, d_kv=enc.d_kv,
      num_heads=enc.num_heads, num_layers=enc.num_layers, num_decoder_layers=enc.num_layers,
      feed_forward_proj='gated-gelu', tie_word_embeddings=False, dropout_rate=0.0,
      relative_attention_num_buckets=model.relative_attention_num_buckets,
      relative_attention_max_distance=model.relative_attention_max_distance,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def bench_hf_reference(config: ml_collections.ConfigDict) -> Iterator[dict[str, Any]]:
  """Yields one result dict per batch size, in the same format as `fido.bench.bench_model`."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError('config.bench.reference="hf" needs torch and transformers: '
                       'pip install -r requirements-test.txt') from e
  bench = config.bench
  dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[config.model.dtype]
  torch.manual_seed(bench.seed)
  torch.set_num_threads(os.cpu_count() or 1)
  model = transformers.T5ForConditionalGeneration(hf_t5_config(config.model)).to(dtype).eval()
  rng = np.random.default_rng(bench.seed)
  for batch in bench.batch_sizes:
    shape = (batch * bench.n_passages, bench.passage_len)
    ids = torch.from_numpy(rng.integers(3, config.model.vocab_size, size=shape)).long()
    mask = torch.ones_like(ids)
    with torch.inference_mode():
      encode = lambda: model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
      fused = encode().reshape(batch, bench.n_passages * bench.passage_len, -1)
      outputs = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=fused)
      fused_mask = mask.reshape(batch, -1)
      decode = lambda: model.generate(
          encoder_outputs=outputs, attention_mask=fused_mask, max_new_tokens=bench.target_len,
          min_new_tokens=bench.target_len, do_sample=False, num_beams=1, use_cache=True)
      assert decode().shape[1] == bench.target_len + 1  # the start token plus target_len steps
      timings = timing_fields(time_calls(encode, bench.repeats, bench.warmup),
                              time_calls(decode, bench.repeats, bench.warmup), batch)
    yield dict(
        name=f'hf-transformers-t5-{config.model.encoder.size}', batch=batch,
        n_passages=bench.n_passages, passage_len=bench.passage_len, target_len=bench.target_len,
        **timings, repeats=bench.repeats, dtype=config.model.dtype, device='cpu (torch)',
        torch=torch.__version__, transformers=transformers.__version__,
        threads=torch.get_num_threads())
