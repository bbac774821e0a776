"""Scalar logging: TensorBoard event files and `metrics.jsonl`, from process 0 only.

The workdir may be local or on Cloud Storage (gs://...): metrics.jsonl goes through
etils.epath and TensorBoard through tensorboardX's own gs:// writer. A Cloud Storage object
cannot be appended to, so there metrics.jsonl is rewritten whole at each log step (it holds
one short line per log step).
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
from etils import epath


class MetricWriter:
  """Writes each log step's scalars to TensorBoard and as one JSON object per line.

  On resume at `resume_step`, records after it (written before a crash, then lost from the
  checkpoint) are dropped from both, so the logs describe one consistent run.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    workdir = os.fspath(workdir)
    self.jsonl_path = epath.Path(workdir) / "metrics.jsonl"
    self._appendable = "://" not in workdir
    self._lines: list[str] = []
    self._tensorboard = None
    if not self.enabled:
      return
    if self.jsonl_path.exists():
      self._lines = [line + "\n" for line in self.jsonl_path.read_text().splitlines()
                     if line.strip() and (not resume_step or
                                          json.loads(line).get("step", 0) <= resume_step)]
      if resume_step:
        self.jsonl_path.write_text("".join(self._lines))
    import tensorboardX  # Imported here: only process 0 writes.
    self._tensorboard = tensorboardX.SummaryWriter(
        logdir=str(epath.Path(workdir) / "tensorboard"),
        purge_step=resume_step + 1 if resume_step else None)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled or not scalars:
      return
    record = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      record[name] = value if math.isfinite(value) else str(value)
      self._tensorboard.add_scalar(name, value, int(step))
    line = json.dumps(record) + "\n"
    self._lines.append(line)
    if self._appendable:
      with self.jsonl_path.open("a") as f:
        f.write(line)
    else:
      self.jsonl_path.write_text("".join(self._lines))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
