"""experiments/quality.py: every sweep expands into valid runs before anything trains."""

import pytest

from fido import config as fido_config
from fido import sweep
from fido.config import ConfigError

QUALITY = 'experiments/quality.py'


@pytest.mark.parametrize('name', ['robustness', 'components', 'light', 'pretraining'])
def test_every_quality_sweep_expands_into_valid_runs(name):
  config = fido_config.load_config_file(f'{QUALITY}:{name},seeds=3')
  runs = sweep.expand_runs(config.sweep, ('train',))
  assert len(runs) == 3 * len(config.sweep.runs)
  assert {r.config.train.seed for r in runs} == {0, 1, 2}


def test_pretraining_exports_a_fid_that_hugging_face_t5_can_hold():
  config = fido_config.load_config_file(f'{QUALITY}:pretraining')
  runs = {r.spec['name']: r.config for r in sweep.expand_runs(config.sweep, ('train',))}
  source = runs['pre-train FiD'].model
  assert (source.decoder.num_heads, source.decoder.d_kv) == (source.encoder.num_heads,
                                                             source.encoder.d_kv)
  assert runs['FiD, random init'].model == runs['FiD, pre-trained'].model == source


def test_converting_from_a_run_hugging_face_cannot_hold_fails_before_anything_runs():
  config = fido_config.load_config_file(f'{QUALITY}:pretraining')
  runs = list(config.sweep.runs)
  runs[0] = {**runs[0], 'overrides': {k: v for k, v in runs[0]['overrides'].items()
                                      if not k.startswith('model.decoder.')}}
  config.sweep.runs = runs
  with pytest.raises(ConfigError, match=r"run 'FiD, pre-trained, via HF export': convert_from="
                                        r"'pre-train FiD' cannot be exported.*num_heads"):
    sweep.expand_runs(config.sweep, ('train',))
