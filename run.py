"""The single entrypoint: `python run.py --config=experiments/FILE.py:ARG --mode=MODE`.

Config fields can be overridden from the command line, e.g. `--config.bench.repeats=10`.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'experiments/fido.py:tiny,bench=tiny',
                                          'Experiment config file[:argument].')
_MODE = flags.DEFINE_enum('mode', 'bench', ['bench', 'analyze'], 'What to run.')
_DEVICE = flags.DEFINE_string('device', 'tpu-v4',
                              'analyze: a device of fido.analysis.DEVICES, or "cpu" (probed).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if _MODE.value == 'bench':
    from fido import bench  # pylint: disable=g-import-not-at-top
    bench.run_bench(config)
  elif _MODE.value == 'analyze':
    from fido import analysis  # pylint: disable=g-import-not-at-top
    analysis.run_analyze(config, _DEVICE.value)


if __name__ == '__main__':
  app.run(main)
