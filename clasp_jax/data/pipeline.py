"""Per-process audio input pipeline: step-addressed batches as global jax.Arrays.

Each JAX process reads only its slice of every global batch (EpochSampler's order, a
function of (seed, step)), crops or pads the clips to a fixed number of samples with a
mask, and hands its rows to `jax.make_array_from_process_local_data`, which assembles the
global batch sharded over the mesh axis 'data'. Batches are prepared ahead by background
threads. Restarting at step k yields exactly the batches an uninterrupted run yields from
step k on, so a checkpoint needs to store only the step.

  source = reader.open_split(DATASET_DIR, "train")
  pipeline = InputPipeline(source, PipelineConfig(global_batch_size=256), mesh=mesh)
  for batch in pipeline.iterate(start_step=restored_step):
    state = train_step(state, batch.arrays)      # batch.host holds ids and texts
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from clasp_jax.data import audio_io
from clasp_jax.data.sampling import EpochSampler
from clasp_jax.data.sampling import FullPassSampler, LengthBucketedSampler
from clasp_jax.data.tfds_builder import INT16_SCALE

DATA_AXIS = "data"
HOST_FIELDS = ("id", "text", "language", "category", "speaker", "source")
# Encodes this process's texts, e.g. a tokenizer: list of str -> {name: (n, ...) array}.
TextEncoder = Callable[[Sequence[str]], dict[str, np.ndarray]]


class Source(Protocol):
  """What the pipeline reads: reader.SpeechTextSplit or reader.ConcatenatedSplit."""

  lengths: np.ndarray

  def __len__(self) -> int: ...

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How batches are cut and shaped.

  Attributes:
    global_batch_size: examples per step over all processes.
    max_duration_s: clips are cropped to this; shorter ones are zero-padded and masked.
    seed: shuffling (and random crop) seed; the order is a function of (seed, step).
    shuffle: False reads each epoch in stored order.
    random_crop: crop long clips at a seeded offset instead of from the start.
    peak_normalize: scale each clip by its peak (the paper's x / max|x|); silent crops
      stay zero instead of becoming NaN.
    length_buckets_s: if set, a batch is padded to the smallest of these durations that
      holds its longest clip (max_duration_s is always the last bucket), so short batches
      compute less; each bucket compiles once.
    bucket_window: sort clips by length within windows of this many global batches
      (0: no length bucketing).
    full_pass: evaluation order: every example once in stored order, the last batch
      padded with rows whose `valid` is False.
    prefetch: batches prepared ahead of the consumer.
    num_threads: background threads reading and shaping batches.
  """

  global_batch_size: int
  max_duration_s: float = 15.0
  seed: int = 0
  shuffle: bool = True
  random_crop: bool = False
  peak_normalize: bool = False
  length_buckets_s: tuple[float, ...] = ()
  bucket_window: int = 0
  full_pass: bool = False
  prefetch: int = 4
  num_threads: int = 2


class PipelineBatch(NamedTuple):
  """One step's data.

  `arrays` (jit-able): audio (B, T) float32, audio_mask (B, T) bool, valid (B,) bool,
  example_index (B,) int32 and the text encoder's outputs; global jax.Arrays over the mesh,
  or this process's NumPy rows without a mesh. `host`: this process's rows of id, text,
  language, category, speaker and source as NumPy string arrays, in the order of its rows
  of `arrays`.
  """

  step: int
  arrays: dict[str, Any]
  host: dict[str, np.ndarray]


