"""Tiny Hugging Face T5.1.1 reference models for conversion and parity tests (torch is test-only).

Weights are random (no downloads). Everything HF's default init leaves trivial is randomised too: RMSNorm
scales (default 1) and the relative attention biases; the output layer is untied from the embedding,
because transformers>=5 ties T5's lm_head to `shared` unless the two differ (real T5.1.1 checkpoints
carry a separate lm_head).
"""

import json
import pathlib

import numpy as np

torch = None
transformers = None


def _import():
  global torch, transformers
  import torch as _torch  # pylint: disable=g-import-not-at-top
  import transformers as _transformers  # pylint: disable=g-import-not-at-top
  torch, transformers = _torch, _transformers
  _transformers.logging.set_verbosity_error()
  # Tiny matmuls: torch's intra-op threads only spin against JAX (and other tests) for the 2 cores,
  # making a 50 ms generate() take seconds under load.
  _torch.set_num_threads(1)


def tiny_t5_config(**overrides):
  """A T5.1.1 config (gated-GELU, untied, no logit scaling, no dropout) of CPU-test size."""
  _import()
  kwargs = dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False, d_model=32, d_ff=64,
                num_heads=4, d_kv=8, num_layers=2, num_decoder_layers=2, vocab_size=128,
                dropout_rate=0.0, decoder_start_token_id=0)
  kwargs.update(overrides)
  return transformers.T5Config(**kwargs)


def random_t5(hf_config, seed: int = 0, untie: bool = True):
  """T5ForConditionalGeneration in eval mode with every weight random (norms around 1)."""
  _import()
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    if untie:
      vocab, d_model = model.shared.weight.shape
      model.lm_head.weight = torch.nn.Parameter(
          torch.randn(vocab, d_model, generator=generator) * d_model**-0.5)
    for name, param in model.named_parameters():
      if name.endswith('layer_norm.weight'):
        param.copy_(torch.empty_like(param).uniform_(0.5, 1.5, generator=generator))
      elif name.endswith('relative_attention_bias.weight'):
        param.copy_(torch.randn(param.shape, generator=generator))
  return model


def save_t5(model, out_dir, classic: bool = True) -> pathlib.Path:
  """`save_pretrained` (safetensors); `classic` rewrites config.json the way T5.1.1 hub checkpoints
  read (tie_word_embeddings=false, no transformers>=5 `scale_decoder_outputs` key)."""
  out = pathlib.Path(out_dir)
  model.save_pretrained(out, safe_serialization=True)
  if classic:
    config = json.loads((out / 'config.json').read_text())
    config['tie_word_embeddings'] = False
    config.pop('scale_decoder_outputs', None)
    (out / 'config.json').write_text(json.dumps(config, indent=2))
  return out


def state_numpy(model) -> dict[str, np.ndarray]:
  """The model's tensors by HF name as float32 numpy (lm_head included even when tied)."""
  return {name: t.detach().cpu().float().numpy() for name, t in model.state_dict().items()}
