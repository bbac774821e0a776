"""Evaluators, picked by `config.evals.<name>.type`: module `clasp_jax.evaluators.<type>`.

Each module exports `Evaluator(config, *, mesh=None)` whose `run(embeddings)` yields
`(metric name, value)` pairs for the paired speech/text embeddings of one split.
"""

from __future__ import annotations

import importlib
import re


def get_evaluator_class(type_name: str):
  if not re.fullmatch(r"[a-z_][a-z0-9_]*", type_name or ""):
    raise ValueError(f"evaluator type must be a module name, got {type_name!r}")
  try:
    module = importlib.import_module(f"clasp_jax.evaluators.{type_name}")
  except ModuleNotFoundError as error:
    if error.name != f"clasp_jax.evaluators.{type_name}":
      raise
    raise ValueError(f"unknown evaluator type {type_name!r} (no clasp_jax/evaluators/"
                     f"{type_name}.py)") from None
  return module.Evaluator
