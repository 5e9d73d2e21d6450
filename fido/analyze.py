"""`run.py --mode=analyze`: the cost model of fido/analysis.py for one config, as a report.

  analyze(config, setting, device) -> dict   parameters, FLOPs (exact and the paper's), bytes,
                                             memory, max batch, intensity, roofline; with xla=True
                                             also XLA's own cost analysis (`xla_costs`)
  run_analyze(config, device)                one `analyze` per config.bench batch size
  format_table(results)                      the results as a text table (run.py prints it)
  paper_table1()                             the models of the paper's Table 1 (max batch)
  train_state_memory(config, device)         training state per device on data-parallel meshes,
                                             replicated over 'data' and FSDP (config.sharding.fsdp)
"""

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jax.sharding import PartitionSpec as P

from fido import optim, sharding
from fido.analysis import (GiB, MEMORY_OVERHEAD, Device, Setting, bytes_per_sample,
                           cross_attention_intensity, flops_per_sample, get_device, max_batch,
                           memory, paper_flops, param_counts, per_device_bytes, roofline,
                           setting_from_config)
from fido.config import model_config
from fido.model.fid import make_model
from fido.train_step import init_train_state


# ---------------------------------------------------------------------------- XLA


def _cost_dict(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):          # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  out = dict(flops=float(cost.get('flops', 0.0)),
             bytes_accessed=float(cost.get('bytes accessed', 0.0)))
  stats = compiled.memory_analysis()
  if stats is not None:
    out['temp_bytes'] = float(stats.temp_size_in_bytes)
  return out


def xla_costs(model, s: Setting) -> dict[str, dict[str, float]]:
  """XLA's cost_analysis() of the compiled encoder, cross-K/V projection and one decode step.

  Whole-batch figures: 'flops', 'bytes_accessed' and, from memory_analysis(), 'temp_bytes' (XLA's
  scratch buffers). XLA counts 2 FLOPs per multiply-add in dots, as we do, plus one per element of
  each elementwise op and reduction; with bfloat16 compute that includes converting every weight
  used, which is large relative to a tiny model's matmuls. Compiles without materialising
  parameters (shapes only); on CPU use small configs.
  """
  fns = make_model(model)
  dummy = jnp.zeros((1, 1, 4), jnp.int32)
  params = jax.eval_shape(fns.init, jax.random.PRNGKey(0), dummy, dummy > 0,
                          jnp.zeros((1, 2), jnp.int32))
  ids = jax.ShapeDtypeStruct((s.batch_size, s.n_passages, s.passage_len), jnp.int32)
  mask = jax.ShapeDtypeStruct(ids.shape, jnp.bool_)
  enc, enc_mask = jax.eval_shape(fns.encode, params, ids, mask)
  init_cache = functools.partial(fns.init_cache, max_length=s.target_len)
  cache = jax.eval_shape(init_cache, params, enc, enc_mask)
  tokens = jax.ShapeDtypeStruct((s.batch_size,), jnp.int32)
  return dict(
      encoder=_cost_dict(jax.jit(fns.encode).lower(params, ids, mask).compile()),
      cross_kv_projection=_cost_dict(jax.jit(init_cache).lower(params, enc, enc_mask).compile()),
      decoder_step=_cost_dict(jax.jit(fns.decode_step).lower(params, tokens, cache).compile()))


# ---------------------------------------------------------------------------- reports


def analyze(config: ml_collections.ConfigDict, setting: Setting | None = None,
            device: str | Device = 'tpu-v4', *, xla: bool = False,
            name: str = '') -> dict[str, Any]:
  """Everything above for one model (`config.model` or a full config), JSON-serialisable."""
  model = config.model if 'model' in config else config
  s = setting or Setting()
  dev = get_device(device)
  exact, paper = flops_per_sample(model, s), paper_flops(model, s)
  result = dict(
      name=name or config.get('name', '') or f'{model.encoder.size}-{model.decoder.size}',
      setting=dataclasses.asdict(s), device=dataclasses.asdict(dev),
      params=param_counts(model),
      flops_per_sample=dict(exact=exact, paper=paper,
                            exact_over_paper=dict(encoder=exact['encoder'] / paper['encoder'],
                                                  decoder=exact['decoder'] / paper['decoder'])),
      bytes_per_sample=bytes_per_sample(model, s),
      memory=memory(model, s),
      max_batch=max_batch(model, s, dev), max_batch_reuse=max_batch(model, s, dev, reuse=True),
      cross_attention_intensity=cross_attention_intensity(model, s),
      machine_balance_bytes_per_flop=dev.bandwidth / dev.peak_flops,
      roofline=roofline(model, s, dev))
  if xla:
    costs = xla_costs(model, s)
    b = s.batch_size
    ours = dict(encoder=exact['encoder'] * b, decoder_step=exact['decoder_step'] * b,
                cross_kv_projection=exact['decoder.cross_kv_projection'] * b)
    for k, c in costs.items():
      c['exact_flops'] = ours[k]
      c['xla_over_exact'] = c['flops'] / ours[k] if ours[k] else float('nan')
    result['xla'] = costs
  return result


