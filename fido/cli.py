"""run.py's command line: its help, flag checks and the user-error contract of `fido.errors`.

A user's mistake (a `UserError`, a flag absl rejects, a path that cannot be read or written) ends
the process with exit status 2 and one line on stderr, `error: <what, where, what to do>`; a bug
keeps its traceback (exit status 1). `FIDO_TRACEBACK=1` or `--verbosity=1` shows the traceback
of a user error too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import traceback
from typing import Callable, Iterator, Mapping, Sequence

from absl import app
from absl import flags

from fido import config as fido_config
from fido.errors import EXIT_USER_ERROR, UserError, did_you_mean

MODES: Mapping[str, str] = {
    'train': 'train (pre-train, fine-tune or uptrain) into --workdir, then evaluate on test',
    'eval': 'decode the checkpoints of the run in --workdir on a split and score them',
    'retrieve': 'BM25 passages for questions into --workdir: FiD files, recall@k (config.retrieve)',
    'predict': 'answer questions with the checkpoint in --workdir (config.predict); no gold needed',
    'bench': 'time encoder and decoder inference (config.bench)',
    'analyze': 'FLOPs, memory traffic and roofline of the model on --device',
    'compile_time': 'seconds to compile the decode loop and the train step (abstract shapes)',
    'sweep': 'run an ablation or seeds sweep (experiments/ablations.py, quality.py)',
    'convert': 'convert a Hugging Face T5 checkpoint to FiD/FiDO (config.convert)',
    'prepare': 'FiD files / corpus of config.data -> array_record under config.data.tfds',
    'data_bench': 'training data at scale, files vs tfds: memory, first batch, throughput',
    'show_config': 'print the resolved config (every field --config.x.y=... can set)',
}
DEFAULT_CONFIG = 'experiments/embedded.py:fido'
_CONFIG_FLAG = re.compile(r'^--?config(?:=(.*))?$')
_OVERRIDE_FLAG = re.compile(r'^--?config\.([\w.]+)(?:=.*)?$')


def _experiment_files(root: str) -> list[str]:
  return sorted(glob.glob(os.path.join(root, 'experiments', '*.py')))


def _summary(path: str) -> tuple[str, str]:
  """(first sentence of its docstring, its VARIANTS) of a config file; '' where it has none."""
  module = fido_config.load_config_module(path)
  doc = ' '.join((module.__doc__ or '').split())
  first = re.split(r'(?<=\.)\s', doc, maxsplit=1)[0].rstrip('.')
  first = first if len(first) <= 96 else first[:95].rsplit(' ', 1)[0] + ' …'
  return first, ', '.join(getattr(module, 'VARIANTS', ()))


def help_text(root: str = '.') -> str:
  """The text of `run.py --help`: modes, config files and their variants, common flags."""
  lines = ['usage: python run.py [--mode=MODE] [--config=FILE.py[:VARIANT,ARG=V,...]] '
           '[--config.FIELD=VALUE ...] [--workdir=DIR]', '',
           f'With no flags: --mode=train --config={DEFAULT_CONFIG} (the embedded default).', '',
           'modes:']
  lines += [f'  {mode:<12} {text}' for mode, text in MODES.items()]
  lines += ['', 'config files (--config=FILE:VARIANT; the docstring of each lists its arguments):']
  for path in _experiment_files(root):
    first, variants = _summary(path)
    lines.append(f'  {os.path.relpath(path, root)}  {first}')
    if variants:
      lines.append(f'      variants: {variants}')
  lines += ['', 'flags:',
            '  --workdir=DIR        train, eval, predict: the run (checkpoints, metrics.jsonl, '
            'eval_<split>/, predict_<name>/); retrieve: the index and retrieved files; sweep: '
            'results',
            '  --overwrite          train: delete what --workdir holds and start afresh',
            '  --device=NAME        analyze: a device of fido.analysis.DEVICES, or cpu (probed)',
            '  --config.FIELD=V     set any config field; list them with --mode=show_config',
            '  --verbosity=1        log verbosely (absl) and show the traceback of a user error',
            '', 'exit status: 0 done, 2 a mistake in the input (one line on stderr says what and '
            'where), 1 a bug (with its traceback).']
  return '\n'.join(lines)


def _config_spec(argv: Sequence[str]) -> str:
  spec = DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    match = _CONFIG_FLAG.match(arg)
    if match:
      spec = match.group(1) if match.group(1) is not None else (argv[i + 1] if i + 1 < len(argv)
                                                                   else '')
  return spec


def check_config_flags(argv: Sequence[str]) -> None:
  """Loads --config and checks that every --config.FIELD override names an existing field.

  Raises ConfigError naming the flag (with the closest field name) before absl and ml_collections
  get to it: their own reports are multi-screen tracebacks.
  """
  spec = _config_spec(argv)
  if not spec:
    raise fido_config.ConfigError('--config needs a value: FILE.py[:VARIANT]')
  config = fido_config.load_config_file(spec)
  for arg in argv:
    match = _OVERRIDE_FLAG.match(arg)
    if not match:
      continue
    node, parts = config, match.group(1).split('.')
    for i, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        raise fido_config.ConfigError(
            f'--config.{match.group(1)}: {spec} has no field config.{".".join(parts[:i + 1])}'
            f'{did_you_mean(part, keys)}; list the fields with --mode=show_config')
      node = node[part]


def precheck(argv: list[str]) -> None:
  """Answers --help and checks --config and its overrides, under the contract (exits on error).

  Call it before `config_flags.DEFINE_config_file`, which applies --config.FIELD overrides to the
  default config as soon as it is defined.
  """
  if any(a in ('-h', '--help', '-help', '--helpshort', '-?') for a in argv[1:]):
    print(help_text(os.path.dirname(os.path.abspath(argv[0]))))
    sys.exit(0)
  with user_errors_exit():
    check_config_flags(argv[1:])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; what it rejects becomes a UserError naming the flag."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    name = re.search(r"Unknown command line flag '([^']+)'", message)
    if name:
      message += did_you_mean(name.group(1), list(flags.FLAGS))
    raise UserError(f'{message}; see python run.py --help') from e


def describe(error: BaseException) -> str | None:
  """The one-line report of a user error, or None for a bug (which keeps its traceback)."""
  if isinstance(error, UserError):
    message = str(error)
  elif isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError,
                          NotADirectoryError, FileExistsError)) and error.filename:
    message = f'{error.filename}: {error.strerror}'
  else:
    return None
  return ' '.join(message.split()) or type(error).__name__


def _wants_traceback() -> bool:
  verbose = any(re.match(r'^--?(v|verbosity)=[1-9]', a) for a in sys.argv[1:])
  return os.environ.get('FIDO_TRACEBACK', '') not in ('', '0') or verbose


@contextlib.contextmanager
def user_errors_exit() -> Iterator[None]:
  """Turns a user error into `error: ...` on stderr and exit status 2; bugs pass through."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    message = describe(e)
    if message is None:
      raise
    if _wants_traceback():
      traceback.print_exc()
    print(f'error: {message}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) under the contract: exit 0, 2 with one line for a user error, 1 for a bug."""
  with user_errors_exit():
    app.run(main, flags_parser=parse_flags)
