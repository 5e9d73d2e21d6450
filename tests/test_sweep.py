"""Sweeps (fido/sweep.py, experiments/ablations.py) and the max-batch search (fido/max_batch.py)."""

import json
import os

import jax
import ml_collections
import pytest

from fido import analysis, bench, max_batch, sweep
from fido import train as train_lib
from fido.config import ConfigError, load_config_file
from fido.model.fid import make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join(REPO, 'experiments/ablations.py')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def sweep_config(workdir, runs, *, modes='bench', base='experiments/fido.py:tiny,smoke',
                 train_base='', max_batch=False, seeds=()):
  return ml_collections.ConfigDict(dict(name='test', sweep=dict(
      name='test', title='test sweep', base=os.path.join(REPO, base), runs=runs, modes=modes,
      seeds=seeds,
      train_base=os.path.join(REPO, train_base) if train_base else '',
      train_sections=('data', 'train', 'optimizer', 'eval'), max_batch=max_batch,
      paper_setting='made up', workdir=str(workdir))))


def run(name, overrides=None, **kwargs):
  return dict(dict(name=name, overrides=overrides or {}, paper={}, group='', series='', x=None),
              **kwargs)


def counting_fake_bench(calls):
  """A stand-in for bench.bench_model: records the configs, yields plausible results."""
  def fake(config):
    calls.append(config)
    for b in config.bench.batch_sizes:
      yield dict(name=config.name, batch=b, n_passages=config.bench.n_passages,
                 passage_len=config.bench.passage_len, target_len=config.bench.target_len,
                 encoder_ms=1.0, decoder_ms=float(config.model.decoder.cross_attention_period),
                 total_ms=1.0 + config.model.decoder.cross_attention_period, repeats=1,
                 device='fake', num_devices=1, dtype='float32')
  return fake


def table_lines(workdir):
  """The rows of the first table of results.md (the speed table), header first."""
  with open(os.path.join(workdir, 'results.md')) as f:
    tables = f.read().split('\n\n')
  first = next(t for t in tables if t.startswith('| '))
  return [line for line in first.splitlines() if line.startswith('| ')]  # not the |---|


def assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC, path


def test_sweep_writes_reports_and_resumes(tmp_path, monkeypatch):
  repeats = {'bench.repeats': 1, 'bench.warmup': 0}
  runs = [run('LSA-4', {**repeats, 'model.decoder.cross_attention_period': 4},
              paper=dict(total_ms=10.0), group='lsa_period', x=4),
          run('LSA-2', {**repeats, 'model.decoder.cross_attention_period': 2},
              paper=dict(total_ms=5.0), group='lsa_period', x=2)]
  config = sweep_config(tmp_path, runs)
  results = sweep.run_sweep(config, str(tmp_path), verbose=False)   # real benchmarks
  assert [r['name'] for r in results] == ['LSA-4', 'LSA-2']
  assert all(r['bench'][0]['encoder_ms'] > 0 and r['bench'][0]['batch'] == 2 for r in results)
  for name in ('LSA-4', 'LSA-2'):
    with open(tmp_path / 'runs' / name / 'result.json') as f:
      stored = json.load(f)
    assert stored['name'] == name and stored['config']['model']['decoder'][
        'cross_attention_period'] == int(name[-1])
  with open(tmp_path / 'results.jsonl') as f:
    assert [json.loads(line)['name'] for line in f] == ['LSA-4', 'LSA-2']
  header, *rows = table_lines(tmp_path)
  assert 'encoder ms' in header and 'decoder ms' in header and 'paper total ×' in header
  assert [row.split('|')[1].strip() for row in rows] == ['LSA-4', 'LSA-2']
  assert '0.50×' in rows[1]   # the paper's ratio to the first row
  assert_png(tmp_path / 'breakdown.png')
  assert_png(tmp_path / 'time_vs_lsa_period.png')

  # A second run skips both finished runs; a deleted result is redone, alone.
  calls = []
  monkeypatch.setattr(bench, 'bench_model', counting_fake_bench(calls))
  again = sweep.run_sweep(config, str(tmp_path), verbose=False)
  assert calls == [] and again == results
  os.remove(tmp_path / 'runs' / 'LSA-2' / 'result.json')
  sweep.run_sweep(config, str(tmp_path), verbose=False)
  assert [c.name for c in calls] == ['test/LSA-2']
  # A stored result made from a different config is refused, not silently reused.
  runs[0]['overrides']['bench.target_len'] = 3
  with pytest.raises(ConfigError, match='different config'):
    sweep.run_sweep(sweep_config(tmp_path, runs), str(tmp_path), verbose=False)


