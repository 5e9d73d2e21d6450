"""The FiDO paper's quality claims at CPU scale, with error bars: every run is trained with several
seeds (parameter init, data order) on the embedded synthetic task (experiments/embedded.py), and
results.md reports test exact match per seed and its mean ± std. One run per variant cannot tell
the model from its seed; seeds also stand in for machines (another CPU rounds differently).

  python run.py --mode=sweep --config=experiments/quality.py:robustness    # FiDO and FiD defaults
  python run.py --mode=sweep --config=experiments/quality.py:components    # Table 3 / Figure 5
  python run.py --mode=sweep --config=experiments/quality.py:light         # Table 4
  python run.py --mode=sweep --config=experiments/quality.py:pretraining   # §3.2, appendix A
  python run.py --mode=sweep --config=experiments/quality.py:robustness,seeds=3 --workdir=/tmp/r

Sweeps:
  robustness   the embedded FiDO default and its FiD baseline (5 seeds by default).
  components   FiD, + layer-sparse cross-attention (LSA-2), + multi-query attention, + the
               asymmetric (larger) decoder = the FiDO default: the paper's Table 3 direction.
  light        on passages whose answer follows two filler sentences (48 tokens): FiD, FiD-Light
               (the decoder reads the first 48 / 2 tokens of each passage) and FiD-LSA (Table 4:
               FiD-Light should lose more).
  pretraining  a FiD pre-trained with span corruption on the synthetic corpus, then fine-tuned:
               from random init vs pre-trained (second moments carried over, or fresh: appendix A),
               directly vs through a Hugging Face export and import (the public-checkpoint path),
               and FiDO (symmetric: LSA-2, multi-query) converted from it, with and without
               uptraining (5% of the pre-training steps of span corruption after conversion, §3.2).
Arguments: the sweep name; seeds=N (the seeds 0..N-1; default 5 for robustness, else 3);
smoke (the embedded smoke data and a few steps: for tests); workdir=PATH.
"""

from typing import Any

import ml_collections

from fido import config as fido_config

EMBEDDED = 'experiments/embedded.py'
LSA = {'model.decoder.cross_attention_period': 2}
MQ = {'model.decoder.num_kv_heads': 1, 'model.decoder.cross_num_kv_heads': 1}
PRETRAIN_STEPS = 1000
PRETRAIN_LR = 2e-2  # the embedded default's fine-tuning rate (T5 pre-trained at 1e-2)


def run(name: str, base: str, overrides: dict[str, Any] | None = None, **refs: str) -> dict:
  return dict(name=name, base=base, overrides=dict(overrides or {}), paper={}, group='',
              series='', x=None, **refs)


def robustness(spec: str) -> list[dict]:
  return [run('FiDO', f'{EMBEDDED}:fido{spec}'), run('FiD', f'{EMBEDDED}:fid{spec}')]


def components(spec: str) -> list[dict]:
  fid = f'{EMBEDDED}:fid{spec}'
  return [run('FiD', fid), run('FiD + LSA', fid, LSA), run('FiD + LSA + MQ', fid, {**LSA, **MQ}),
          run('FiDO (+ asymmetric decoder)', f'{EMBEDDED}:fido{spec}')]


def light(spec: str) -> list[dict]:
  fid = f'{EMBEDDED}:fid,late{spec}'
  return [run('FiD', fid), run('FiD-Light (k = 2)', fid, {'model.fid_light_k': 2}),
          run('FiD-LSA', fid, LSA)]


def pretraining(spec: str, steps: int = PRETRAIN_STEPS) -> list[dict]:
  """Span corruption (T5's recipe shrunk: lr PRETRAIN_LR constant for `steps` / 2 steps, then
  1/sqrt) on the corpus of the synthetic training records, 64-token inputs, batch 32."""
  # The FiD is exported to Hugging Face T5, whose stacks share one head layout: its decoder takes
  # the encoder's (8 heads of 8). FiDO here is symmetric too: it converts from that FiD.
  fid = f'{EMBEDDED}:fid{spec}'
  exportable = {'model.decoder.size': 'custom', 'model.decoder.num_heads': 8,
                'model.decoder.d_kv': 8, 'model.decoder.num_kv_heads': 8,
                'model.decoder.cross_num_kv_heads': 8}
  fido = {**exportable, **LSA, **MQ}
  pretrain = {**exportable, 'train.task': 'pretrain', 'data.curriculum.n_passages': (),
              'data.curriculum.steps': (), 'data.inputs_length': 64, 'train.batch_size': 32,
              'train.steps': steps, 'train.eval_every': 0, 'train.final_eval_split': '',
              'optimizer.schedule': 'rsqrt', 'optimizer.warmup_steps': steps // 2,
              'optimizer.learning_rate': PRETRAIN_LR}
  # Uptraining continues where the schedule ended, at a constant rate (experiments/uptrain.py).
  uptrain = {**pretrain, 'train.steps': max(1, steps // 20), 'optimizer.schedule': 'constant',
             'optimizer.learning_rate': PRETRAIN_LR * (0.5 ** 0.5)}
  fresh = {'init.carry_second_moments': False}
  return [
      run('pre-train FiD', fid, pretrain),
      run('FiD, random init', fid, exportable),
      run('FiD, pre-trained', fid, exportable, init_from='pre-train FiD'),
      run('FiD, pre-trained, fresh second moments', fid, {**exportable, **fresh},
          init_from='pre-train FiD'),
      run('FiD, pre-trained, via HF export', fid, exportable, convert_from='pre-train FiD'),
      run('FiDO, random init', fid, fido),
      run('FiDO, converted', fid, fido, convert_from='pre-train FiD'),
      run('uptrain FiDO', fid, {**uptrain, **fido}, convert_from='pre-train FiD'),
      run('FiDO, converted and uptrained', fid, fido, init_from='uptrain FiDO'),
  ]


SWEEPS = {
    'robustness': (robustness, 5, 'The embedded default over seeds: FiDO and its FiD baseline'),
    'components': (components, 3, 'FiD to FiDO, one component at a time (Table 3 / Figure 5 '
                                  'direction)'),
    'light': (light, 3, 'FiD-Light vs FiD-LSA with late answers (Table 4 direction)'),
    'pretraining': (pretraining, 3, 'Pre-training, second-moment carry-over, conversion and '
                                    'uptraining (§3.2, appendix A)'),
}


VARIANTS = tuple(SWEEPS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = fido_config.parse_arg(arg, variants=VARIANTS, variant='', seeds=0, smoke=False,
                              workdir='')
  runs_fn, default_seeds, title = SWEEPS[arg.variant]
  spec = ',smoke' if arg.smoke else ''
  runs = runs_fn(spec, 4) if arg.variant == 'pretraining' and arg.smoke else runs_fn(spec)
  for r in runs:
    r['overrides'] = {'train.progress': False, **r['overrides']}
  config = ml_collections.ConfigDict()
  config.name = f'quality-{arg.variant}' + '-smoke' * arg.smoke
  config.sweep = ml_collections.ConfigDict(dict(
      name=arg.variant, title=title, base=runs[0]['base'], runs=runs, modes='train',
      seeds=tuple(range(arg.seeds or default_seeds)), train_base='', train_sections=(),
      max_batch=False, paper_setting='',
      workdir=arg.workdir or f'workdirs/quality/{arg.variant}' + '-smoke' * arg.smoke))
  return config