class InputPipeline:
  """Batches of one source for this process; see the module docstring."""

  def __init__(self, source: Source, config: PipelineConfig, *, mesh: Mesh | None = None,
               text_encoder: TextEncoder | None = None, process_index: int | None = None,
               process_count: int | None = None):
    self.source = source
    self.config = config
    self.mesh = mesh
    self.text_encoder = text_encoder
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if mesh is not None:
      data_devices = mesh.shape[DATA_AXIS]
      if config.global_batch_size % data_devices:
        raise ValueError(f"global batch size {config.global_batch_size} does not divide by "
                         f"the {data_devices} devices of mesh axis '{DATA_AXIS}'")
    self.lengths = np.asarray(source.lengths)
    self.max_samples = int(round(config.max_duration_s * audio_io.TARGET_SAMPLE_RATE))
    buckets = sorted({min(self.max_samples, int(round(s * audio_io.TARGET_SAMPLE_RATE)))
                      for s in config.length_buckets_s} | {self.max_samples})
    self.bucket_samples = np.asarray(buckets)
    if config.full_pass:
      self.sampler = FullPassSampler(len(source), config.global_batch_size,
                                     self.process_index, self.process_count)
    else:
      self.sampler = EpochSampler(len(source), config.global_batch_size, config.seed,
                                  config.shuffle, self.process_index, self.process_count)
      if config.bucket_window:
        self.sampler = LengthBucketedSampler(self.sampler, self.lengths, config.bucket_window)

  @property
  def steps_per_epoch(self) -> int:
    return self.sampler.steps_per_epoch

  def pad_length(self, step: int) -> int:
    """Samples per row at `step`: the same on every process (from the global batch)."""
    longest = int(self.lengths[self.sampler.global_indices(step)].max())
    bucket = int(np.searchsorted(self.bucket_samples, min(longest, self.max_samples)))
    return int(self.bucket_samples[bucket])

  def _crop_offset(self, step: int, index: int, length: int, target: int) -> int:
    if length <= target or not self.config.random_crop:
      return 0
    return int(np.random.default_rng([self.config.seed, step, index]).integers(
        0, length - target + 1))

  def local_batch(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """This process's rows at `step` as NumPy (arrays, host); a pure function of step."""
    indices = np.asarray(self.sampler.local_indices(step))
    if isinstance(self.sampler, FullPassSampler):
      valid = self.sampler.local_valid(step)
    else:
      valid = np.ones(len(indices), dtype=bool)
    records = self.source.read(indices)
    num_samples = self.pad_length(step)
    audio = np.zeros((len(indices), num_samples), dtype=np.float32)
    mask = np.zeros((len(indices), num_samples), dtype=bool)
    for row, (index, record) in enumerate(zip(indices, records)):
      clip = record["audio"]
      offset = self._crop_offset(step, int(index), len(clip), num_samples)
      clip = clip[offset:offset + num_samples].astype(np.float32) / INT16_SCALE
      if self.config.peak_normalize:
        clip = audio_io.peak_normalize(clip)
      audio[row, :len(clip)] = clip
      mask[row, :len(clip)] = True
    host = {field: np.asarray([record[field] for record in records], dtype=object)
            for field in HOST_FIELDS}
    arrays = {"audio": audio, "audio_mask": mask, "valid": valid,
              "example_index": indices.astype(np.int32)}
    if self.text_encoder is not None:
      encoded = self.text_encoder(list(host["text"]))
      clashes = set(encoded) & set(arrays)
      if clashes:
        raise ValueError(f"text encoder outputs {sorted(clashes)} clash with audio fields")
      arrays.update({name: np.asarray(value) for name, value in encoded.items()})
    return arrays, host

  def to_global(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles every process's rows into global arrays sharded over 'data'."""
    if self.mesh is None:
      return arrays
    sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    batch = self.config.global_batch_size
    return {name: jax.make_array_from_process_local_data(sharding, value,
                                                         (batch,) + value.shape[1:])
            for name, value in arrays.items()}

  def batch(self, step: int) -> PipelineBatch:
    """The batch at `step`, prepared in the calling thread."""
    arrays, host = self.local_batch(step)
    return PipelineBatch(step, self.to_global(arrays), host)

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[PipelineBatch]:
    """Batches from `start_step` on (endless unless `num_steps`), prepared in background.

    A full-pass (evaluation) pipeline stops after its last batch.
    """
    end = start_step + num_steps if num_steps is not None else None
    if self.config.full_pass:
      end = min(end, self.steps_per_epoch) if end is not None else self.steps_per_epoch
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.config.num_threads),
                                                 thread_name_prefix="input_pipeline")
    pending: collections.deque = collections.deque()
    next_step = start_step
    try:
      while True:
        while len(pending) < max(1, self.config.prefetch) and (end is None or next_step < end):
          pending.append((next_step, pool.submit(self.local_batch, next_step)))
          next_step += 1
        if not pending:
          return
        step, future = pending.popleft()
        arrays, host = future.result()
        yield PipelineBatch(step, self.to_global(arrays), host)
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
