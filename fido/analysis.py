"""Inference cost model of FiD/FiDO: parameters, FLOPs, memory, operational intensity, roofline.

Symbols (FiDO, de Jong et al. 2022, §2 and appendix): B batch, P passages, L passage length,
L' = L // fid_light_k tokens per passage the decoder sees, S = n_s = P * L', T target length (= the
decode cache length M), D width, F d_ff, H heads, K self-attention kv heads, C cross-attention kv
heads, E d_kv, V vocabulary, Lx layers of a stack, X number of decoder layers with cross-attention.

Paper equations, as the paper (§2 and its appendix) states them (numbered here for reference; they
count multiply-adds of the dominant terms of a FiD model with MHA and cross-attention in every
layer, while our exact FLOPs are 2 per multiply-add, as XLA counts them):
  (1) FLOPs_enc ~= 12 * n_s * d^2 * L        (n_s here = P * L, every passage token)
  (2) FLOPs_dec ~= 2 * n_s * d^2 * L         (cross-attention key/value projections)
  (3) MHA cross-attention memory / arithmetic ~= 1/b + n_s/d
  (4) MQ  cross-attention memory / arithmetic ~= 1/b + 1/d + n_s/(d*h)
  general (ours, any C): 1/b + 1/d + n_s*C/(d*h)  (C = h: eq. 3 plus its dropped 1/d; C = 1: eq. 4)

The exact model counts, per component, the matrix multiplications of *our* implementation
(fido/model: attention projections with kv heads, score and value products, gated-GELU MLP, the
output layer; decoder self-attention attends over all M cache slots, masked) and the bytes they move
(weights at `param_bytes` -- ours stay float32 and are cast at use, so each decode step reads them
in float32 -- plus operands/results at the compute dtype, attention logits in float32). Elementwise
work (norms, softmax, GELU, residual adds) is left out of the FLOPs; XLA's `cost_analysis()` counts
it, which is why XLA reports a few percent more (see `xla_costs`).

Memory (`memory`): parameters; encoder output [B, S, D_enc]; cross-attention K/V cache
2*B*S*C*E*bytes per cross-attention layer; self-attention cache 2*B*M*K*E*bytes per decoder layer;
the encoder's peak working set for the samples encoded at once (one layer: residual stream, its
normed copy, q/k/v, float32 logits and compute-dtype softmax weights -- the bias and softmax
intermediates are assumed fused; or the MLP's two [.., F] activations, whichever is larger); the
decode step's transient logits. `peak_bytes` adds all of them (no buffer reuse between the encoder's
working set and the caches: conservative); `peak_bytes_reuse` takes params + max(encode phase,
decode phase). A fraction `overhead` (default 10%) of device memory is held back for the runtime,
XLA workspace and fragmentation. Max batch = largest B with peak <= (1 - overhead) * memory.

Training state (`per_device_bytes`, used by fido.analyze's `train_state_memory`): what one device
holds of the parameters, their gradients (laid out as the parameters) and the optimizer state
(mirroring them), each array's bytes divided by the mesh axes its PartitionSpec splits it over
(fido.sharding's rules; with FSDP also the data axis). Activations are not included.

How well it holds (tests/test_analysis.py; 2-core CPU, XLA 0.10.2): exact FLOPs are within 0-8% of
XLA's cost_analysis for the float32 encoder, K/V projection and decode step of tiny models (XLA adds
the elementwise work). XLA-CPU's scratch memory for a float32 encoder call was 1.7-1.8x our
working-set estimate (CPU fusion materialises the [N, H, L, L] bias and softmax intermediates), so
the encoder term is a lower bound there. Against the paper's Table 1 (TPUv4, 32 GiB) the ordering
FiD-Base < +LSA < +MQ > +XL decoder follows from these terms alone; see `paper_table1`.
"""

import dataclasses
import os
import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fido.config import ConfigError, cross_attention_layers, shares_embedding
from fido.errors import did_you_mean

GiB = 2**30
MEMORY_OVERHEAD = 0.10


@dataclasses.dataclass(frozen=True)
class Setting:
  """An inference workload; defaults are the paper's (§4: 40 x 256 tokens, 32 out, bf16)."""
  batch_size: int = 24
  n_passages: int = 40
  passage_len: int = 256
  target_len: int = 32
  dtype_bytes: int = 2          # activations and caches (bfloat16)
  param_bytes: int = 4          # parameters as read at use (ours: float32, cast in the step)
  encoder_batch: int | None = None  # samples encoded at once; None: the whole batch (as bench.py)


