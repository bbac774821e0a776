"""clasp_jax: Contrastive Language-Speech Pretraining (CLASP) in JAX/Flax.

  import clasp_jax
  model = clasp_jax.load("/runs/clasp")       # a training workdir (see inference/api.py)
"""

__version__ = "0.1.0"


def load(workdir, *, checkpoint="best"):
  """A trained workdir as a model: `embed_speech`, `embed_text`, `similarity`,
  `embed_features` (see clasp_jax.inference.api.Clasp). Imports JAX on first use only, so
  `import clasp_jax` stays light."""
  from clasp_jax.inference import api  # pylint: disable=g-import-not-at-top
  return api.load(workdir, checkpoint=checkpoint)
