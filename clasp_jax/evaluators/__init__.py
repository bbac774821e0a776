"""Evaluators, picked by `config.evals.<name>.type`: module `clasp_jax.evaluators.<type>`.

Each module exports `Evaluator(config, *, predict_fn, make_pipeline, mesh)`: it reads its own
split through `make_pipeline(split)` (the input pipeline, in evaluation order), and its
`run(state)` yields `(metric name, value)` pairs for the model in `state`.
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
