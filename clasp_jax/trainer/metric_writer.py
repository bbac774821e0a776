"""Scalar logging: TensorBoard event files and `metrics.jsonl`, from process 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax


class MetricWriter:
  """Writes each log step's scalars to TensorBoard and as one JSON object per line.

  On resume at `resume_step`, records after it (written before a crash, then lost from the
  checkpoint) are dropped from both, so the logs describe one consistent run.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if not self.enabled:
      return
    if resume_step and os.path.exists(self.jsonl_path):
      self._truncate_after(resume_step)
    import tensorboardX  # Imported here: only process 0 writes.
    self._tensorboard = tensorboardX.SummaryWriter(
        logdir=os.path.join(workdir, "tensorboard"),
        purge_step=resume_step + 1 if resume_step else None)

  def _truncate_after(self, step: int) -> None:
    with open(self.jsonl_path) as f:
      kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(self.jsonl_path, "w") as f:
      f.writelines(kept)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled or not scalars:
      return
    record = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      record[name] = value if math.isfinite(value) else str(value)
      self._tensorboard.add_scalar(name, value, int(step))
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
