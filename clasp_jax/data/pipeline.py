"""The one input pipeline: step-addressed batches of a split as global jax.Arrays.

Training and evaluation read through it, from either kind of source: a built speech-text
dataset (`data.build` / `data.synthesize` output, read with `reader.open_split`: clips are
cropped or padded to a length bucket, with a mask) or a feature split (`features.py`:
precomputed vectors, as the paper trains). Each JAX process reads only its slice of every
global batch (the sampler's order, a function of (seed, step)) and hands its rows to
`jax.make_array_from_process_local_data`, which assembles the global batch sharded over the
mesh axis 'data'. Batches are prepared ahead by background threads. Restarting at step k
yields exactly the batches an uninterrupted run yields from step k on, so a checkpoint needs
to store only the step.

  pipeline = for_split(config, "train", mesh=mesh, text_encoder=tokenize)
  for batch in pipeline.iterate(start_step=restored_step):
    state, metrics = train_fn(state, batch.arrays)   # batch.host holds ids and texts

`batch.arrays` holds what the model reads: `audio` + `audio_mask` (audio sources) or
`speech` + `spectrogram` (+ `text` when precomputed) (feature sources), the text encoder's
outputs (`input_ids`, `attention_mask`), and `valid` / `example_index`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from clasp_jax.common.mesh import DATA_AXIS
from clasp_jax.data import audio_io, features, text_prep
from clasp_jax.data.sampling import EpochSampler, FullPassSampler, LengthBucketedSampler
from clasp_jax.data.tfds_builder import INT16_SCALE

HOST_FIELDS = ("id", "text", "language", "category", "speaker", "source")
# Encodes this process's texts, e.g. a tokenizer: list of str -> {name: (n, ...) array}.
TextEncoder = Callable[[Sequence[str]], dict[str, np.ndarray]]


class Source(Protocol):
  """What the pipeline reads: an audio split (reader.SpeechTextSplit or ConcatenatedSplit,
  whose `read` returns records with `audio`) or a `features.FeatureSplit` (which has `take`).
  """

  lengths: np.ndarray

  def __len__(self) -> int: ...

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]: ...


def is_feature_source(source: Any) -> bool:
  return isinstance(source, features.FeatureSplit)


def describe(source: Any, indices: Sequence[int]) -> dict[str, np.ndarray]:
  """The host fields (HOST_FIELDS) of `indices` as NumPy string arrays, without audio work."""
  indices = np.asarray(indices, dtype=np.int64)
  if is_feature_source(source):
    return source.describe(indices)
  records = source.read(indices)
  return {field: np.asarray([record[field] for record in records], dtype=object)
          for field in HOST_FIELDS}


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
    full_pass: evaluation order: every example once (in stored order, or shortest first
      with length buckets), the last batch padded with rows whose `valid` is False.
    prefetch: batches prepared ahead of the consumer.
    num_threads: background threads reading and shaping batches.
    text_preparation: how sentences are prepared for the text encoder, by their source
      (text_prep.PREPARATIONS; 'paper': as the authors prepared each source).
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
  text_preparation: str = "as_is"
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
    self.lengths = np.asarray(source.lengths)  # Feature sources: zeros (nothing to pad).
    self.max_samples = int(round(config.max_duration_s * audio_io.TARGET_SAMPLE_RATE))
    buckets = sorted({min(self.max_samples, int(round(s * audio_io.TARGET_SAMPLE_RATE)))
                      for s in config.length_buckets_s} | {self.max_samples})
    self.bucket_samples = np.asarray(buckets)
    if config.full_pass:
      # With length buckets, evaluation visits clips shortest first: a batch then pads to the
      # bucket of clips like its own, not to the longest clip of a random draw (2.5x less
      # padding on the offline corpus). Results come back in stored order (split_embedding).
      order = (np.argsort(self.lengths, kind="stable")
               if config.length_buckets_s and not is_feature_source(source) else None)
      self.sampler = FullPassSampler(len(source), config.global_batch_size,
                                     self.process_index, self.process_count, order=order)
    else:
      self.sampler = EpochSampler(len(source), config.global_batch_size, config.seed,
                                  config.shuffle, self.process_index, self.process_count)
      if config.bucket_window:
        self.sampler = LengthBucketedSampler(self.sampler, self.lengths, config.bucket_window)

  @property
  def steps_per_epoch(self) -> int:
    return self.sampler.steps_per_epoch

  @property
  def num_full_steps(self) -> int:
    """Steps of a full pass whose rows are all valid (the loss is a mean over whole batches)."""
    return len(self.source) // self.config.global_batch_size

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
    if is_feature_source(self.source):
      arrays, host = self.source.take(indices), self.source.describe(indices)
    else:
      arrays, host = self._audio_rows(step, indices)
    arrays.update(valid=valid, example_index=indices.astype(np.int32))
    if self.text_encoder is not None:
      encoded = self.text_encoder(text_prep.prepare_by_source(
          list(host["text"]), list(host["source"]), self.config.text_preparation))
      clashes = set(encoded) & set(arrays)
      if clashes:
        raise ValueError(f"text encoder outputs {sorted(clashes)} clash with input fields")
      arrays.update({name: np.asarray(value) for name, value in encoded.items()})
    return arrays, host

  def _audio_rows(self, step: int, indices: np.ndarray):
    """Clips cropped or zero-padded to the step's length bucket, with their masks."""
    records = self.source.read(indices)
    num_samples = self.pad_length(step)
    audio = np.zeros((len(indices), num_samples), dtype=np.float32)
    mask = np.zeros((len(indices), num_samples), dtype=bool)
    for row, (index, record) in enumerate(zip(indices, records)):
      clip = record["audio"]
      offset = self._crop_offset(step, int(index), len(clip), num_samples)
      clip = clip[offset:offset + num_samples].astype(np.float32) / INT16_SCALE
      if self.config.peak_normalize:
        # By the peak before resampling where the dataset recorded it (the authors' order).
        clip = audio_io.peak_normalize(clip, source_peak=record.get("source_peak"))
      audio[row, :len(clip)] = clip
      mask[row, :len(clip)] = True
    host = {field: np.asarray([record[field] for record in records], dtype=object)
            for field in HOST_FIELDS}
    return {"audio": audio, "audio_mask": mask}, host

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