def test_train_mode_trains_each_distinct_model_once(tmp_path, monkeypatch):
  bench_calls, trained = [], []
  monkeypatch.setattr(bench, 'bench_model', counting_fake_bench(bench_calls))

  def fake_train(config, workdir):
    trained.append((config.name, workdir))
    return dict(workdir=workdir, step=config.train.steps, test_exact_match=0.25, test_f1=0.5)

  monkeypatch.setattr(train_lib, 'run_train', fake_train)
  runs = [run('A'), run('B', {'bench.target_len': 8}),
          run('C', {'model.decoder.cross_attention_period': 1})]
  config = sweep_config(tmp_path, runs, modes='bench,train',
                        base='experiments/embedded.py:fido',
                        train_base='experiments/embedded.py:fido,smoke')
  results = sweep.run_sweep(config, str(tmp_path), verbose=False)
  assert [name for name, _ in trained] == ['test/A', 'test/C']
  assert trained[0][1] == str(tmp_path / 'runs' / 'A')
  assert results[0]['config']['train']['steps'] == 6   # the smoke sections were used
  assert results[1]['train']['shared_with'] == 'A'
  header, *rows = table_lines(tmp_path)
  assert 'EM' in header and all('0.25' in row for row in rows)
  assert_png(tmp_path / 'em_vs_time.png')
  sweep.run_sweep(config, str(tmp_path), verbose=False)
  assert len(trained) == 2 and len(bench_calls) == 3


def test_training_sweeps_cache_compiled_programs_in_the_workdir(tmp_path, monkeypatch):
  """Seeds of one run compile the same programs: a training sweep keeps them in workdir/jax_cache
  unless a cache is already configured (JAX_COMPILATION_CACHE_DIR); a bench sweep never does."""
  monkeypatch.setattr(bench, 'bench_model', counting_fake_bench([]))
  monkeypatch.setattr(train_lib, 'run_train', lambda config, workdir: dict(
      workdir=workdir, step=1, test_exact_match=0.5, test_f1=0.5))
  configured = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    sweep.run_sweep(sweep_config(tmp_path / 'b', [run('A')]), str(tmp_path / 'b'), verbose=False)
    assert jax.config.jax_compilation_cache_dir is None
    config = sweep_config(tmp_path / 't', [run('A')], modes='train', seeds=(0, 1),
                          base='experiments/embedded.py:fido,smoke')
    sweep.run_sweep(config, str(tmp_path / 't'), verbose=False)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 't' / 'jax_cache')
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'mine'))
    sweep.run_sweep(config, str(tmp_path / 't2'), verbose=False)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'mine')
  finally:
    jax.config.update('jax_compilation_cache_dir', configured)


