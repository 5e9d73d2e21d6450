"""The single entrypoint: `python run.py --config=experiments/FILE.py:ARG --mode=MODE`.

Config fields can be overridden from the command line, e.g. `--config.bench.repeats=10`;
`python run.py --help` lists the modes and config files, `--mode=show_config` a config's fields.
A mistake in the input exits with status 2 and one line on stderr (`fido.cli`).
"""

import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from fido import cli
from fido.errors import UserError

cli.precheck(sys.argv)  # --help, and --config with its overrides, before absl applies them

_CONFIG = config_flags.DEFINE_config_file('config', cli.DEFAULT_CONFIG,
                                          'Experiment config file[:argument].')
_MODE = flags.DEFINE_enum('mode', 'train', list(cli.MODES), 'What to run.')
_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/embedded-fido',
                               'train: where checkpoints, metrics and the config go; sweep: the '
                               'results directory (default: config.sweep.workdir).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False,
                               'train: start afresh, deleting what the workdir holds (else a '
                               'run resumes, and a different run there is refused).')
_DEVICE = flags.DEFINE_string('device', 'tpu-v4',
                              'analyze: a device of fido.analysis.DEVICES, or "cpu" (probed).')


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}: flags are --name=value; see python run.py '
                    '--help')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO; -v 0 shows it
  config = _CONFIG.value
  if _MODE.value == 'show_config':
    print(config)
  elif _MODE.value == 'train':
    import json  # pylint: disable=g-import-not-at-top
    from fido import train  # pylint: disable=g-import-not-at-top
    print(json.dumps(train.run_train(config, _WORKDIR.value, overwrite=_OVERWRITE.value)))
  elif _MODE.value == 'eval':
    from fido import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run_eval(config)
  elif _MODE.value == 'bench':
    from fido import bench  # pylint: disable=g-import-not-at-top
    bench.run_bench(config)
  elif _MODE.value == 'sweep':
    from fido import sweep  # pylint: disable=g-import-not-at-top
    sweep.run_sweep(config, _WORKDIR.value if flags.FLAGS['workdir'].present else None)
  elif _MODE.value == 'convert':
    import json  # pylint: disable=g-import-not-at-top
    from fido import convert_fido  # pylint: disable=g-import-not-at-top
    print(json.dumps(convert_fido.run_convert(config)))
  elif _MODE.value == 'analyze':
    from fido import analysis  # pylint: disable=g-import-not-at-top
    analysis.run_analyze(config, _DEVICE.value)


if __name__ == '__main__':
  cli.run(main)
