"""fido/compile_time.py: the decode loop and the train step compile from abstract shapes."""

from fido import compile_time
from fido.config import load_config_file


def test_compile_times_of_a_tiny_fido_from_shapes():
  config = load_config_file('experiments/fido.py:tiny,smoke')
  config.train.batch_size = 2
  config.data.update(n_passages=2, passage_len=8, target_len=4)
  result = compile_time.compile_times(config)
  assert result['layers'] == {'encoder': 2, 'decoder': 4}
  for part in ('decode', 'train_step'):
    assert result[part]['total_s'] >= result[part]['compile_s'] > 0
  assert 'remat=none' in result['train_step']['workload']
  assert compile_time.format_row(result).startswith('| fido-tiny | 2 / 4 | ')