def test_seeds_train_every_run_once_per_seed_and_report_mean_and_std(tmp_path, monkeypatch):
  bench_calls, trained = [], []
  monkeypatch.setattr(bench, 'bench_model', counting_fake_bench(bench_calls))

  def fake_train(config, workdir):
    trained.append((config.name, config.train.seed, workdir, config.init.checkpoint))
    em = {'A': 0.9, 'B': 0.5}[config.name[-1]] + 0.01 * config.train.seed
    return dict(workdir=workdir, step=1, test_exact_match=em, test_f1=em, train_seconds=10.0)

  monkeypatch.setattr(train_lib, 'run_train', fake_train)
  runs = [run('A'), run('B', {'model.decoder.cross_attention_period': 1}, init_from='A')]
  config = sweep_config(tmp_path, runs, modes='bench,train', base='experiments/embedded.py:fido',
                        train_base='experiments/embedded.py:fido,smoke', seeds=(0, 1, 2))
  results = sweep.run_sweep(config, str(tmp_path), verbose=False)
  assert [(r['name'], r['seed']) for r in results] == [
      ('A', 0), ('A', 1), ('A', 2), ('B', 0), ('B', 1), ('B', 2)]
  assert [(name, seed) for name, seed, _, _ in trained] == [
      ('test/A', 0), ('test/A', 1), ('test/A', 2), ('test/B', 0), ('test/B', 1), ('test/B', 2)]
  assert trained[1][2] == str(tmp_path / 'runs' / 'A-seed1')
  # init_from: each seed starts from the same seed's run.
  assert [init for *_, init in trained[3:]] == [
      str(tmp_path / 'runs' / f'A-seed{s}') for s in range(3)]
  assert [c.name for c in bench_calls] == ['test/A', 'test/B']   # once per run, not per seed
  assert all(r['bench'] for r in results)
  with open(tmp_path / 'results.md') as f:
    report = f.read()
  assert '| A | 0 1 2 | 0.900 0.910 0.920 | 0.910 ± 0.010 | 0.900 |' in report
  assert '| B | 0 1 2 | 0.500 0.510 0.520 | 0.510 ± 0.010 | 0.500 |' in report
  header, *rows = table_lines(tmp_path)
  assert [row.split('|')[1].strip() for row in rows[:2]] == ['A', 'B']  # speed table: one row per run
  assert '0.910' in rows[0]   # its EM column: the mean over seeds
  # Resumed: nothing runs again; a train-only sweep reports exact match alone.
  sweep.run_sweep(config, str(tmp_path), verbose=False)
  assert len(trained) == 6 and len(bench_calls) == 2
  train_only = sweep_config(tmp_path / 'q', runs[:1], modes='train', seeds=(3, 4),
                            base='experiments/embedded.py:fido')
  sweep.run_sweep(train_only, str(tmp_path / 'q'), verbose=False)
  assert len(bench_calls) == 2 and [seed for _, seed, _, _ in trained[6:]] == [3, 4]
  with open(tmp_path / 'q' / 'results.md') as f:
    report = f.read()
  assert 'ms' not in report.split('| run |')[0] and '0.935 ± 0.007' in report


def test_bad_references_and_seeds_fail_before_anything_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, 'run_train', lambda *a: pytest.fail('trained'))
  for runs, message in (([run('A', init_from='B'), run('B')], "init_from='B' is not the name of an earlier run"),
                        ([run('A', convert_from='A')], "convert_from='A'")):
    with pytest.raises(ConfigError, match=message):
      sweep.run_sweep(sweep_config(tmp_path, runs, modes='train'), str(tmp_path), verbose=False)
  with pytest.raises(ConfigError, match='needs training'):
    sweep.run_sweep(sweep_config(tmp_path, [run('A'), run('B', init_from='A')]), str(tmp_path),
                    verbose=False)
  with pytest.raises(ConfigError, match='distinct integers'):
    sweep.run_sweep(sweep_config(tmp_path, [run('A')], modes='train', seeds=(1, 1)),
                    str(tmp_path), verbose=False)


def test_bad_override_key_is_named_before_anything_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(bench, 'bench_model', lambda config: pytest.fail('benchmarked'))
  for key, missing in (('model.decoder.cross_attention_perod', 'cross_attention_perod'),
                       ('modle.dtype', 'modle'), ('model.dtype.x', 'x')):
    runs = [run('ok'), run('bad', {key: 1})]
    with pytest.raises(ConfigError, match=f"run 'bad'.*{key}.*{missing}"):
      sweep.run_sweep(sweep_config(tmp_path, runs), str(tmp_path), verbose=False)
  with pytest.raises(ConfigError, match='cross_attention_period'):  # impossible model
    runs = [run('deep', {'model.decoder.cross_attention_period': 9})]
    sweep.run_sweep(sweep_config(tmp_path, runs), str(tmp_path), verbose=False)
  with pytest.raises(ConfigError, match='model.dtype'):   # wrong type
    sweep.run_sweep(sweep_config(tmp_path, [run('t', {'model.dtype': 3})]), str(tmp_path),
                    verbose=False)


