"""The bench mode: JSON lines, the interleaved Hugging Face reference, per-round ratios and the
weights-only decode loop."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fido import analysis, bench, bench_reference, bench_step, convert
from fido.config import cross_attention_layers, load_config_file
from fido.model import weights
from fido.model.fid import make_model


def test_bench_yields_one_result_per_batch_and_appends_it_to_the_output(tmp_path):
  config = load_config_file('experiments/fido.py:tiny,smoke')
  config.bench.update(repeats=2, batch_sizes=(1, 2), output=str(tmp_path / 'bench.jsonl'))
  results = list(bench.run_bench(config))
  with open(config.bench.output) as f:
    assert [json.loads(line) for line in f] == results
  assert [r['batch'] for r in results] == [1, 2]
  for result in results:
    assert result['encoder_ms'] > 0 and result['decoder_ms'] > 0
    assert result['n_passages'] == 3 and result['passage_len'] == 16 and result['target_len'] == 4
    assert result['cross_attention_period'] == 4 and result['decoder_kv_heads'] == 1
    assert 'weights_only_ms' not in result  # opt-in
    setting = analysis.setting_from_config(config, result['batch'])
    flops = analysis.flops_per_sample(config.model, setting)['encoder']
    assert result['encoder_gflop_per_s'] == pytest.approx(
        flops / (result['encoder_ms'] / 1e3) / 1e9, rel=0.01, abs=0.05)
    traffic = analysis.bytes_per_sample(config.model, setting)['decoder']
    assert result['decoder_gb_per_s'] == pytest.approx(
        traffic / (result['decoder_ms'] / 1e3) / 1e9, rel=0.01, abs=0.05)


def test_bench_against_hf_reference_interleaves_and_yields_ratios():
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  config = load_config_file('experiments/fid.py:tiny,smoke')
  config.bench.update(repeats=3, warmup=1, batch_sizes=(2,), reference='hf')
  ours, theirs, ratios = bench.run_bench(config)
  assert ours['name'] == 'fid-tiny' and theirs['name'] == 'hf-transformers-t5-tiny'
  assert theirs['encoder_ms'] > 0 and theirs['decoder_ms'] > 0 and theirs['batch'] == 2
  assert ratios['interleaved'] and ratios['total'] == round(
      theirs['total_ms'] / ours['total_ms'], 2)
  for part in ('encoder', 'decoder', 'total'):
    low, median, high = ratios[f'{part}_per_round']
    assert 0 < low <= median <= high


def test_paired_ratios_are_taken_round_by_round():
  # A machine that slows both sides 3x in round 2: the ratio of each round stays 2.
  assert bench.paired_ratios([2.0, 6.0, 2.2], [1.0, 3.0, 1.0]) == [2.0, 2.0, 2.2]
  with pytest.raises(ValueError):
    bench.paired_ratios([1.0, 2.0], [1.0])


def test_decoder_step_matrices_are_every_weight_a_decode_step_reads():
  config = load_config_file('experiments/fido.py:tiny,smoke')
  model = make_model(config.model)
  params = bench.random_params(config, model, np.random.default_rng(0))
  matrices = bench.decoder_step_matrices(params)
  dec = config.model.decoder
  cross = len(cross_attention_layers(dec))
  # Per layer q, k, v, o and wi_0, wi_1, wo; cross-attention q and o (K/V run once, in init_cache).
  assert len(matrices) == 7 * dec.num_layers + 2 * cross + 1
  heads = dec.num_heads * dec.d_kv
  per_layer = (2 * dec.d_model * heads + 2 * dec.d_model * dec.num_kv_heads * dec.d_kv
               + 3 * dec.d_model * dec.d_ff)
  expected = (dec.num_layers * per_layer + cross * 2 * dec.d_model * heads
              + dec.d_model * config.model.vocab_size)
  assert sum(m.w.size for m in matrices) == expected
  assert matrices[-1].w.shape == (dec.d_model, config.model.vocab_size)
  assert {m.w.shape[0] for m in matrices} == {dec.d_model, heads, dec.d_ff}
  int8 = bench.decoder_step_matrices(weights.convert_params(params, 'int8'))
  # Converted trees fuse query|key|value and wi_0|wi_1: 4 matrices per layer, the same weights.
  assert len(int8) == 4 * dec.num_layers + 2 * cross + 1
  assert sum(m.w.size for m in int8) == expected
  assert all(m.w.dtype == jnp.int8 and m.scale.shape == m.w.shape[1:] for m in int8)
  assert weights.step_bytes(params) == 4 * expected  # what fido.bench_step counts a step reading


def test_weights_only_decode_chains_steps_through_the_output_layer():
  # Identity embeddings, zero layer matrices and a permutation as the output layer: each step maps
  # token t to perm[t], so `steps` steps apply the permutation `steps` times.
  perm = np.array([2, 0, 3, 1])
  output = jnp.asarray(np.eye(4)[perm])               # row t is e_{perm[t]}: e_t @ output
  zero_layer = jnp.zeros((8, 4))                        # input width 8: the activation is tiled
  embeddings = jnp.eye(4)
  for steps in (1, 2, 3):
    tokens = bench.weights_only_decode([zero_layer, output], embeddings, 3, steps)
    expected = 0
    for _ in range(steps):
      expected = perm[expected]
    np.testing.assert_array_equal(tokens, [expected] * 3)
  # A layer matrix shifts every logit by the same mean: the argmax is unchanged, the values used.
  ones_layer = jnp.ones((4, 6))
  np.testing.assert_array_equal(
      bench.weights_only_decode([ones_layer, output], embeddings, 2, 2), [perm[perm[0]]] * 2)


def test_bench_weights_only_reports_the_decoder_over_its_matmul_floor():
  config = load_config_file('experiments/fido.py:tiny,smoke')
  config.bench.update(repeats=3, warmup=1, weights_only=True)
  [result] = bench.run_bench(config)
  assert result['weights_only_ms'] > 0
  low, median, high = result['decoder_over_weights_only']
  assert 0 < low <= median <= high


def test_bench_against_ctranslate2_times_decode_steps_of_the_same_weights():
  config = load_config_file('experiments/fid.py:tiny,smoke')
  config.bench.update(repeats=2, warmup=0, reference='ct2', weight_formats=('float32', 'int8'))
  results = list(bench.run_bench(config))
  by_name = {r['name']: r for r in results}
  assert list(by_name) == ['fido fid-tiny float32', 'fido fid-tiny int8',
                           'ctranslate2 tiny float32', 'ctranslate2 tiny int8']
  # Converted from our weights: CTranslate2 decodes our float32 decoder's tokens.
  assert by_name['ctranslate2 tiny float32']['tokens_agree_with_fido'] == 1.0
  ours, int8 = by_name['fido fid-tiny float32'], by_name['fido fid-tiny int8']
  assert by_name['ctranslate2 tiny float32']['step_mb'] == ours['step_mb']
  assert int8['step_weights_mb'] < ours['step_weights_mb'] / 3
  for result in results:
    assert result['bound_ms'] == pytest.approx(
        result['step_mb'] / result['bandwidth_gb_per_s'], rel=0.05, abs=0.01)
    for reference in ('float32', 'int8'):
      low, median, high = result[f'ctranslate2_{reference}_over_this']
      assert low <= median <= high


def test_decode_step_is_the_difference_of_two_loops_and_reads_weights_and_caches():
  assert bench_step.step_seconds([1.0, 3.0], [0.4, 1.0], steps=2) == [0.3, 1.0]
  config = load_config_file('experiments/fido.py:tiny,smoke').model
  dec = config.decoder
  counts = bench_step.step_bytes(config, {}, batch=2, n_encoder_tokens=48, max_length=4)
  cross = len(cross_attention_layers(dec)) * 2 * 2 * 48 * dec.cross_num_kv_heads * dec.d_kv
  self_ = dec.num_layers * 2 * 2 * 4 * dec.num_kv_heads * dec.d_kv
  assert counts == dict(weights=0, caches=4 * (cross + self_), total=4 * (cross + self_))


def test_ctranslate2_runs_the_fid_of_a_fido_models_encoder_size():
  fido_model = load_config_file('experiments/fido.py:tiny,smoke').model
  twin = bench_reference.fid_twin(fido_model)
  assert convert.hf_config_from_fid(twin)['num_layers'] == fido_model.encoder.num_layers
  assert twin.decoder.d_model == fido_model.encoder.d_model
  fid_model = load_config_file('experiments/fid.py:tiny,smoke').model
  assert bench_reference.fid_twin(fid_model) is fid_model
