"""FiDO from a public T5.1.1 checkpoint (issue #6): convert -> uptrain -> fine-tune, one config family.

The paper's FiDO needs pre-training from scratch. Instead: convert public T5.1.1 checkpoints (mean-
pooled multi-query heads, layer-sparse cross-attention, encoder and decoder from two sizes;
fido/convert_fido.py), continue pre-training with span corruption for a small `fraction` of the
original pre-training (GQA, Ainslie et al., 2023, uptrain with 5% of the pre-training compute), then
fine-tune as usual, carrying the uptraining's second moments over (FiDO appendix A).

  R=/ckpt/fido-base-xl   DATA="--config.data.source=files --config.data.tokenizer=/t5/spiece.model"
  python run.py --mode=convert --config=experiments/uptrain.py:convert,model=base-xl,root=$R \
    --config.convert.encoder_checkpoint=/hf/t5-v1_1-base --config.convert.decoder_checkpoint=/hf/t5-v1_1-xl \
    $DATA --config.data.corpus=/data/c4-sample.txt        # corpus: tokens for the aligned cross K/V init
  python run.py --mode=train --config=experiments/uptrain.py:uptrain,model=base-xl,root=$R --workdir=$R/uptrain \
    $DATA --config.data.corpus=/data/c4.txt
  python run.py --mode=train --config=experiments/uptrain.py:finetune,model=base-xl,root=$R --workdir=$R/finetune \
    $DATA --config.data.train=/data/nq/train.json --config.data.dev=/data/nq/dev.json \
    --config.data.test=/data/nq/test.json --config.data.n_passages=40 --config.data.passage_len=256

  # CPU smoke test of the whole chain on the synthetic task (tiny models; HF input from
  # experiments/uptrain_synthetic.py's sweep (runs/pretrain-FiD/hf), or any T5.1.1 directory):
  python run.py --mode=convert --config=experiments/uptrain.py:convert,smoke,encoder=$HF,root=/tmp/up
  python run.py --mode=train --config=experiments/uptrain.py:uptrain,smoke,root=/tmp/up --workdir=/tmp/up/uptrain
  python run.py --mode=train --config=experiments/uptrain.py:finetune,smoke,root=/tmp/up --workdir=/tmp/up/finetune

Variants (the stage): convert | uptrain | finetune, and pretrain (a T5.1.1-style FiD of the encoder
size from scratch: the synthetic comparison's own "public checkpoint"). All stages of one `root`
share the model, so each stage's checkpoint fits the next:
  convert   config.convert -> root/converted (orbax step 0, params only, conversion_report.json)
  uptrain   span corruption from root/converted (no optimizer state: carry_second_moments=False)
            for fraction x pretrain_steps x pretrain_batch / batch steps, at a constant learning rate
            equal to where T5's schedule (pretrain_lr, 1/sqrt decay after pretrain_warmup) ended: over
            the next 5% of steps the continued 1/sqrt schedule would fall only 2.4%, and restarting
            its warm-up at 1e-2 would be a 10x jump on converged weights.
  finetune  QA from the workdir root/uptrain (second moments carried over), or, with fraction=0,
            from root/converted without uptraining (nothing to carry).
Arguments: model=ENC-DEC or SIZE (T5.1.1 size names, e.g. base-xl, base, micro-mini), lsa=K
(default: 6 capped at the decoder depth), kv=N decoder self/cross kv heads (1 = MQ, 0 = MHA), fraction,
pretrain_steps/pretrain_batch/pretrain_lr/pretrain_warmup (the source checkpoints' pre-training; default
the T5 paper's: 1M steps of 2048 sequences, 1e-2 for 10k steps then 1/sqrt), batch, steps (0 = stage default), lr
(fine-tuning), root, encoder/decoder (HF checkpoint directories), synthetic (the embedded synthetic
task: experiments/embedded.py's data, vocabulary and fine-tuning recipe, no dropout), smoke
(synthetic, tiny and a few steps: for CPUs and tests).
"""

import math
import os

from fido import config as fido_config
from fido import convert_checkpoint
from fido import experiment
from fido import optim

STAGES = ('convert', 'uptrain', 'finetune', 'pretrain')
VARIANTS = STAGES


def _sizes(model: str) -> tuple[str, str]:
  encoder, _, decoder = model.partition('-')
  return encoder, decoder or encoder