def test_unknown_sweep_name_lists_the_known_ones():
  with pytest.raises(ConfigError, match=r"'table5' \(did you mean 'table6'\?\); expected one of "
                                        r"table3, table4, table6, fig4, fig6"):
    load_config_file(f'{ABLATIONS}:table5')
  with pytest.raises(ConfigError, match="unknown variant ''; expected one of table3"):
    load_config_file(ABLATIONS)
  assert sweep.parse_modes('train') == ('train',)
  with pytest.raises(ConfigError, match='modes'):
    sweep.parse_modes('bench,evaluate')


@pytest.mark.parametrize('name', ['table3', 'table4', 'table6', 'fig4', 'fig6'])
@pytest.mark.parametrize('local', [False, True], ids=['paper', 'smoke'])
def test_defined_sweeps_build_valid_models(name, local, monkeypatch):
  monkeypatch.chdir(REPO)
  config = load_config_file(f'{ABLATIONS}:{name}' + (',smoke,train' if local else ''))
  assert config.sweep.modes == ('bench,train' if local else 'bench')
  runs = config.sweep.runs
  assert len({r['name'] for r in runs}) == len(runs) >= 3
  models = {}
  for r in runs:
    models[r['name']] = sweep.run_config(config.sweep, r, train=True).model
    make_model(models[r['name']])   # validates; no parameters, no compilation
  if name == 'table3' and not local:
    dec = models['FiDO Base-XL'].decoder
    assert (dec.size, dec.cross_attention_period, dec.num_kv_heads) == ('xl', 6, 1)
    assert models['no LSA'].decoder.cross_attention_period == 1
    assert models['no MQ'].decoder.cross_num_kv_heads == 32
    assert models['no asym (Base-Base)'].decoder.size == 'base'
    assert config.sweep.max_batch
  if name == 'table4':
    assert models['FiD-Light'].fid_light_k == 6
  if name == 'table6':
    assert all(r['overrides']['bench.batch_sizes'] == (1,) for r in runs)
  if name == 'fig4' and not local:
    assert [r['x'] for r in runs] == [1, 2, 3, 4, 6, 8, 12, 24]
  if name == 'fig6' and not local:
    assert sorted({r['x'] for r in runs if r['group'] == 'passages'}) == [10, 20, 40, 60, 80, 100]
    assert sorted({r['x'] for r in runs if r['group'] == 'target_len'}) == [32, 64, 128, 256, 512]


@pytest.mark.parametrize('start', [1, 7, 4096])
@pytest.mark.parametrize('threshold', [0, 1, 2, 3, 5, 37, 64, 100, 4095, 4096, 10_000])
def test_largest_fitting_finds_the_threshold(threshold, start):
  tried = []

  def fits(batch):
    tried.append(batch)
    return batch <= threshold

  best, tries = max_batch.largest_fitting(fits, start=start, limit=4096)
  assert best == min(threshold, 4096)
  assert [b for b, _ in tries] == tried and len(tried) <= 2 * 12 + 2
  assert all(ok == (b <= threshold) for b, ok in tries)


def test_max_batch_search_methods(monkeypatch):
  config = load_config_file(os.path.join(REPO, 'experiments/fido.py:tiny,smoke'))
  assert max_batch.largest_fitting(lambda b: b <= 0, start=3, limit=10)[0] == 0
  assert max_batch.largest_fitting(lambda b: b <= 50, start=3, limit=40)[0] == 40
  # start = limit = the batch wanted: one try when it fits, else bisection below it.
  assert max_batch.largest_fitting(lambda b: b <= 64, start=64, limit=64) == (64, [(64, True)])
  best, tries = max_batch.largest_fitting(lambda b: b <= 20, start=64, limit=64)
  assert best == 20 and [b for b, _ in tries] == [64, 32, 16, 24, 20, 22, 21]
  injected = max_batch.max_batch_search(config, fits=lambda b: b <= 24, limit=256)
  assert (injected['method'], injected['max_batch'], injected['hit_limit']) == (
      'allocation_search', 24, False)
  model = max_batch.max_batch_search(config, limit=1 << 20)   # CPU: the memory model
  assert model['method'] == 'memory_model' and 1 <= model['max_batch'] < 1 << 20
  host = analysis.Device('host', 0.0, 0.0, model['memory_bytes'])
  assert model['max_batch'] == analysis.max_batch(
      config.model, analysis.setting_from_config(config, 1), host)
  capped = max_batch.max_batch_search(config, start=24, limit=24)
  assert capped['max_batch'] == 24 and capped['hit_limit']
  oom = jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate')
  assert max_batch.is_resource_exhausted(oom)
  assert not max_batch.is_resource_exhausted(jax.errors.JaxRuntimeError('INVALID_ARGUMENT: shapes'))
  assert not max_batch.is_resource_exhausted(ValueError('out of memory'))


