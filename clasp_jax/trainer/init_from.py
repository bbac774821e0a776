"""Starting a run from another workdir's weights: the paper's restarts (`config.init_from`).

The released Speech Brown model was trained as a chain of runs, each starting from the
previous one's parameters with Adam, its schedule and the data order created afresh. A resume
(same workdir) restores everything; `init_from` takes only the parameters and BatchNorm
statistics of another workdir's checkpoint and leaves the optimizer state, step, rng and data
position to the new run.

The checkpoint taken is the other run's best one (the step that scored best on its
early-stopping metric, or its newest when none was chosen), as `evaluate --workdir` takes.

The trainer calls `load_variables` once its fresh state exists, and only when its own workdir
has no checkpoint yet (a resume wins). Adam's state starts at zeros whatever the parameters,
so the fresh optimizer state stays valid:

  if config.init_from and checkpointer.latest_step() is None:
    params, batch_stats, _ = init_from.load_variables(config.init_from, state.params,
                                                      state.batch_stats)
    state = state.replace(params=jax.device_put(params, replicated),
                          batch_stats=jax.device_put(batch_stats, replicated))
"""

from __future__ import annotations

from typing import Any

import jax
from etils import epath
import numpy as np

from clasp_jax.common import mismatch
from clasp_jax.common.config_args import ConfigError
from clasp_jax.trainer.checkpointing import Checkpointer


def _path_name(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def _leaves(tree: Any) -> dict[str, Any]:
  """'/'-joined path -> leaf."""
  return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_and_take(name: str, workdir: str, live: Any, stored: Any) -> Any:
  """`stored` laid out like `live`, in live's dtypes; a clear error when they do not match."""
  live_leaves, stored_leaves = _leaves(live), _leaves(stored)
  missing = sorted(set(live_leaves) - set(stored_leaves))
  unexpected = sorted(set(stored_leaves) - set(live_leaves))
  reshaped = [f"{path} {tuple(np.shape(stored_leaves[path]))} there, "
              f"{tuple(np.shape(live_leaves[path]))} here"
              for path in sorted(set(live_leaves) & set(stored_leaves))
              if np.shape(stored_leaves[path]) != np.shape(live_leaves[path])]
  problems = mismatch.problems(missing, unexpected, reshaped, unused_word="unexpected")
  if problems:
    raise ConfigError(f"init_from={workdir}: its {name} do not fit this model ("
                      + "; ".join(problems) + "); the model config must match the one it was "
                      "trained with")
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.asarray(stored_leaves[_path_name(path)],
                                    dtype=np.asarray(leaf).dtype), live)


def load_variables(workdir: str, params: Any, batch_stats: Any, *,
                   checkpoint: int | str = "best") -> tuple[Any, Any, int]:
  """(params, batch_stats, step) of a checkpoint of `workdir`: 'best' (the default), 'latest'
  or a step number.

  `params` and `batch_stats` are the new run's freshly initialised ones: the checkpoint's must
  have exactly their names and shapes (they come back in the same structure and dtypes).
  Raises ConfigError when the workdir has no checkpoint or the weights do not fit.
  """
  directory = epath.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise ConfigError(f"init_from={workdir}: not a training workdir with checkpoints "
                      f"({directory} is missing)")
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    try:
      state, record = checkpointer.read(checkpoint)
    except FileNotFoundError as error:
      raise ConfigError(f"init_from={workdir}: {error}") from None
  finally:
    checkpointer.close()
  params = _check_and_take("parameters", workdir, params, state["params"])
  batch_stats = _check_and_take("BatchNorm statistics", workdir, batch_stats,
                                state.get("batch_stats", {}))
  return params, batch_stats, int(record.get("step", state.get("step", -1)))
