"""clasp_jax: Contrastive Language-Speech Pretraining (CLASP) in JAX/Flax."""

__version__ = "0.1.0"