def test_allocation_search_treats_oom_as_too_big(monkeypatch):
  """The real probe on CPU, with the decoder made to run out of memory above batch 1."""
  config = load_config_file(os.path.join(REPO, 'experiments/fido.py:tiny,smoke'))
  real_decode = max_batch.greedy_decode_from_encoding

  def decode_or_oom(model, params, enc, enc_mask, **kwargs):
    if enc.shape[0] > 1:
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory (simulated)')
    return real_decode(model, params, enc, enc_mask, **kwargs)

  monkeypatch.setattr(max_batch, 'greedy_decode_from_encoding', decode_or_oom)
  result = max_batch.max_batch_search(config, method='allocation_search', limit=16)
  assert result['max_batch'] == 1 and result['tries'] == [[1, True], [2, False]]
  def broken_decode(*args, **kwargs):
    raise ValueError('a real bug')

  monkeypatch.setattr(max_batch, 'greedy_decode_from_encoding', broken_decode)
  with pytest.raises(ValueError, match='a real bug'):
    max_batch.max_batch_search(config, method='allocation_search', limit=2)


def test_max_batch_caps_the_benchmarked_batch(tmp_path, monkeypatch):
  bench_calls = []
  monkeypatch.setattr(bench, 'bench_model', counting_fake_bench(bench_calls))
  limits = {'test/fits': 10_000, 'test/too-big': 3}

  def fake_search(config, *, start, limit):
    best = min(limit, limits[config.name])
    return dict(method='fake', max_batch=best, hit_limit=best == limit)

  monkeypatch.setattr(max_batch, 'max_batch_search', fake_search)
  runs = [run(name, {'bench.batch_sizes': (8,)}) for name in ('fits', 'too-big')]
  sweep.run_sweep(sweep_config(tmp_path, runs, max_batch=True), str(tmp_path), verbose=False)
  assert [tuple(c.bench.batch_sizes) for c in bench_calls] == [(8,), (3,)]
  header, *rows = table_lines(tmp_path)
  assert header.rstrip(' |').endswith('max batch')
  assert rows[0].endswith('| ≥ 8 |') and rows[1].endswith('| 3 |') and '| 3 |' in rows[1]


def test_results_stored_with_retired_config_fields_still_match():
  changed = sweep._changed_fields  # pylint: disable=protected-access
  stored = {'train': {'steps': 4, 'debug_nan_at_step': -1, 'debug_step_delay': 0.0}}
  assert changed(stored, {'train': {'steps': 4}}, ['train']) == []
  assert changed(stored, {'train': {'steps': 5}}, ['train']) == ['config.train.steps']


@pytest.mark.parametrize('arg', ['', ':smoke,scratch'])
def test_uptrain_synthetic_is_a_sweep_of_the_uptrain_stages(arg):
  config = load_config_file(os.path.join(REPO, f'experiments/uptrain_synthetic.py{arg}'))
  runs = sweep.expand_runs(config.sweep, ('train',))  # every run's config built and validated
  by_name = {r.spec['name']: r for r in runs}
  assert [r.spec.get('convert_from') for r in runs[1:5]] == ['pretrain FiD', 'pretrain FiD', None,
                                                             'pretrain FiD']
  assert by_name['(b) FiDO, uptrained'].spec['init_from'] == 'uptrain FiDO'
  assert by_name['(b) FiDO, uptrained'].config.init.carry_second_moments
  assert by_name['pretrain FiD'].config.train.task == 'pretrain'
  fido = by_name['(c) FiDO, converted'].config.model
  assert fido.decoder.num_kv_heads == 1 and fido.decoder.cross_attention_period == 2
  assert ('(d) FiDO, scratch' in by_name) == ('scratch' in arg)
