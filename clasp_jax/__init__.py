"""clasp_jax: Contrastive Language-Speech Pretraining (CLASP) in JAX/Flax."""

from clasp_jax import host_memory as _host_memory

__version__ = "0.1.0"

# Before any JAX backend starts: see host_memory.py (CLASP_JAX_TUNE_MALLOC=0 turns it off).
_host_memory.tune_allocator()