# ------------------------------------------------------------------------ From a config.

AUDIO_DATA_KINDS = ("audio",)
FEATURE_DATA_KINDS = ("synthetic_features", "features")


def _dataset_paths(data_config) -> list[str]:
  datasets = data_config.get("datasets", "")
  paths = ([path.strip() for path in datasets.split(",") if path.strip()]
           if isinstance(datasets, str) else [str(path) for path in datasets])
  if not paths:
    raise ValueError("config.data.datasets must name at least one built dataset "
                     "(comma-separated) for config.data.kind='audio'")
  return paths


def open_source(data_config, split: str) -> Source:
  """The split that `config.data` describes, as a pipeline source."""
  if data_config.kind in FEATURE_DATA_KINDS:
    return features.load_split(data_config, split)
  if data_config.kind in AUDIO_DATA_KINDS:
    from clasp_jax.data import reader  # TFDS is only imported when audio is read.
    return reader.open_split(_dataset_paths(data_config), split)
  raise ValueError(f"config.data.kind must be one of {FEATURE_DATA_KINDS + AUDIO_DATA_KINDS}, "
                   f"got {data_config.kind!r}")


def pipeline_config(config, *, train: bool) -> PipelineConfig:
  """Batch shaping from `config.data`: training shuffles; evaluation reads every example once.

  Fields that workdirs written before they existed lack take the defaults of PipelineConfig.
  """
  data = config.data
  text = config.model.get("text", None) or {}  # Configs older than model.text: upgrade_config.
  common = dict(
      text_preparation=str(text.get("preparation", PipelineConfig.text_preparation)),
      max_duration_s=float(data.get("max_duration_s", PipelineConfig.max_duration_s)),
      peak_normalize=bool(data.get("peak_normalize", PipelineConfig.peak_normalize)),
      length_buckets_s=tuple(data.get("length_buckets_s", ()) or ()),
      prefetch=int(data.get("prefetch", PipelineConfig.prefetch)),
      seed=int(config.seed))
  if train:
    return PipelineConfig(global_batch_size=config.batch_size, shuffle=True,
                          random_crop=bool(data.get("random_crop", False)),
                          bucket_window=int(data.get("bucket_window", 0)), **common)
  return PipelineConfig(global_batch_size=config.eval_batch_size, shuffle=False,
                        full_pass=True, **common)


def for_split(config, split: str, *, mesh: Mesh | None, train: bool,
              text_encoder: TextEncoder | None = None,
              source: Source | None = None) -> InputPipeline:
  """The pipeline over `split` of `config.data`, shaped for training or for evaluation."""
  source = open_source(config.data, split) if source is None else source
  return InputPipeline(source, pipeline_config(config, train=train), mesh=mesh,
                       text_encoder=text_encoder)
