"""Config assembly: the sections every experiment config has, each from the module that reads it.

`default_config()` is what an experiment file (experiments/*.py) starts from before it fills in
`config.model` and overrides the rest. It sits above the library (it imports the modules that own
the sections), so that `fido.config`, the schema the model reads, imports nothing of the library.
"""

import ml_collections

from fido import config as fido_config
from fido import convert_checkpoint, data_bench, eval_checkpoint, optim, sharding, train, train_step
from fido.data import sources


def default_config() -> ml_collections.ConfigDict:
  """The sections every experiment has; experiment files fill in `model` and override the rest."""
  train_config = train_step.default_config()
  train_config.update(train.default_loop_config())
  return ml_collections.ConfigDict(dict(
      name='',
      model=fido_config.model_config('tiny'),
      data=sources.default_data_config(),
      train=train_config,
      optimizer=optim.default_config(),
      init=train.default_init_config(),
      sharding=sharding.default_config(),
      eval=eval_checkpoint.default_config(),
      bench=fido_config.bench_config('paper'),
      convert=convert_checkpoint.default_config(),
      retrieve=fido_config.retrieve_config(),
      predict=fido_config.predict_config(),
      data_bench=data_bench.default_config(),
  ))
