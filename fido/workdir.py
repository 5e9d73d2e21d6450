"""A training run's workdir: its config.json (one run per workdir) and its metrics.jsonl."""

import json
import os
import shutil
from typing import Any

import ml_collections

from fido import multihost
from fido.config import MISSING, config_diff
from fido.errors import WorkdirError
from fido.files import atomic_write


def _comparable(config: ml_collections.ConfigDict) -> dict:
  """The parts of a config that define a run (not its length, logging or evaluation)."""
  d = config.to_dict()
  d.get('model', {}).pop('decoder_weights', None)  # inference only (training refuses all but float32)
  for section, fields in (('train', ('steps', 'log_every', 'eval_every', 'eval_examples',
                                     'progress', 'checkpoint_every', 'final_eval_split')),
                          ('eval', None), ('bench', None), ('data_bench', None), ('retrieve', None),
                          ('predict', None)):
    if fields is None:
      d.pop(section, None)
    else:
      for field in fields:
        d.get(section, {}).pop(field, None)
  return json.loads(json.dumps(d, default=str))


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  """Refuses to mix two different runs in one workdir; `overwrite` wipes it (a fresh start).

  Only a workdir holding a run's config.json is ever wiped (never, say, a mistyped `--workdir=.`).
  With many processes (one shared workdir), every process checks, process 0 writes, and all
  return together.
  """
  path = os.path.join(workdir, 'config.json')
  if overwrite and os.path.exists(path):
    if multihost.is_primary():
      shutil.rmtree(workdir)
  elif os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    # A field the saved config lacks was added to fido since: the run used its default.
    changed = sorted({name.split('.')[1] for name, old, _ in config_diff(
        previous, _comparable(config)) if old is not MISSING})
    if changed:
      raise WorkdirError(f'workdir {workdir!r} holds a different run (config sections differ: '
                         f'{changed}); use another --workdir or pass --overwrite to replace it')
  multihost.sync(f'check {path}')  # no process still reads what process 0 replaces
  if multihost.is_primary():
    atomic_write(path, json.dumps(_comparable(config), indent=1, sort_keys=True))
  multihost.sync(f'prepared {path}')


class MetricsWriter:
  """metrics.jsonl: one JSON line per logged step and per event (evaluation, rollback)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, **record: Any) -> None:
    if multihost.is_primary():
      with open(self.path, 'a') as f:
        f.write(json.dumps(record, default=float) + '\n')

  def find(self, step: int, event: str) -> dict[str, Any] | None:
    """The fields (less step and event) of the last record of `event` at `step`, if any."""
    found = None
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          record = json.loads(line)
          if record.get('step') == step and record.get('event') == event:
            found = {k: v for k, v in record.items() if k not in ('step', 'event')}
    return found
