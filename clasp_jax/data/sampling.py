"""Which examples each process reads at each step: a pure function of (seed, step).

Every process computes the same global order and takes its own contiguous slice of each
global batch, so shards are disjoint, cover the epoch, and a run resumed at step k reads
exactly what an uninterrupted run would have read at step k.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class EpochSampler:
  """Shuffles `num_examples` once per epoch and cuts the order into global batches.

  The last incomplete batch of an epoch is dropped so every step has the same shape.
  """

  num_examples: int
  global_batch_size: int
  seed: int
  shuffle: bool = True
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.global_batch_size <= 0:
      raise ValueError(f"global batch size must be positive, got {self.global_batch_size}")
    if self.global_batch_size % self.process_count:
      raise ValueError(f"global batch size {self.global_batch_size} does not divide by the "
                       f"{self.process_count} processes")
    if self.num_examples < self.global_batch_size:
      raise ValueError(f"{self.num_examples} examples cannot fill one global batch of "
                       f"{self.global_batch_size}")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process index {self.process_index} outside [0, {self.process_count})")

  @property
  def steps_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def epoch_order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def global_indices(self, step: int) -> np.ndarray:
    """(global_batch_size,) example indices of the whole global batch at `step`."""
    epoch, position = divmod(int(step), self.steps_per_epoch)
    start = position * self.global_batch_size
    return self.epoch_order(epoch)[start:start + self.global_batch_size]

  def local_indices(self, step: int) -> np.ndarray:
    """(local_batch_size,) indices this process reads at `step`."""
    start = self.process_index * self.local_batch_size
    return self.global_indices(step)[start:start + self.local_batch_size]
