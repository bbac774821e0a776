"""Global feature batches over the mesh, read per process, prefetched in the background."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.common.mesh import DATA_AXIS
from clasp_jax.data.features import FeatureSplit
from clasp_jax.data.sampling import EpochSampler


def to_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays split over the 'data' axis."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local_batch.items()}


def train_batches(split: FeatureSplit, sampler: EpochSampler, mesh: Mesh, *, start_step: int,
                  prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Batches for steps start_step, start_step + 1, ...: a resumed run sees the same data."""

  def local_batches():
    step = start_step
    while True:
      indices = np.sort(sampler.local_indices(step))  # Sorted: sequential reads of memmaps.
      yield split.take(indices)
      step += 1

  for local_batch in prefetched(local_batches(), prefetch):
    yield to_global_batch(local_batch, mesh)


def eval_batches(split: FeatureSplit, global_batch_size: int, mesh: Mesh, *,
                 drop_remainder: bool) -> Iterator[tuple[dict[str, jax.Array], int]]:
  """The split in order as (global batch, number of real rows); the tail is padded or dropped.

  Padding repeats the last example, so padded rows are valid inputs; callers cut them off.
  """
  process_count, process_index = jax.process_count(), jax.process_index()
  local_size = global_batch_size // process_count
  count = split.num_examples
  stop = count - count % global_batch_size if drop_remainder else count
  for start in range(0, stop, global_batch_size):
    indices = np.arange(start, start + global_batch_size)
    valid = int(min(global_batch_size, count - start))
    indices = np.minimum(indices, count - 1)
    local = indices[process_index * local_size:(process_index + 1) * local_size]
    yield to_global_batch(split.take(local), mesh), valid


def prefetched(iterator: Iterator, size: int) -> Iterator:
  """Runs `iterator` in a background thread, `size` items ahead; errors surface in the caller."""
  if size <= 0:
    yield from iterator
    return
  buffer: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            buffer.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      buffer.put(done)
    except BaseException as error:  # Re-raised in the consumer.
      buffer.put(error)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
