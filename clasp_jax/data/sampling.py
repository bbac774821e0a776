"""Which examples each process reads at each step: a pure function of (seed, step).

Every process computes the same global order and takes its own contiguous slice of each
global batch, so shards are disjoint, cover the epoch, and a run resumed at step k reads
exactly what an uninterrupted run would have read at step k.
"""

from __future__ import annotations

import dataclasses
import functools

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


class LengthBucketedSampler:
  """EpochSampler whose batches hold clips of similar length (less padding to compute).

  Each epoch's shuffled order is cut into windows of `window_batches` global batches; a
  window is sorted by length and cut into batches, and the batches of the epoch are then
  shuffled again so that short and long batches alternate. Small windows keep the order
  close to random; large ones pad least.
  """

  def __init__(self, base: EpochSampler, lengths: np.ndarray, window_batches: int):
    if len(lengths) != base.num_examples:
      raise ValueError(f"{len(lengths)} lengths for {base.num_examples} examples")
    if window_batches < 1:
      raise ValueError(f"window_batches must be >= 1, got {window_batches}")
    self.base = base
    self.lengths = np.asarray(lengths)
    self.window_batches = window_batches

  @property
  def steps_per_epoch(self) -> int:
    return self.base.steps_per_epoch

  @property
  def global_batch_size(self) -> int:
    return self.base.global_batch_size

  @property
  def local_batch_size(self) -> int:
    return self.base.local_batch_size

  @functools.lru_cache(maxsize=2)
  def _epoch_batches(self, epoch: int) -> np.ndarray:
    """(steps_per_epoch, global_batch_size) indices of every batch of `epoch`."""
    batch = self.base.global_batch_size
    usable = self.base.epoch_order(epoch)[:self.steps_per_epoch * batch]
    window = self.window_batches * batch
    windows = []
    for start in range(0, len(usable), window):
      chunk = usable[start:start + window]
      # Stable sort on (length, position) so equal lengths keep the shuffled order.
      windows.append(chunk[np.argsort(self.lengths[chunk], kind="stable")])
    batches = np.concatenate(windows).reshape(self.steps_per_epoch, batch)
    if self.base.shuffle:
      batches = batches[np.random.default_rng([self.base.seed, epoch, 1]).permutation(
          len(batches))]
    return batches

  def global_indices(self, step: int) -> np.ndarray:
    epoch, position = divmod(int(step), self.steps_per_epoch)
    return self._epoch_batches(epoch)[position]

  def local_indices(self, step: int) -> np.ndarray:
    start = self.base.process_index * self.local_batch_size
    return self.global_indices(step)[start:start + self.local_batch_size]


class FullPassSampler:
  """Every example exactly once, in order; the last batch is padded with invalid rows.

  Evaluation must see the whole split, which EpochSampler (it drops the remainder) does
  not. Padding rows repeat the first example and are marked invalid by `local_valid`.
  `order` (a permutation of the examples; None: stored order) sets the visiting order, e.g.
  by length, so that clips of one batch pad to similar lengths.
  """

  def __init__(self, num_examples: int, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, order: np.ndarray | None = None):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} must be positive and divide "
                       f"by the {process_count} processes")
    if num_examples <= 0:
      raise ValueError("no examples to evaluate")
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.order = np.arange(num_examples) if order is None else np.asarray(order, np.int64)
    if not np.array_equal(np.sort(self.order), np.arange(num_examples)):
      raise ValueError("order must be a permutation of the examples")

  @property
  def steps_per_epoch(self) -> int:
    return -(-self.num_examples // self.global_batch_size)

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def _global_positions(self, step: int) -> np.ndarray:
    if not 0 <= step < self.steps_per_epoch:
      raise IndexError(f"step {step} outside the {self.steps_per_epoch} evaluation steps")
    return np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)

  def global_indices(self, step: int) -> np.ndarray:
    positions = self._global_positions(step)
    return self.order[np.where(positions < self.num_examples, positions, 0)]

  def _local_slice(self) -> slice:
    start = self.process_index * self.local_batch_size
    return slice(start, start + self.local_batch_size)

  def local_indices(self, step: int) -> np.ndarray:
    return self.global_indices(step)[self._local_slice()]

  def local_valid(self, step: int) -> np.ndarray:
    return (self._global_positions(step) < self.num_examples)[self._local_slice()]
