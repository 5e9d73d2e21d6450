"""The FiDO paper's ablations (de Jong et al., 2022) as sweeps: Tables 3, 4, 6 and Figures 4, 6.

  python run.py --mode=sweep --config=experiments/ablations.py:table3           # paper sizes (GPU)
  python run.py --mode=sweep --config=experiments/ablations.py:table3,smoke     # 2-core CPU, ~1 min
  python run.py --mode=sweep --config=experiments/ablations.py:table3,smoke,train  # + training
  python run.py --mode=sweep --config=experiments/ablations.py:fig6 --workdir=/tmp/fig6

Arguments: the sweep name (table3, table4, table6, fig4, fig6), `smoke` (tiny models and a small
workload: each sweep runs in one to three minutes on a 2-core CPU), `train` (train + evaluate every
point on the synthetic retrieval-QA data of experiments/embedded.py, with its `smoke` settings
under smoke, besides the benchmark), `steps=N` (training steps; 0 = the embedded config's),
`mha_steps=M` (with steps=N: the first M of them multi-head, then uptrained; default 0),
`max_batch=0|1` (cap each run's batch at its `fido.max_batch.max_batch_search` result; on by default
for table3, as the paper's "batch 64 or max"), `workdir=PATH`.

Each sweep below is a function returning its runs: `{name, overrides, paper, group, series, x}`,
where `overrides` are dotted config keys applied on top of the sweep's base config (`BASES`);
`get_config` puts the sweep's common settings (workload, batch size) first in every run's overrides;
`paper` holds the paper's ms/sample where its Table 1 and figures give them (TPUv4; `fido.sweep`
reports ratios to the first row next to ours); `group`/`series`/`x` place a run on a line plot
(Figures 4 and 6). `fido.sweep.run_sweep` runs them.
"""

from typing import Any

import ml_collections

from fido import config as fido_config

# Base configs: (paper sizes, smoke). The smoke FiDO is the embedded default (micro-width encoder,
# mini decoder, LSA-2, MQ); its FiD has the same encoder, a micro decoder, cross-attention
# everywhere and MHA.
BASES = {
    'fido': ('experiments/fido.py:base-xl,dtype=bfloat16', 'experiments/embedded.py:fido'),
    'fid': ('experiments/fid.py:base,dtype=bfloat16', 'experiments/embedded.py:fid'),
}
# What 'Base', 'XL' and LSA-6 stand for at each scale (smoke: two sizes up is micro -> mini, and
# the decoders are too shallow for period 6).
SCALE = {
    False: dict(enc='base', dec='xl', lsa=6),
    True: dict(enc='micro', dec='mini', lsa=2),
}
# The workload (paper §4: 40 passages x 256 tokens, 32 output tokens; batch set per sweep).
LOCAL_BENCH = {'bench.n_passages': 10, 'bench.passage_len': 64, 'bench.target_len': 16,
               'bench.repeats': 10, 'bench.warmup': 2}   # timing is cheap here; compiling is not
TRAIN_BASES = ('experiments/embedded.py:fido', 'experiments/embedded.py:fido,smoke')


def run(name: str, overrides: dict[str, Any] | None = None, *,
        paper: dict[str, float] | None = None, group: str = '', series: str = '',
        x: float | None = None) -> dict[str, Any]:
  return dict(name=name, overrides=dict(overrides or {}), paper=dict(paper or {}), group=group,
              series=series, x=x)


def decoder_size(size: str, **fields: Any) -> dict[str, Any]:
  """Overrides that give the decoder the T5.1.1 shape `size` (kv heads are set separately)."""
  dims = fido_config.SIZES[size]._asdict()
  dims.update(fields)
  custom = fields and any(dims[k] != v for k, v in fido_config.SIZES[size]._asdict().items())
  return {'model.decoder.size': 'custom' if custom else size,
          **{f'model.decoder.{k}': v for k, v in dims.items()}}


def mha(size: str) -> dict[str, Any]:
  """Multi-head decoder self- and cross-attention (one key/value head per query head)."""
  heads = fido_config.SIZES[size].num_heads
  return {'model.decoder.num_kv_heads': heads, 'model.decoder.cross_num_kv_heads': heads}


MQ = {'model.decoder.num_kv_heads': 1, 'model.decoder.cross_num_kv_heads': 1}


# ------------------------------------------------------------------------------------ the sweeps


def table3(local: bool = False) -> list[dict[str, Any]]:
  """Table 3: FiDO Base-XL without each of its components (ms/sample total | decoder)."""
  s = SCALE[local]
  return [
      run('FiDO Base-XL', paper=dict(total_ms=15.8, decoder_ms=2.0)),
      run('no LSA', {'model.decoder.cross_attention_period': 1},
          paper=dict(total_ms=19.2, decoder_ms=5.4)),
      run('no MQ', mha(s['dec']), paper=dict(total_ms=60.8, decoder_ms=47.0)),
      run('no asym (Base-Base)', decoder_size(s['enc']), paper=dict(total_ms=14.4, decoder_ms=0.6)),
  ]


def table4(local: bool = False) -> list[dict[str, Any]]:
  """Table 4: FiD-Base, FiD-Light (first L/6 tokens of each passage), FiD-LSA (period 6, MHA)."""
  return [
      run('FiD', paper=dict(total_ms=101.8)),
      run('FiD-Light', {'model.fid_light_k': 6}, paper=dict(total_ms=28.3)),
      run('FiD-LSA', {'model.decoder.cross_attention_period': SCALE[local]['lsa']},
          paper=dict(total_ms=29.5)),
  ]


