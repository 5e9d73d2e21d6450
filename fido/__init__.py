"""fido: Fusion-in-Decoder and FiDO (de Jong et al., 2022) in JAX, Haiku and Optax."""
