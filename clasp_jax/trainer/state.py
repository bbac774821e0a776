"""The train state and the one place it is built: by the trainer, inference and the tests.

Shapes come from `jax.eval_shape(model.init)`; only the parameters that no pretrained tower
provides are initialised, in one jitted call whose outputs leave out the pretrained subtrees,
so XLA never computes (and no host ever holds) a random copy of a tower that `load()` then
overwrites. Everything lands replicated over the mesh with `NamedSharding`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.common import mismatch
from clasp_jax.trainer import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_steps: jax.Array  # Consecutive steps whose update was skipped.


class ShapeMismatchError(ValueError):
  """Pretrained weights whose shapes differ from what the model expects."""


def _check_pretrained(expected: Mapping[str, Any], pretrained: Mapping[str, Any]) -> None:
  unknown = sorted(set(pretrained) - set(expected))
  if unknown:
    raise ShapeMismatchError(f"pretrained weights for {unknown}, which the model does not have "
                             f"(its parameters: {sorted(expected)})")
  for name, tree in pretrained.items():
    want = flax.traverse_util.flatten_dict(expected[name], sep="/")
    have = flax.traverse_util.flatten_dict(tree, sep="/")
    mismatched = [f"{path}: {tuple(have[path].shape)} != {tuple(want[path].shape)}"
                  for path in sorted(set(want) & set(have))
                  if have[path].shape != want[path].shape]
    problems = mismatch.problems(sorted(set(want) - set(have)), sorted(set(have) - set(want)),
                                 mismatched, unused_word="unexpected")
    if problems:
      raise ShapeMismatchError(f"pretrained {name!r} does not fit the model: "
                               + "; ".join(problems))


def fresh_initializer(model: nn.Module, example_batch: Mapping[str, Any],
                      pretrained: Mapping[str, Any], rng: jax.Array) -> Callable:
  """rng -> the variables that no pretrained tower provides (checked against the shapes first).

  The pretrained towers' subtrees are left out of the outputs, so under jit their random
  initialisation is dead code.
  """
  init = functools.partial(model.init, train=False)
  shapes = jax.eval_shape(init, rng, example_batch)
  _check_pretrained(shapes["params"], pretrained)

  def init_fresh(rng):
    variables = flax.core.unfreeze(init(rng, example_batch))
    variables["params"] = {name: tree for name, tree in variables["params"].items()
                           if name not in pretrained}
    return variables

  return init_fresh


def init_variables(model: nn.Module, example_batch: Mapping[str, Any], rng: jax.Array, *,
                   mesh: Mesh, pretrained: Mapping[str, Any] | None = None) -> dict:
  """The model's variables, replicated over `mesh`, with `pretrained` parameter subtrees.

  `pretrained` maps top-level parameter names (e.g. 'text_encoder', 'ssl_encoder') to trees of
  arrays; their random initialisation is dead code in the jitted init and never runs.
  """
  pretrained = dict(pretrained or {})
  replicated = NamedSharding(mesh, P())
  init_fresh = fresh_initializer(model, example_batch, pretrained, rng)
  variables = jax.jit(init_fresh, out_shardings=replicated)(rng)
  for name, tree in pretrained.items():
    variables["params"][name] = jax.device_put(
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if x.dtype == jnp.float64 else x,
                     tree), replicated)
  variables.setdefault("batch_stats", {})
  return variables


def create_train_state(model: nn.Module, example_batch: Mapping[str, Any], *, seed: int,
                       mesh: Mesh, frozen_pattern: str | Callable[[Any], str],
                       make_optimizer: Callable[[Any], optax.GradientTransformation],
                       pretrained: Mapping[str, Any] | None = None
                       ) -> tuple[TrainState, optax.GradientTransformation, Any]:
  """A fresh train state, its optimizer and the frozen mask.

  Variables come from `init_variables`; parameters whose path matches `frozen_pattern` (a
  regex, or a function of the parameter tree returning one, e.g. optim.frozen_pattern bound to
  the config) are frozen; `make_optimizer(trainable_params)` returns
  the optax transformation, whose state covers the trainable parameters only. The rng split is
  (init, dropout) of `seed`.
  """
  init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
  variables = init_variables(model, example_batch, init_rng, mesh=mesh, pretrained=pretrained)
  params = variables["params"]
  if callable(frozen_pattern):
    frozen_pattern = frozen_pattern(params)
  frozen = optim.frozen_mask(params, frozen_pattern)
  trainable, _ = optim.split_trainable(params, frozen)
  tx = make_optimizer(trainable)
  replicated = NamedSharding(mesh, P())
  opt_state = jax.jit(tx.init, out_shardings=replicated)(trainable)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                     params=params, batch_stats=variables["batch_stats"], opt_state=opt_state,
                     rng=jax.device_put(jax.random.key_data(dropout_rng), replicated),
                     nonfinite_steps=jax.device_put(jnp.zeros((), jnp.int32), replicated))
  return state, tx, frozen
