"""What uptraining buys (issue #6) on the synthetic retrieval-QA task at CPU scale, as a sweep.

  python run.py --mode=sweep --config=experiments/uptrain_synthetic.py --workdir=workdirs/uptrain-synthetic
  python run.py --mode=sweep --config=experiments/uptrain_synthetic.py:smoke     # seconds: tests

Each run is a stage of experiments/uptrain.py's config family (`fido.sweep` runs them in order; a
finished run is reused, an interrupted one resumes):
  pretrain FiD          a T5.1.1-style FiD ('micro': MHA, cross-attention in every layer) from
                        scratch, span corruption on the synthetic corpus. The runs below convert it
                        through a Hugging Face export (fido.convert.save_hf_t5): our own "public
                        checkpoint".
  (a) FiD               converted (kv_heads = heads, K = 1: an exact import), fine-tuned
  uptrain FiDO          converted to FiDO (LSA-2, multi-query), then span corruption for `fraction`
                        of the pre-training steps
  (b) FiDO, uptrained   fine-tuned from the uptraining (its second moments carried over)
  (c) FiDO, converted   fine-tuned from the conversion (nothing to carry: a converted checkpoint
                        has no optimizer state, like a public one)
  (d) FiDO, scratch     with `scratch`: fine-tuned from random init, the floor
All fine-tunings share the embedded default's recipe (fido_adafactor 1e-2 constant, no dropout,
passage curriculum). results.md reports each run's test exact match.
Arguments: model (the pre-trained FiD's T5.1.1 size, default micro), pretrain_steps, pretrain_lr,
pretrain_warmup, fraction (uptraining / pre-training steps), finetune_steps, batch, lr
(fine-tuning), lsa (FiDO's cross-attention period), scratch, smoke (tiny data and a few steps:
for tests), workdir=PATH.
"""

import ml_collections

from fido import config as fido_config

UPTRAIN = 'experiments/uptrain.py'


def run(name: str, stage: str, fields: dict, overrides: dict | None = None, **refs: str) -> dict:
  """A sweep run of experiments/uptrain.py's `stage` with these config arguments."""
  base = f'{UPTRAIN}:' + ','.join([stage] + [f'{k}={v}' for k, v in fields.items()])
  return dict(name=name, base=base, overrides={'train.progress': False, **(overrides or {})},
              paper={}, group='', series='', x=None, **refs)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = fido_config.parse_arg(arg, model='micro', pretrain_steps=2000, pretrain_lr=1e-2,
                              pretrain_warmup=1000, fraction=0.05, finetune_steps=3000, batch=32,
                              lr=1e-2, lsa=2, scratch=False, smoke=False, workdir='')
  if arg.smoke:  # uptrain.py's smoke: tiny data, its own few steps and batches
    common = dict(model=arg.model, smoke=True)
    steps = dict(pretrain={}, uptrain={}, finetune={})
  else:
    common = dict(model=arg.model, synthetic=True, pretrain_steps=arg.pretrain_steps,
                  pretrain_batch=arg.batch, pretrain_lr=arg.pretrain_lr,
                  pretrain_warmup=arg.pretrain_warmup, lr=arg.lr)
    steps = dict(pretrain=dict(steps=arg.pretrain_steps, batch=arg.batch),
                 uptrain=dict(batch=arg.batch),  # steps: fraction x pre-training (uptrain.py)
                 finetune=dict(steps=arg.finetune_steps, batch=arg.batch))
  fid = dict(common, kv=0, lsa=1, fraction=0)
  fido = dict(common, kv=1, lsa=arg.lsa)
  pretrain = 'pretrain FiD'
  runs = [
      run(pretrain, 'pretrain', {**common, **steps['pretrain']}),
      run('(a) FiD', 'finetune', {**fid, **steps['finetune']}, convert_from=pretrain),
      run('uptrain FiDO', 'uptrain', {**fido, 'fraction': arg.fraction, **steps['uptrain']},
          convert_from=pretrain),
      run('(b) FiDO, uptrained', 'finetune',
          {**fido, 'fraction': arg.fraction, **steps['finetune']}, init_from='uptrain FiDO'),
      run('(c) FiDO, converted', 'finetune', {**fido, 'fraction': 0, **steps['finetune']},
          convert_from=pretrain),
  ]
  if arg.scratch:
    runs.append(run('(d) FiDO, scratch', 'finetune', {**fido, 'fraction': 0, **steps['finetune']},
                    {'init.checkpoint': ''}))
  config = ml_collections.ConfigDict()
  config.name = 'uptrain-synthetic' + '-smoke' * arg.smoke
  config.sweep = ml_collections.ConfigDict(dict(
      name='uptrain-synthetic', title='What uptraining buys: pre-trained FiD -> FiD / FiDO',
      base=runs[0]['base'], runs=runs, modes='train', seeds=(), train_base='',
      train_sections=(), max_batch=False, paper_setting='',
      workdir=arg.workdir or 'workdirs/uptrain-synthetic' + '-smoke' * arg.smoke))
  return config