def get_config(arg: str | None = None):
  arg = fido_config.parse_arg(
      arg, variants=VARIANTS, variant='finetune', model='base-xl', lsa=0, kv=1, fraction=0.05,
      pretrain_steps=1_000_000, pretrain_batch=2048, pretrain_lr=1e-2, pretrain_warmup=10_000,
      batch=0, steps=0, lr=1e-3, root='workdirs/uptrain', encoder='', decoder='', synthetic=False,
      smoke=False)
  synthetic = arg.synthetic or arg.smoke
  if arg.smoke and arg.model == 'base-xl':
    arg.model = 'micro'
  encoder, decoder = _sizes(arg.model)
  if arg.variant == 'pretrain':  # a plain FiD (T5.1.1) of the encoder size, from scratch
    decoder, kv, lsa = encoder, None, 1
  else:
    kv = arg.kv or None
    lsa = arg.lsa or min(6, fido_config.stack_config(decoder).num_layers)

  config = experiment.default_config()
  config.name = f'uptrain-{arg.variant}-{arg.model}'
  embedded = fido_config.load_config_file(  # the synthetic task's data and vocabulary
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'embedded.py') + ':fid'
  ) if synthetic else None
  vocab = embedded.model.vocab_size if synthetic else fido_config.T5_VOCAB_SIZE
  # Synthetic fine-tuning follows the embedded default's recipe (experiments/embedded.py): no
  # dropout, and the passage curriculum below.
  dropout = 0.1 if arg.variant == 'finetune' and not synthetic else 0.0
  config.model = fido_config.model_config(
      encoder, decoder, cross_attention_period=lsa, decoder_kv_heads=kv, cross_kv_heads=kv,
      vocab_size=vocab, dropout_rate=dropout)
  config.convert = convert_checkpoint.default_config()
  converted = os.path.join(arg.root, 'converted')
  uptrained = os.path.join(arg.root, 'uptrain')
  config.convert.update(encoder_checkpoint=arg.encoder, decoder_checkpoint=arg.decoder,
                        out_dir=converted)
  if synthetic:
    config.data = embedded.data
    config.data.inputs_length = 64
    config.convert.alignment.update(num_sequences=64, length=64)
  pretrain_optimizer = optim.pretraining_config()
  pretrain_optimizer.update(learning_rate=arg.pretrain_lr, warmup_steps=arg.pretrain_warmup)

  if arg.variant == 'pretrain':
    config.optimizer = pretrain_optimizer
    config.train.update(task='pretrain', batch_size=arg.batch or arg.pretrain_batch,
                        steps=arg.steps or arg.pretrain_steps, checkpoint_every=1000, log_every=100)
  elif arg.variant == 'uptrain':
    batch = arg.batch or arg.pretrain_batch
    steps = arg.steps or max(1, round(arg.fraction * arg.pretrain_steps * arg.pretrain_batch / batch))
    # Continue T5's schedule where it ended: lr * sqrt(warmup / max(steps, warmup)), held constant.
    end_lr = arg.pretrain_lr * math.sqrt(arg.pretrain_warmup / max(arg.pretrain_steps,
                                                                    arg.pretrain_warmup))
    config.optimizer = pretrain_optimizer
    config.optimizer.update(learning_rate=end_lr, schedule='constant')
    config.train.update(task='pretrain', batch_size=batch, steps=steps,
                        checkpoint_every=min(steps, 5000), log_every=min(steps, 100))
    config.init.update(checkpoint=converted, carry_second_moments=False)
  elif arg.variant == 'finetune':
    config.optimizer.update(name='fido_adafactor', learning_rate=arg.lr, schedule='constant')
    config.train.update(task='finetune', batch_size=arg.batch or 64, steps=arg.steps or 10_000,
                        eval_every=1000, checkpoint_every=1000, log_every=100,
                        final_eval_split='test')
    # Without uptraining (fraction=0) the converted checkpoint has no second moments to carry.
    config.init.update(checkpoint=uptrained if arg.fraction > 0 else converted,
                       carry_second_moments=arg.fraction > 0)

  if synthetic:
    config.train.update(log_every=min(config.train.log_every, 50),
                        eval_every=min(config.train.eval_every, 500), eval_examples=100)
    config.eval.update(batch_size=50)
    if arg.variant != 'finetune' or arg.smoke:
      config.data.curriculum.update(n_passages=(), steps=())
  if arg.smoke:
    config.data.synthetic.update(n_train=64, n_dev=16, n_test=16)
    config.data.dir = 'data/generated/synthetic-smoke'
    config.data.inputs_length = 32
    config.convert.alignment.update(num_sequences=16, length=32)
    small = dict(pretrain=6, uptrain=2, finetune=4, convert=1)[arg.variant]
    config.train.update(batch_size=arg.batch or 4, steps=arg.steps or small, log_every=2,
                        eval_every=2 if arg.variant == 'finetune' else 0, eval_examples=8,
                        checkpoint_every=2)
    config.eval.update(batch_size=8)
  return config

