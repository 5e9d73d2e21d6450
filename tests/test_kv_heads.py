"""fido.model.kv_heads: the key/value-head layout, head pooling and the multi-head twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fido import optim, sharding
from fido.errors import ConversionError
from fido.model import kv_heads
from fido.model.fid import make_model
from tests.model_fixtures import custom, flat, init_params


def pool64(w, num_kv_heads):
  """Conversion's pooling: float64 accumulation, float32 out."""
  return kv_heads.pool_heads(w, num_kv_heads, accumulate_dtype=np.float64, dtype=np.float32)


# ---------------------------------------------------------------- layout


def test_layout_of_multi_head_grouped_and_multi_query_projections():
  assert kv_heads.kv_shape(32, 4, 8) == (32, 4, 8)   # MHA / GQA: [D, K, E]
  assert kv_heads.kv_shape(32, 1, 8) == (32, 8)      # MQ: [D, E]
  assert [kv_heads.num_kv_heads_of(s) for s in ((32, 4, 8), (32, 2, 8), (32, 8))] == [4, 2, 1]


def test_the_model_and_the_sharding_rules_follow_the_layout():
  config = custom(cross_attention_period=2, decoder_kv_heads=2, cross_kv_heads=1,
                  dec_overrides=dict(num_layers=4))
  ids = np.zeros((1, 1, 4), np.int32)
  abstract = jax.eval_shape(make_model(config).init, jax.random.PRNGKey(0), ids, ids != 0,
                            ids[:, 0])
  shapes = {k: v.shape for k, v in flat(abstract).items()}
  d, e = config.decoder.d_model, config.decoder.d_kv
  assert shapes['decoder/~/layer_00/~/self_attention/key'] == kv_heads.kv_shape(d, 2, e)
  assert shapes['decoder/~/layer_01/~/cross_attention/value'] == kv_heads.kv_shape(
      config.encoder.d_model, 1, e)
  assert shapes['encoder/~/layer_00/~/self_attention/key'] == kv_heads.kv_shape(
      config.encoder.d_model, config.encoder.num_heads, config.encoder.d_kv)
  for k in (1, 2):
    spec = sharding.spec_for('decoder/~/layer_00/~/self_attention/key', kv_heads.kv_shape(d, k, e),
                             sharding.RULES)
    assert spec == (sharding.P(None, None) if k == 1 else sharding.P(None, sharding.MODEL, None))


def test_multi_head_twin_of_a_model_config():
  mq = custom('tiny', 'mini', cross_attention_period=2, decoder_kv_heads=1, cross_kv_heads=1)
  mq.encoder.num_kv_heads = 2
  twin = kv_heads.multi_head(mq)
  assert twin.encoder.num_kv_heads == twin.encoder.num_heads
  assert twin.decoder.num_kv_heads == twin.decoder.cross_num_kv_heads == twin.decoder.num_heads
  assert mq.decoder.num_kv_heads == 1  # the original is untouched
  assert kv_heads.multi_head(twin) == twin
  twin.encoder.num_kv_heads, twin.decoder.num_kv_heads = 2, 1
  twin.decoder.cross_num_kv_heads = 1
  assert twin == mq  # nothing else differs


# ---------------------------------------------------------------- pooling


def test_mean_pooling_hand_case():
  # D=1, H=4 heads, E=2: head h holds [h, 10 h] (+ 100 for the second input row).
  w = np.array([[[0, 0], [1, 10], [2, 20], [3, 30]],
                [[100, 100], [101, 110], [102, 120], [103, 130]]], np.float32)
  np.testing.assert_array_equal(pool64(w, 2),
                                [[[0.5, 5], [2.5, 25]], [[100.5, 105], [102.5, 125]]])
  np.testing.assert_array_equal(pool64(w, 1), [[1.5, 15], [101.5, 115]])
  np.testing.assert_array_equal(pool64(w, 4), w)
  with pytest.raises(ConversionError, match='4 heads cannot be pooled into 3'):
    pool64(w, 3)
  # The same implementation on jax arrays, accumulating in their own dtype.
  np.testing.assert_array_equal(kv_heads.pool_heads(jnp.asarray(w), 1), [[1.5, 15], [101.5, 115]])


def test_pool_kv_heads_turns_a_multi_head_state_into_a_multi_query_one():
  mha = custom(cross_attention_period=2, dec_overrides=dict(num_layers=4))
  mq = custom(cross_attention_period=2, decoder_kv_heads=1, cross_kv_heads=1,
              dec_overrides=dict(num_layers=4))
  mq.encoder.num_kv_heads = 2
  src, dst = init_params(mha, 0), init_params(mq, 1)
  pooled = kv_heads.pool_kv_heads(
      src, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), dst))
  assert jax.tree.map(jnp.shape, pooled) == jax.tree.map(jnp.shape, dst)
  kv = 0
  for path, value in flat(pooled).items():
    module, name = path.rsplit('/', 1)
    w = src[module][name]
    if w.shape == value.shape:
      np.testing.assert_array_equal(value, w)
    else:
      heads = 2 if module.startswith('encoder') else 1
      np.testing.assert_allclose(value, pool64(w, heads), rtol=1e-5, atol=1e-7)
      kv += 1
  assert kv == 2 * (2 + 4 + 2)  # key and value: 2 encoder layers, 4 self-, 2 cross-attention

  # An optimizer state mirroring the params pools the same way (here: Adafactor's second moments).
  optimizer_config = optim.default_config()
  optimizer_config.name = 'fido_adafactor'
  opt = optim.make_optimizer(optimizer_config)
  src_opt = jax.tree.map(lambda x: x + 1.0, opt.init(src))
  pooled_opt = kv_heads.pool_kv_heads(src_opt, opt.init(dst))
  v = optim._find_factored_state(pooled_opt, 'pooled').v  # pylint: disable=protected-access
  key = 'decoder/~/layer_01/~/cross_attention'
  src_v = optim._find_factored_state(src_opt, 'src').v  # pylint: disable=protected-access
  np.testing.assert_allclose(v[key]['key'], pool64(np.asarray(src_v[key]['key']), 1), rtol=1e-5)


def test_pool_kv_heads_refuses_other_shape_changes():
  src = init_params(custom(), 0)
  dst = init_params(custom(dec_overrides=dict(d_ff=96)), 0)
  with pytest.raises(ConversionError,
                     match=r"mlp'\]\['wi_0'\]: shape \(32, 64\) cannot become \(32, 96\)"):
    kv_heads.pool_kv_heads(src, dst)
