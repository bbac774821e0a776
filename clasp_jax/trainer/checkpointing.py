"""Orbax checkpoints of the train state plus a JSON record (config, data position, progress).

Two folders in a workdir: `checkpoints/<step>/`, the newest `keep` train states (what a
restart resumes from), and `best/<step>/`, the parameters and BatchNorm statistics of the step
that scored best on the early-stopping metric (what evaluation, embedding and conversion use
by default: the authors evaluated their best epoch, not their last).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from etils import epath
import orbax.checkpoint as ocp


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """A workdir as an epath: local folders made absolute (Orbax wants that), and gs:// or
  other remote paths as they are, read and written through their own file systems."""
  workdir = os.fspath(workdir)
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


class Checkpointer:
  """Saves every `every_steps` and when forced, keeps the newest `keep`, resumes the latest.

  The JSON record travels in the same atomic checkpoint as the state, so the data position
  and early-stopping progress can never disagree with the parameters.
  """

  def __init__(self, workdir: str, *, every_steps: int, keep: int):
    workdir = workdir_path(workdir)
    self.directory = workdir / "checkpoints"
    self.best_directory = workdir / "best"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self.every_steps = every_steps
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "record"))
    self._best = ocp.CheckpointManager(
        self.best_directory, item_names=("state", "record"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, record: dict, *, force: bool = False) -> bool:
    """Saves if the interval says so (or `force`); returns whether a save started."""
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    # One asynchronous save in flight at a time: the two managers' saves of one step would
    # otherwise wait in multi-process barriers of the same name (a 2-process run hung there).
    self._best.wait_until_finished()
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      record=ocp.args.JsonSave(record)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores against an abstract target (shapes, dtypes and shardings of the live state)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      record=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["record"])

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def save_best(self, step: int, state: Any, record: dict) -> None:
    """Keeps `state`'s parameters and BatchNorm statistics as the best so far."""
    best = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats}
    self._manager.wait_until_finished()  # One save in flight at a time (see `save`).
    self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(best),
                                                  record=ocp.args.JsonSave(record)), force=True)

  def drop_best_after(self, step: int) -> None:
    """Forgets a best checkpoint newer than `step` (a run that died before its next regular
    checkpoint and resumes from an older one will reach, and save, that step again)."""
    for best in self._best.all_steps():
      if best > step:
        self._best.delete(best)

  def read(self, step: int | str | None = None) -> tuple[dict, dict]:
    """The state as plain nested dicts of arrays, without a live target (for inspection,
    inference and conversion).

    `step`: 'best' (the default: the best step, or the newest when no evaluation chose one),
    'latest', or a step number (a regular checkpoint, or the best one).
    """
    manager, chosen = self.resolve(step)
    # Onto this process's first device, whatever topology wrote it: without a target Orbax
    # restores the saved sharding and refuses a different device count, and a workdir trained
    # on 8 devices or a pod is read for inference or conversion on one machine. The state's
    # metadata needs the handlers named up front.
    reader = ocp.CheckpointManager(
        manager.directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                          "record": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False))
    try:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                              sharding=device),
                            reader.item_metadata(chosen)["state"])
      restored = reader.restore(
          chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                          record=ocp.args.JsonRestore()))
    finally:
      reader.close()
    return restored["state"], dict(restored["record"])

  def resolve(self, step: int | str | None) -> tuple[ocp.CheckpointManager, int]:
    step = "best" if step is None else step
    if step == "best" and self.best_step() is not None:
      return self._best, self.best_step()
    if step in ("best", "latest"):
      latest = self.latest_step()
      if latest is None:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      return self._manager, latest
    step = int(step)
    if step in self._manager.all_steps():
      return self._manager, step
    if step in self._best.all_steps():
      return self._best, step
    available = sorted(set(self._manager.all_steps()) | set(self._best.all_steps()))
    raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory.parent}"
                            f" (steps: {available or 'none'})")

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._manager.close()
    self._best.close()


def parse_checkpoint_choice(value: str) -> int | str:
  """`--checkpoint` values: 'best', 'latest' or a step number."""
  if value in ("best", "latest"):
    return value
  try:
    step = int(value)
  except ValueError:
    raise ValueError(f"--checkpoint must be 'best', 'latest' or a step number, got {value!r}"
                     ) from None
  if step < 0:
    raise ValueError(f"--checkpoint step must be >= 0, got {step}")
  return step


def abstract_like(state: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
