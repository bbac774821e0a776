"""Orbax checkpoints of the train state plus a JSON record (config, data position, progress)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every_steps` and when forced, keeps the newest `keep`, resumes the latest.

  The JSON record travels in the same atomic checkpoint as the state, so the data position
  and early-stopping progress can never disagree with the parameters.
  """

  def __init__(self, workdir: str, *, every_steps: int, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "record"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict, *, force: bool = False) -> bool:
    """Saves if the interval says so (or `force`); returns whether a save started."""
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      record=ocp.args.JsonSave(record)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores against an abstract target (shapes, dtypes and shardings of the live state)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      record=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["record"])

  def read(self, step: int | None = None) -> tuple[dict, dict]:
    """The state as plain nested dicts of arrays, without a live target (for inspection,
    inference and conversion); defaults to the newest step."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                      record=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["record"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
