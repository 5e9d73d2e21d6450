"""Haiku modules of the T5.1.1 Fusion-in-Decoder model with FiDO's switches (LSA, MQ, asymmetric)."""
