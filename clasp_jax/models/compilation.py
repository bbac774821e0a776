"""XLA options for the inference jits of the transformer towers.

On CPU, XLA hands dots and the elementwise work around them to YNNPACK as fused subgraphs. For
transformer layers (dense -> LayerNorm -> dense -> GELU -> dense) those fusions run slower than
XLA's own loop fusions around plain dots: for all-MiniLM-L6-v2 on a 2-core CPU, batches of
64 x 16 tokens took the same time, 64 x 32 7% and 64 x 64 20% less without them. The option
is set per jitted function, not process-wide, because the small fusion-encoder train step is
faster with the fusions (benchmarks/train_step.py); other backends get no options.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

_CPU_TRANSFORMER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def transformer_inference_options() -> dict[str, Any]:
  """`compiler_options` for jax.jit of a transformer forward pass on the default backend.

  Empty off CPU, and empty where this jaxlib does not know the option (it is experimental), so a
  JAX upgrade costs speed at worst, never a failure.
  """
  if jax.default_backend() != "cpu":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_TRANSFORMER_OPTIONS).lower(1.0).compile()
  except Exception:  # pylint: disable=broad-except
    return {}
  return dict(_CPU_TRANSFORMER_OPTIONS)


def jit_transformer_inference(function, **jit_kwargs):
  """jax.jit with `transformer_inference_options()`; call it when first needed, not at import."""
  return jax.jit(function, compiler_options=transformer_inference_options(), **jit_kwargs)