def table6(local: bool = False) -> list[dict[str, Any]]:
  """Table 6: batch 1, FiD-Base adding LSA, then MQ, then the XL decoder (total | decoder)."""
  s = SCALE[local]
  lsa = {'model.decoder.cross_attention_period': s['lsa']}
  return [
      run('FiD', paper=dict(total_ms=135, decoder_ms=123)),
      run('+LSA', lsa, paper=dict(total_ms=51, decoder_ms=39)),
      run('+MQ', {**lsa, **MQ}, paper=dict(total_ms=35, decoder_ms=23)),
      run('+XL decoder', {**decoder_size(s['dec']), **lsa, **MQ},
          paper=dict(total_ms=117, decoder_ms=105)),
  ]


def fig4(local: bool = False) -> list[dict[str, Any]]:
  """Figure 4: FiDO Base-XL at cross-attention period K = 1 ... 24 (every divisor of 24 layers).

  smoke: a 12-layer mini-width decoder (set in `common`), K = every divisor of 12.
  """
  periods = (1, 2, 3, 4, 6, 12) if local else (1, 2, 3, 4, 6, 8, 12, 24)
  return [run(f'K={k}', {'model.decoder.cross_attention_period': k}, group='lsa_period',
              series='FiDO', x=k) for k in periods]


def fig6(local: bool = False) -> list[dict[str, Any]]:
  """Figure 6: time per sample against the number of passages and against the target length, for
  FiD-Base and FiDO Base-XL (passages at the paper's 32 target tokens, target length at 40
  passages; smoke: at its 16 tokens and 10 passages)."""
  s = SCALE[local]
  passages = (5, 20, 40) if local else (10, 20, 40, 60, 80, 100)
  targets = (8, 32, 64) if local else (32, 64, 128, 256, 512)
  models = {'FiD': {**decoder_size(s['enc']), 'model.decoder.cross_attention_period': 1,
                    **mha(s['enc'])},
            'FiDO': {}}
  runs = []
  for series, model in models.items():
    runs += [run(f'{series} P={p}', {**model, 'bench.n_passages': p}, group='passages',
                 series=series, x=p) for p in passages]
    runs += [run(f'{series} T={t}', {**model, 'bench.target_len': t}, group='target_len',
                 series=series, x=t) for t in targets]
  return runs


# name: (runs function, base, paper-size common overrides, smoke common overrides, title)
SWEEPS = {
    'table3': (table3, 'fido', {'bench.batch_sizes': (64,)}, {'bench.batch_sizes': (4,)},
               'Table 3: FiDO Base-XL ablations'),
    'table4': (table4, 'fid', {'bench.batch_sizes': (24,)}, {'bench.batch_sizes': (4,)},
               'Table 4: FiD-Light and FiD-LSA against FiD-Base'),
    'table6': (table6, 'fid', {'bench.batch_sizes': (1,)}, {'bench.batch_sizes': (1,)},
               'Table 6: batch 1, FiD-Base + LSA + MQ + XL decoder'),
    'fig4': (fig4, 'fido', {'bench.batch_sizes': (24,)},
             {'bench.batch_sizes': (4,), **decoder_size('mini', num_layers=12)},
             'Figure 4: cross-attention period (LSA)'),
    'fig6': (fig6, 'fido', {'bench.batch_sizes': (24,)}, {'bench.batch_sizes': (4,)},
             'Figure 6: passages and target length'),
}
PAPER_SETTING = ('TPUv4, 40 passages x 256 tokens, 32 output tokens, greedy; '
                 'Table 3 at batch 64 (or the largest that fits), Table 6 at batch 1')


VARIANTS = tuple(SWEEPS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = fido_config.parse_arg(arg, variants=VARIANTS, variant='', smoke=False, train=False,
                              steps=0, mha_steps=0, max_batch=-1, workdir='')
  runs_fn, base, paper_common, local_common, title = SWEEPS[arg.variant]
  # Each run's overrides are these common ones, then its own (the dotted keys stay in plain dicts:
  # ConfigDict refuses dotted field names).
  local = bool(arg.smoke)
  common = dict(LOCAL_BENCH if local else {})
  common.update(local_common if local else paper_common)
  if arg.train:
    common['train.progress'] = False
    if arg.steps:
      # mha_steps=M: the first M steps train each run's multi-head twin (config.train.mha_steps).
      common.update({'train.steps': arg.steps, 'train.mha_steps': arg.mha_steps})
  suffix = '-smoke' if local else ''
  config = ml_collections.ConfigDict()
  config.name = f'ablations-{arg.variant}{suffix}'
  config.sweep = ml_collections.ConfigDict(dict(
      name=arg.variant,
      title=title + (' (smoke: tiny models, CPU workload)' if local else ''),
      base=BASES[base][local],
      runs=[dict(r, overrides={**common, **r['overrides']}) for r in runs_fn(local)],
      modes='bench,train' if arg.train else 'bench',
      train_base=TRAIN_BASES[local],
      train_sections=('data', 'train', 'optimizer', 'eval'),
      max_batch=(bool(arg.max_batch) if arg.max_batch >= 0
                 else arg.variant == 'table3' and not local),
      paper_setting=PAPER_SETTING,
      workdir=arg.workdir or f'workdirs/sweeps/{arg.variant}{suffix}',
  ))
  return config
