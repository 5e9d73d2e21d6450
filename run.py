"""The single entrypoint: `python run.py --config=experiments/FILE.py:ARG --mode=MODE`.

Config fields can be overridden from the command line, e.g. `--config.bench.repeats=10`;
`python run.py --help` lists the modes and config files, `--mode=show_config` a config's fields.
A mistake in the input exits with status 2 and one line on stderr (`fido.cli`).
"""

import json
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
                               'train, eval and predict: the run\'s directory (checkpoints, '
                               'metrics, the config; eval writes eval_<split>/ there, predict '
                               'predict_<name>/); retrieve: where the index and the retrieved '
                               'files go; sweep: the results directory (default: '
                               'config.sweep.workdir).')
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
  mode, workdir_given = _MODE.value, flags.FLAGS['workdir'].present
  if mode == 'show_config':
    print(config)
  elif mode == 'train':
    # Something on screen at once: importing the training stack and starting up take seconds.
    print(f'{config.name}: training in {_WORKDIR.value}', file=sys.stderr, flush=True)
    from fido import train  # pylint: disable=g-import-not-at-top
    _print_json(train.run_train(config, _WORKDIR.value, overwrite=_OVERWRITE.value))
  elif mode == 'eval':
    from fido import eval_checkpoint  # pylint: disable=g-import-not-at-top
    _print_json(eval_checkpoint.run_eval(config, _WORKDIR.value, default_workdir=not workdir_given))
  elif mode == 'retrieve':
    from fido import retrieve  # pylint: disable=g-import-not-at-top
    _print_json(retrieve.run_retrieve(
        config, _WORKDIR.value if workdir_given else retrieve.DEFAULT_WORKDIR))
  elif mode == 'predict':
    from fido import predict  # pylint: disable=g-import-not-at-top
    _print_json(predict.run_predict(config, _WORKDIR.value))
  elif mode == 'bench':
    from fido import bench  # pylint: disable=g-import-not-at-top
    for result in bench.run_bench(config):  # one line per result as it is measured
      _print_json(result)
  elif mode == 'sweep':
    from fido import sweep, sweep_report  # pylint: disable=g-import-not-at-top
    results = sweep.run_sweep(config, _WORKDIR.value if workdir_given else None)
    print(sweep_report.results_markdown(config.sweep, results), flush=True)
  elif mode == 'convert':
    from fido import convert_checkpoint  # pylint: disable=g-import-not-at-top
    _print_json(convert_checkpoint.run_convert(config))
  elif mode == 'analyze':
    from fido import analyze  # pylint: disable=g-import-not-at-top
    results = analyze.run_analyze(config, _DEVICE.value)
    print(analyze.format_table(results))
    _print_json(results)
  elif mode == 'prepare':
    from fido import prepare  # pylint: disable=g-import-not-at-top
    _print_json(prepare.run_prepare(config))
  elif mode == 'data_bench':
    from fido import data_bench  # pylint: disable=g-import-not-at-top
    _print_json(data_bench.run_data_bench(config))
  elif mode == 'compile_time':
    from fido import compile_time  # pylint: disable=g-import-not-at-top
    _print_json(compile_time.compile_times(config))


def _print_json(result) -> None:
  """A mode's result on stdout: one JSON line per dict (a list: one line per element)."""
  for line in result if isinstance(result, list) else [result]:
    print(json.dumps(line), flush=True)

if __name__ == '__main__':
  cli.run(main)
