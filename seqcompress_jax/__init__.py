"""Compressed sequential recommenders (CpRec, CANet) in JAX/Flax."""
