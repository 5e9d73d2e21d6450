"""What uptraining buys (issue #6, "numbers to report"), on the synthetic retrieval-QA task at CPU scale.

  python experiments/uptrain_synthetic.py --root=workdirs/uptrain-synthetic
  python experiments/uptrain_synthetic.py --root=/tmp/up --pretrain_steps=20 --finetune_steps=10  # smoke

Stages, each a run of experiments/uptrain.py's config family (a finished stage is reused, an
interrupted one resumes):
  pretrain  a T5.1.1-style FiD ('micro': MHA, cross-attention in every layer) from scratch with span
            corruption on the synthetic corpus, exported to Hugging Face format (save_hf_t5): our own
            "public checkpoint", root/hf
  (a) fid        root/hf -> FiD (conversion with kv_heads = heads, K = 1: an exact import) -> fine-tune
  (b) uptrained  root/hf -> FiDO (LSA-2, multi-query) -> span corruption for `fraction` of the
                 pre-training steps -> fine-tune (uptraining's second moments carried over)
  (c) converted  root/hf -> FiDO -> fine-tune (nothing to carry: a converted checkpoint has no
                 optimizer state, like a public one)
  --scratch adds (d): FiDO fine-tuned from random init, the floor.
  --decoder_model=mini also pre-trains a FiD of that size (root/hf-mini) and makes (b), (c), (d)
  asymmetric: encoder from root/hf, decoder from root/hf-mini, new cross-attention K/V aligned.
All fine-tunings share the embedded default's recipe (fido_adafactor 1e-2 constant, batch 32, 3000
steps, no dropout, passage curriculum 1 -> 4 -> 10 passages). Prints one
JSON line per stage and writes root/results.json with test exact match / F1 of each.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from fido import checkpoint, convert, convert_fido, train  # noqa: E402  pylint: disable=g-import-not-at-top
from fido.config import load_config_file  # noqa: E402  pylint: disable=g-import-not-at-top
from fido.model.fid import init_params, make_model  # noqa: E402  pylint: disable=g-import-not-at-top

CONFIG = os.path.join(REPO, 'experiments', 'uptrain.py')


def get(stage: str, root: str, args, **extra) -> object:
  """experiments/uptrain.py's config for `stage`, with this comparison's shared settings."""
  fields = dict(model=extra.pop('model', args.model), synthetic=True, root=root, pretrain_steps=args.pretrain_steps,
                pretrain_batch=args.batch, pretrain_lr=args.pretrain_lr,
                pretrain_warmup=args.pretrain_warmup, lr=args.lr, **extra)
  arg = ','.join([stage] + [f'{k}={v}' for k, v in fields.items()])
  config = load_config_file(f'{CONFIG}:{arg}')
  config.data.dir = args.data_dir
  config.train.progress = args.progress
  return config


def timed(name, fn, results, args):
  start = time.perf_counter()
  out = fn()
  record = dict(stage=name, seconds=round(time.perf_counter() - start, 1), **(out or {}))
  print(json.dumps(record), flush=True)
  results[name] = record
  with open(os.path.join(args.root, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  return record


def pretrain_and_export(args, model: str, suffix: str = '') -> dict:
  config = get('pretrain', args.root, args, steps=args.pretrain_steps, batch=args.batch, model=model)
  workdir = os.path.join(args.root, 'pretrain' + suffix)
  result = train.run_train(config, workdir)
  model = make_model(config.model)
  abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True) as ckpt:
    _, params = ckpt.restore_params_only(abstract)
  hf_dir = convert.save_hf_t5(jax.device_get(params), config.model,
                              os.path.join(args.root, 'hf' + suffix))
  return dict(hf_dir=str(hf_dir), **{k: v for k, v in result.items() if k in ('step', 'train_seconds')})


def convert_stage(root, args, **variant) -> dict:
  config = get('convert', root, args, **variant)
  config.convert.update(encoder_checkpoint=os.path.join(args.root, 'hf'), overwrite=True)
  if args.decoder_model and config.model.decoder.size == args.decoder_model:
    config.convert.decoder_checkpoint = os.path.join(args.root, f'hf-{args.decoder_model}')
  return convert_fido.run_convert(config)['counts']


def finetune(root, args, workdir_name='finetune', **variant) -> dict:
  config = get('finetune', root, args, steps=args.finetune_steps, batch=args.batch, **variant)
  result = train.run_train(config, os.path.join(root, workdir_name))
  return {k: v for k, v in result.items() if k.startswith('test_') or k in ('step', 'train_seconds')}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='workdirs/uptrain-synthetic')
  parser.add_argument('--data_dir', default='data/generated/synthetic')
  parser.add_argument('--model', default='micro', help='T5.1.1 size of the pre-trained FiD')
  parser.add_argument('--pretrain_steps', type=int, default=2000)
  parser.add_argument('--pretrain_lr', type=float, default=1e-2)
  parser.add_argument('--pretrain_warmup', type=int, default=1000)
  parser.add_argument('--fraction', type=float, default=0.05, help='uptraining / pre-training steps')
  parser.add_argument('--finetune_steps', type=int, default=3000)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--lr', type=float, default=1e-2, help='fine-tuning learning rate (fido_adafactor)')
  parser.add_argument('--lsa', type=int, default=2)
  parser.add_argument('--stages', default='pretrain,a,b,c', help='comma-separated subset (+ d)')
  parser.add_argument('--scratch', action='store_true', help='also (d): FiDO from random init')
  parser.add_argument('--decoder_model', default='', help='e.g. mini: asymmetric FiDO (b)-(d)')
  parser.add_argument('--progress', action='store_true')
  args = parser.parse_args()
  os.makedirs(args.root, exist_ok=True)
  stages = args.stages.split(',') + (['d'] if args.scratch else [])
  results = {}
  path = os.path.join(args.root, 'results.json')
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  fid = dict(kv=0, lsa=1, fraction=0)
  fido = dict(kv=1, lsa=args.lsa)
  if args.decoder_model:
    fido['model'] = f'{args.model}-{args.decoder_model}'
  if 'pretrain' in stages:
    timed('pretrain', lambda: pretrain_and_export(args, args.model), results, args)
    if args.decoder_model:
      timed(f'pretrain_{args.decoder_model}', lambda: pretrain_and_export(
          args, args.decoder_model, f'-{args.decoder_model}'), results, args)
  if 'a' in stages:
    root = os.path.join(args.root, 'a-fid')
    timed('a_convert', lambda: convert_stage(root, args, **fid), results, args)
    timed('a_fid_finetune', lambda: finetune(root, args, **fid), results, args)
  if 'b' in stages:
    root = os.path.join(args.root, 'b-fido-uptrained')
    timed('b_convert', lambda: convert_stage(root, args, **fido), results, args)
    config = get('uptrain', root, args, fraction=args.fraction, batch=args.batch, **fido)
    timed('b_uptrain', lambda: {k: v for k, v in train.run_train(
        config, os.path.join(root, 'uptrain')).items() if k in ('step', 'train_seconds')},
          results, args)
    timed('b_fido_uptrained_finetune',
          lambda: finetune(root, args, fraction=args.fraction, **fido), results, args)
  if 'c' in stages:
    root = os.path.join(args.root, 'c-fido-converted')
    timed('c_convert', lambda: convert_stage(root, args, **fido), results, args)
    timed('c_fido_converted_finetune', lambda: finetune(root, args, fraction=0, **fido),
          results, args)
  if 'd' in stages:
    root = os.path.join(args.root, 'd-fido-scratch')
    def scratch():
      config = get('finetune', root, args, steps=args.finetune_steps, batch=args.batch, fraction=0,
                   **fido)
      config.init.checkpoint = ''
      result = train.run_train(config, os.path.join(root, 'finetune'))
      return {k: v for k, v in result.items() if k.startswith('test_') or k in ('step', 'train_seconds')}
    timed('d_fido_scratch_finetune', scratch, results, args)
  summary = {k: results[k].get('test_exact_match') for k in results if k.endswith('finetune')}
  print(json.dumps(dict(test_exact_match=summary)))


if __name__ == '__main__':
  main()