def paper_table1() -> list[tuple[str, ml_collections.ConfigDict, int]]:
  """FiDO Table 1 (max batch; TPUv4, 40 x 256 passages, 32 targets): (name, model, paper's)."""
  return [('FiD-Base', model_config('base', dtype='bfloat16'), 24),
          ('+LSA', model_config('base', cross_attention_period=6, dtype='bfloat16'), 128),
          ('+MQ', model_config('base', cross_attention_period=6, decoder_kv_heads=1,
                               cross_kv_heads=1, dtype='bfloat16'), 256),
          ('+XL decoder', model_config('base', 'xl', cross_attention_period=6, decoder_kv_heads=1,
                                       cross_kv_heads=1, dtype='bfloat16'), 128)]


def format_table(results: Mapping[str, Any] | list[Mapping[str, Any]]) -> str:
  """One row per `analyze` result."""
  rows = [results] if isinstance(results, Mapping) else list(results)
  header = (f'{"model":<16}{"params M":>10}{"enc GF":>10}{"dec GF":>10}{"xKV MB":>10}'
            f'{"max B":>8}{"max B*":>8}{"enc ms":>9}{"dec ms":>9}{"1/OI":>8}')
  lines = [header, '-' * len(header)]
  for r in rows:
    b, f = r['setting']['batch_size'], r['flops_per_sample']['exact']
    lines.append(
        f'{r["name"][:15]:<16}{r["params"]["total"] / 1e6:>10.1f}{f["encoder"] / 1e9:>10.1f}'
        f'{f["decoder"] / 1e9:>10.2f}{r["memory"]["cross_kv_cache"] / b / 1e6:>10.1f}'
        f'{r["max_batch"]:>8d}{r["max_batch_reuse"]:>8d}{r["roofline"]["encoder_ms"]:>9.2f}'
        f'{r["roofline"]["decoder_ms"]:>9.2f}'
        f'{r["cross_attention_intensity"]["exact_bytes_per_flop"]:>8.3f}')
  dev = rows[0]['device'] if rows else {}
  lines.append(f'per sample; GF = 1e9 FLOPs; xKV = cross-attention K/V cache; max B* = with buffer '
               f'reuse; ms = roofline on {dev.get("name", "?")}; 1/OI = cross-attn bytes/FLOP')
  if rows and rows[0].get('train_state'):
    lines += ['', format_train_state(rows[0]['train_state'], dev.get('name', '?'))]
  return '\n'.join(lines)


def train_state_memory(config: ml_collections.ConfigDict, device: str | Device = 'tpu-v4',
                       data_sizes=(1, 8, 64)) -> list[dict[str, Any]]:
  """Bytes per device of the training state (params, gradients, config.optimizer's state) on
  meshes (data, config.sharding.mesh.model) for each data size, with the parameters replicated
  over 'data' and with FSDP; `fits`: whether the state alone fits in (1 - overhead) of `device`
  (activations need room too). Shapes only: nothing is allocated."""
  model, optimizer = make_model(config.model), optim.make_optimizer(config.optimizer)
  ids = jnp.zeros((1, 1, 4), jnp.int32)
  batch = dict(passage_ids=ids, passage_mask=ids > 0, target_ids=jnp.zeros((1, 2), jnp.int32))
  state = jax.eval_shape(functools.partial(init_train_state, model, optimizer),
                         jax.random.PRNGKey(0), batch)
  usable = (1.0 - MEMORY_OVERHEAD) * get_device(device).memory_bytes
  rows = []
  for data in data_sizes:
    for fsdp in (False, True):
      axes = {sharding.DATA: data, sharding.MODEL: config.sharding.mesh.model}
      specs = sharding.param_specs(state.params, axes, fsdp=fsdp)
      opt_specs = sharding.mirror_params(state.opt_state, state.params, specs, P())
      params = per_device_bytes(state.params, specs, axes)
      opt = per_device_bytes(state.opt_state, opt_specs, axes)
      total = 2 * params + opt  # gradients are laid out as the parameters
      rows.append(dict(data=data, model=config.sharding.mesh.model, fsdp=fsdp, params=params,
                       gradients=params, optimizer=opt, total=total, fits=total <= usable))
  return rows


def format_train_state(rows: list[Mapping[str, Any]], device: str) -> str:
  """`train_state_memory` as a table (GiB per device)."""
  lines = [f'training state per device on {device} (GiB; params + gradients + optimizer state):',
           f'{"mesh data x model":<20}{"replicated":>12}{"fsdp":>12}']
  for plain, fsdp in zip(rows[::2], rows[1::2]):
    cell = lambda r: f'{r["total"] / GiB:.2f}' + ('' if r['fits'] else ' (!)')
    lines.append(f'{plain["data"]:>8} x {plain["model"]:<9}{cell(plain):>12}{cell(fsdp):>12}')
  lines.append('(!) = does not fit in 90% of the device memory, before activations')
  return '\n'.join(lines)


def run_analyze(config: ml_collections.ConfigDict, device: str | Device = 'tpu-v4') -> list[dict]:
  """`run.py --mode=analyze`: one analysis per bench batch size (run.py prints them as a table and
  as JSON lines).

  XLA's own cost analysis is compiled only for bench settings small enough to compile quickly.
  """
  results, device = [], get_device(device)  # a CPU is probed once
  for batch in config.bench.batch_sizes:
    setting = setting_from_config(config, batch)
    small = setting.batch_size * setting.n_passages * setting.passage_len <= 1 << 16
    results.append(analyze(config, setting, device, xla=small))
  if results and 'optimizer' in config and 'sharding' in config:
    results[0]['train_state'] = train_state_memory(config, device)
  return results
