"""Small model configs and parameters shared by the conversion and key/value-head tests."""

import jax
import jax.numpy as jnp
import numpy as np

from fido.config import model_config
from fido.model.fid import make_model

VOCAB = 96


def custom(encoder='tiny', decoder=None, enc_overrides=None, dec_overrides=None, **kwargs):
  """A model config whose stacks may leave the size table (then size='custom')."""
  kwargs.setdefault('vocab_size', VOCAB)
  config = model_config(encoder, decoder, **kwargs)
  for stack, overrides in (('encoder', enc_overrides), ('decoder', dec_overrides)):
    if overrides:
      config[stack].update(size='custom', **overrides)
  return config


def init_params(config, seed):
  """Numpy parameters of `config`'s model, with the norm scales (constant at init) randomised."""
  ids = jnp.zeros((1, 1, 4), jnp.int32)
  params = jax.jit(make_model(config).init)(jax.random.PRNGKey(seed), ids, ids != 0, ids[:, 0])
  rng = np.random.default_rng(seed)
  return {m: {p: (rng.uniform(0.5, 1.5, v.shape).astype(np.float32) if p == 'scale'
                  else np.asarray(v)) for p, v in leaves.items()} for m, leaves in params.items()}


def flat(params):
  """{'module/param': array}."""
  return {f'{m}/{p}': v for m, leaves in params.items() for p, v in leaves.items()}