def setting_from_config(config: ml_collections.ConfigDict,
                        batch_size: int | None = None) -> Setting:
  """The `config.bench` workload at `batch_size` (default: its first) in `config.model.dtype`."""
  bench = config.bench
  return Setting(batch_size=batch_size or bench.batch_sizes[0], n_passages=bench.n_passages,
                 passage_len=bench.passage_len, target_len=bench.target_len,
                 dtype_bytes=int(np.dtype(jnp.dtype(config.model.dtype)).itemsize))


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  peak_flops: float    # dense FLOP/s at the compute dtype
  bandwidth: float     # memory bytes/s
  memory_bytes: float


# Vendor figures per chip; "80 GB" HBM parts expose about that many GiB.
DEVICES: Mapping[str, Device] = {
    'tpu-v4': Device('tpu-v4', 275e12, 1200e9, 32 * GiB),
    'a100-40gb': Device('a100-40gb', 312e12, 1555e9, 40 * GiB),
    'a100-80gb': Device('a100-80gb', 312e12, 2039e9, 80 * GiB),
    'h100-sxm': Device('h100-sxm', 989e12, 3350e9, 80 * GiB),
    'h200': Device('h200', 989e12, 4800e9, 141 * GiB),
}


def _best_seconds(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def probe_cpu(sizes=(256, 512, 1024), copy_mib: int = 256) -> Device:
  """Measures this host CPU's f32 matmul peak and memory bandwidth, best of 3 runs (~2 s).

  Bandwidth: the faster of a reduction (reads the array) and `x + 1` (reads and writes it) over
  `copy_mib` MiB, well beyond the caches. Memory: physical RAM.
  """
  cpu = jax.devices('cpu')[0]
  matmul = jax.jit(lambda a, b: a @ b)
  peak = 0.0
  for n in sizes:
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    peak = max(peak, 2 * n**3 / _best_seconds(matmul, a, a))
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return Device(f'cpu ({os.cpu_count()} cores, measured)', peak, probe_bandwidth(copy_mib),
                float(memory))


def probe_bandwidth(copy_mib: int = 256) -> float:
  """This host's memory bandwidth in bytes/s: the faster of a reduction (reads the array) and
  `x + 1` (reads and writes it) over `copy_mib` MiB of float32, best of 3 runs each."""
  x = jax.device_put(jnp.ones((copy_mib * 2**20 // 4,), jnp.float32), jax.devices('cpu')[0])
  reads = x.nbytes / _best_seconds(jax.jit(jnp.sum), x)
  copies = 2 * x.nbytes / _best_seconds(jax.jit(lambda v: v + 1.0), x)
  return max(reads, copies)


def get_device(device: str | Device) -> Device:
  if isinstance(device, Device):
    return device
  if device == 'cpu':
    return probe_cpu()
  if device not in DEVICES:
    raise ConfigError(f'--device={device!r} is unknown; expected one of {sorted(DEVICES)} or "cpu"'
                      f'{did_you_mean(device, DEVICES)}')
  return DEVICES[device]


# ---------------------------------------------------------------------------- parameters


def _attention_params(d_in_q: int, d_in_kv: int, heads: int, kv_heads: int, d_kv: int) -> int:
  return d_in_q * heads * d_kv + 2 * d_in_kv * kv_heads * d_kv + heads * d_kv * d_in_q


def param_counts(model: ml_collections.ConfigDict) -> dict[str, int]:
  """Analytic parameter counts: encoder, decoder (incl. its cross-attention), embeddings, output."""
  enc, dec, buckets = model.encoder, model.decoder, model.relative_attention_num_buckets
  enc_layer = 2 * enc.d_model + 3 * enc.d_model * enc.d_ff + _attention_params(
      enc.d_model, enc.d_model, enc.num_heads, enc.num_kv_heads, enc.d_kv)
  dec_layer = 2 * dec.d_model + 3 * dec.d_model * dec.d_ff + _attention_params(
      dec.d_model, dec.d_model, dec.num_heads, dec.num_kv_heads, dec.d_kv)
  cross_layer = dec.d_model + _attention_params(dec.d_model, enc.d_model, dec.num_heads,
                                                dec.cross_num_kv_heads, dec.d_kv)
  cross = len(cross_attention_layers(dec)) * cross_layer
  counts = dict(
      encoder=buckets * enc.num_heads + enc.num_layers * enc_layer + enc.d_model,
      decoder=buckets * dec.num_heads + dec.num_layers * dec_layer + cross + dec.d_model,
      decoder_cross_attention=cross,
      embeddings=model.vocab_size * (enc.d_model + (0 if shares_embedding(model) else dec.d_model)),
      output_projection=dec.d_model * model.vocab_size)
  counts['total'] = (counts['encoder'] + counts['decoder'] + counts['embeddings']
                     + counts['output_projection'])
  return counts


def param_counts_from_tree(params: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
  """The same groups counted on a real Haiku parameter tree (arrays or ShapeDtypeStructs)."""
  counts = dict.fromkeys(('encoder', 'decoder', 'decoder_cross_attention', 'embeddings',
                          'output_projection', 'total'), 0)
  for module, leaves in params.items():
    n = sum(int(np.prod(x.shape)) for x in leaves.values())
    top = module.split('/')[0]
    group = 'embeddings' if top.endswith('embedding') else top
    counts[group] += n
    counts['total'] += n
    if top == 'decoder' and module.split('/')[-1].startswith('cross_attention'):
      counts['decoder_cross_attention'] += n
  return counts


# ---------------------------------------------------------------------------- FLOPs and bytes


class Cost(NamedTuple):
  flops: float   # for the whole batch
  bytes: float   # memory traffic for the whole batch (weights counted once)


def _dims(model, s: Setting) -> dict[str, int]:
  enc, dec = model.encoder, model.decoder
  kept = s.passage_len // model.fid_light_k
  return dict(B=s.batch_size, P=s.n_passages, L=s.passage_len, S=s.n_passages * kept,
              M=s.target_len, X=len(cross_attention_layers(dec)), V=model.vocab_size,
              De=enc.d_model, Fe=enc.d_ff, He=enc.num_heads, Ke=enc.num_kv_heads, Ee=enc.d_kv,
              Le=enc.num_layers, D=dec.d_model, F=dec.d_ff, H=dec.num_heads, K=dec.num_kv_heads,
              C=dec.cross_num_kv_heads, E=dec.d_kv, Ld=dec.num_layers)


def encoder_costs(model, s: Setting) -> dict[str, Cost]:
  """One encoder call on B samples: B*P passages of L tokens, per component, all layers."""
  g, dt, pb = _dims(model, s), s.dtype_bytes, s.param_bytes
  n = g['B'] * g['P'] * g['L']                       # tokens
  scores = g['B'] * g['P'] * g['He'] * g['L']**2     # attention logits per layer
  q, kv = g['He'] * g['Ee'], g['Ke'] * g['Ee']
  proj_w = 2 * g['De'] * q + 2 * g['De'] * kv
  mlp_w = 3 * g['De'] * g['Fe']
  layers = g['Le']
  return {
      'attention_projections': Cost(
          layers * 2 * n * proj_w,
          layers * (proj_w * pb + n * dt * (3 * g['De'] + q + 2 * kv + q + g['De']))),
      'attention_scores': Cost(
          layers * 2 * 2 * scores * g['Ee'],
          layers * (n * dt * (q + kv) + scores * (4 + 4 + dt) + scores * dt + n * dt * (kv + q))),
      'mlp': Cost(layers * 2 * n * mlp_w,
                  layers * (mlp_w * pb + n * dt * (2 * g['De'] + 2 * g['Fe'] + 3 * g['Fe'] + g['Fe']
                                                   + g['De']))),
  }


def decoder_costs(model, s: Setting) -> dict[str, Cost]:
  """The cross-attention K/V projection (once per sample) and one decode step on B samples."""
  g, dt, pb = _dims(model, s), s.dtype_bytes, s.param_bytes
  b, d, hq = g['B'], g['D'], g['H'] * g['E']
  self_w = 2 * d * hq + 2 * d * g['K'] * g['E']
  self_cache = 2 * g['M'] * g['K'] * g['E']            # elements per sample per layer
  cross_w = 2 * d * hq
  cross_cache = 2 * g['S'] * g['C'] * g['E']
  cross_kv_w = 2 * g['De'] * g['C'] * g['E']
  mlp_w = 3 * d * g['F']
  return {
      'cross_kv_projection': Cost(
          g['X'] * 2 * b * g['S'] * cross_kv_w,
          g['X'] * (cross_kv_w * pb + b * g['S'] * g['De'] * dt * 2 + b * cross_cache * dt)),
      'self_attention': Cost(
          g['Ld'] * b * (2 * self_w + 2 * 2 * g['H'] * g['M'] * g['E']),
          g['Ld'] * (self_w * pb + b * dt * (self_cache + 2 * d + 2 * hq + 2 * g['K'] * g['E'])
                     + b * g['H'] * g['M'] * (8 + 2 * dt))),
      'cross_attention': Cost(
          g['X'] * b * (2 * cross_w + 2 * 2 * g['H'] * g['S'] * g['E']),
          g['X'] * (cross_w * pb + b * dt * (cross_cache + 2 * d + 2 * hq)
                    + b * g['H'] * g['S'] * (8 + 2 * dt))),
      'mlp': Cost(g['Ld'] * b * 2 * mlp_w,
                  g['Ld'] * (mlp_w * pb + b * dt * (2 * d + 6 * g['F'] + d))),
      'output_layer': Cost(2 * b * d * g['V'], d * g['V'] * pb + b * (d * dt + g['V'] * 4)),
  }


STEP_COMPONENTS = ('self_attention', 'cross_attention', 'mlp', 'output_layer')


def paper_flops(model, s: Setting) -> dict[str, float]:
  """Eq. (1)-(2) per sample as stated (n_s = P*L encoder tokens in (1), S fused tokens in (2))."""
  enc, dec = model.encoder, model.decoder
  return dict(encoder=12.0 * s.n_passages * s.passage_len * enc.d_model**2 * enc.num_layers,
              decoder=2.0 * _dims(model, s)['S'] * dec.d_model**2 * dec.num_layers)


def flops_per_sample(model, s: Setting) -> dict[str, float]:
  """Exact matmul FLOPs per sample, per component; decoder = K/V projection + T steps."""
  b, enc, dec = s.batch_size, encoder_costs(model, s), decoder_costs(model, s)
  out = {f'encoder.{k}': c.flops / b for k, c in enc.items()}
  out['encoder'] = sum(c.flops for c in enc.values()) / b
  out['decoder.cross_kv_projection'] = dec['cross_kv_projection'].flops / b
  for k in STEP_COMPONENTS:
    out[f'decoder_step.{k}'] = dec[k].flops / b
  out['decoder_step'] = sum(dec[k].flops for k in STEP_COMPONENTS) / b
  out['decoder'] = out['decoder.cross_kv_projection'] + s.target_len * out['decoder_step']
  out['total'] = out['encoder'] + out['decoder']
  return out


def bytes_per_sample(model, s: Setting) -> dict[str, float]:
  """Modelled memory traffic per sample: encoder, decoder (K/V projection + T steps).

  Weights are read once per batch (per step in the decoder) and shared by its samples.
  """
  b, enc, dec = s.batch_size, encoder_costs(model, s), decoder_costs(model, s)
  step = sum(dec[k].bytes for k in STEP_COMPONENTS)
  return dict(encoder=sum(c.bytes for c in enc.values()) / b,
              decoder=(dec['cross_kv_projection'].bytes + s.target_len * step) / b)


# ---------------------------------------------------------------------------- memory


def memory(model, s: Setting) -> dict[str, float]:
  """Bytes at `s.batch_size` (see the module docstring for what each term holds)."""
  g, dt = _dims(model, s), s.dtype_bytes
  b, eb = g['B'], min(g['B'], s.encoder_batch or g['B'])
  tokens = eb * g['P'] * g['L']
  residual = 2 * tokens * g['De'] * dt                   # x and its normed copy
  attention = tokens * (g['He'] + 2 * g['Ke']) * g['Ee'] * dt + (
      eb * g['P'] * g['He'] * g['L']**2 * (4 + dt))      # q, k, v; float32 logits + weights
  mlp = 2 * tokens * g['Fe'] * dt
  out = dict(
      params=float(param_counts(model)['total'] * s.param_bytes),
      encoder_activations=float(residual + max(attention, mlp)),
      encoder_output=float(b * g['S'] * (g['De'] * dt + 4)),   # + the float32 padding bias
      cross_kv_cache=float(g['X'] * 2 * b * g['S'] * g['C'] * g['E'] * dt),
      self_kv_cache=float(g['Ld'] * 2 * b * g['M'] * g['K'] * g['E'] * dt),
      decode_step_activations=float(b * (2 * 4 * g['V'] + g['H'] * (g['S'] + g['M']) * (4 + dt))),
  )
  decode_phase = (out['encoder_output'] + out['cross_kv_cache'] + out['self_kv_cache']
                  + out['decode_step_activations'])
  out['peak_bytes'] = out['params'] + out['encoder_activations'] + decode_phase
  out['peak_bytes_reuse'] = out['params'] + max(out['encoder_activations'] + out['encoder_output'],
                                                decode_phase)
  return out


def max_batch(model, s: Setting, device: str | Device, *, overhead: float = MEMORY_OVERHEAD,
              reuse: bool = False, limit: int = 1 << 24) -> int:
  """Largest batch whose peak memory fits in (1 - overhead) of the device; 0 if none does."""
  usable = (1.0 - overhead) * get_device(device).memory_bytes
  key = 'peak_bytes_reuse' if reuse else 'peak_bytes'
  fits = lambda b: memory(model, dataclasses.replace(s, batch_size=b))[key] <= usable
  lo, hi = 0, 1                                          # fits(lo), peak grows with the batch
  while fits(hi):
    lo, hi = hi, 2 * hi
    if hi > limit:
      return lo
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


# ---------------------------------------------------------------------------- intensity, roofline


def paper_inverse_intensity(b: float, n_s: float, d: float, h: float, kv_heads: float) -> dict:
  """Eq. (3) MHA and (4) MQ as stated, and the GQA generalisation 1/b + 1/d + n_s*C/(d*h)."""
  return dict(mha=1 / b + n_s / d, mq=1 / b + 1 / d + n_s / (d * h),
              general=1 / b + 1 / d + n_s * kv_heads / (d * h))


def cross_attention_intensity(model, s: Setting) -> dict[str, float]:
  """Memory/arithmetic of one decode step's cross-attention: the paper's, our exact bytes/FLOP."""
  g = _dims(model, s)
  cost = decoder_costs(model, s)['cross_attention']
  out = paper_inverse_intensity(g['B'], g['S'], g['D'], g['H'], g['C'])
  out['exact_bytes_per_flop'] = cost.bytes / cost.flops if cost.flops else 0.0
  return out


def roofline(model, s: Setting, device: str | Device) -> dict[str, float]:
  """Milliseconds per sample: each component takes max(FLOPs / peak, bytes / bandwidth)."""
  dev = get_device(device)
  t = lambda c: max(c.flops / dev.peak_flops, c.bytes / dev.bandwidth) * 1e3 / s.batch_size
  bound = lambda c: 'compute' if c.flops / dev.peak_flops >= c.bytes / dev.bandwidth else 'memory'
  enc, dec = encoder_costs(model, s), decoder_costs(model, s)
  out = {f'encoder.{k}_ms': t(c) for k, c in enc.items()}
  out['decoder.cross_kv_projection_ms'] = t(dec['cross_kv_projection'])
  out.update({f'decoder.{k}_ms': s.target_len * t(dec[k]) for k in STEP_COMPONENTS})
  out['encoder_ms'] = sum(t(c) for c in enc.values())
  out['decoder_ms'] = t(dec['cross_kv_projection']) + s.target_len * sum(
      t(dec[k]) for k in STEP_COMPONENTS)
  out['total_ms'] = out['encoder_ms'] + out['decoder_ms']
  out['bound'] = {**{f'encoder.{k}': bound(c) for k, c in enc.items()},
                  **{f'decoder.{k}': bound(c) for k, c in dec.items()}}
  return out


# ---------------------------------------------------------------------------- training state


def per_device_bytes(tree: Any, specs: Any, axis_sizes: Mapping[str, int]) -> float:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `specs` (a tree
  like it of PartitionSpecs): each leaf's bytes over the sizes of the mesh axes it is split over."""
  def one(leaf, spec) -> float:
    axes = [a for entry in spec if entry is not None
            for a in ((entry,) if isinstance(entry, str) else entry)]
    split = float(np.prod([axis_sizes[a] for a in axes])) if axes else 1.0
    return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize / split
  return float(sum(jax.tree.leaves(jax.tree.map(one, tree, specs))))
