"""Early stopping on a monitored metric, with state that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class EarlyStopping:
  """Stops after `patience` evaluations without improvement (0 never stops)."""

  patience: int
  mode: str = "min"
  best: float | None = None
  best_step: int | None = None
  evals_without_improvement: int = 0
  stopped: bool = False

  def __post_init__(self):
    if self.mode not in ("min", "max"):
      raise ValueError(f"early stopping mode must be 'min' or 'max', got {self.mode!r}")

  def update(self, value: float, step: int) -> bool:
    """Records one evaluation; returns True when training should stop now."""
    value = float(value)
    improved = math.isfinite(value) and (
        self.best is None or (value < self.best if self.mode == "min" else value > self.best))
    if improved:
      self.best, self.best_step, self.evals_without_improvement = value, int(step), 0
    else:
      self.evals_without_improvement += 1
    if self.patience > 0 and self.evals_without_improvement >= self.patience:
      self.stopped = True
    return self.stopped

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, record: dict) -> "EarlyStopping":
    return cls(**record)
