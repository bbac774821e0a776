"""TFDS builder that writes any source layout as 16 kHz speech-text array_record files.

All dataset kinds share one schema and one builder: a reader turns its layout into
`SourceExample`s, `build_dataset` applies the bad-input policy and the split rule, and the
builder decodes, checks and stores each clip. Audio is a 1-D int16 Tensor feature rather
than `tfds.features.Audio`, which needs TensorFlow; the whole path runs without it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import inspect
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from clasp_jax.common import cli
from clasp_jax.data import audio_io
from clasp_jax.data import bad_input
from clasp_jax.data import splits
from clasp_jax.data.sources.source import SPLITS, SourceExample

BUILDER_NAME = "clasp_speech_text"
DATASET_VERSION = "1.0.0"
INT16_SCALE = 32768.0  # int16 sources round-trip exactly.

_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """How one dataset is built.

  Attributes:
    name: dataset name; the dataset lands in DATA_DIR/clasp_speech_text/NAME/1.0.0.
    kind: the source layout (manifest, speech_brown, fleurs, common_voice, synthetic),
      stored in every example's `source` field for per-source evaluation.
    seed: seed of the 80/10/10 sentence split for layouts without one.
    strict: stop at the first bad input instead of skipping and counting it.
    limits: what audio is usable.
    num_workers: threads decoding audio in parallel (results stay in input order).
    source_path: where the layout was read from (recorded in the metadata).
  """

  name: str
  kind: str
  seed: int = 0
  strict: bool = False
  limits: bad_input.AudioLimits = bad_input.AudioLimits()
  num_workers: int = 4
  source_path: str = ""


def dataset_name(text: str) -> str:
  """A TFDS-safe config name: lower case letters, digits and underscores."""
  name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
  if not name or not name[0].isalpha():
    name = f"d_{name}"
  return name


def _ordered_parallel_map(function: Callable[[_In], _Out], items: Sequence[_In],
                          num_workers: int, window: int = 64) -> Iterator[_Out]:
  """map() over threads that yields in input order and keeps at most `window` in flight."""
  if num_workers <= 1:
    yield from map(function, items)
    return
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
    pending: collections.deque = collections.deque()
    for item in items:
      pending.append(pool.submit(function, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that never looks for pre-computed info in TFDS's GCS bucket.

  These datasets only ever come from local files; TFDS's lookup (run for every new
  builder) would leave an empty temporary folder behind on each build.
  """

  def initialize_from_bucket(self) -> None:
    return None


class ClaspSpeechText(tfds.core.GeneratorBasedBuilder):
  """Speech-text pairs at 16 kHz mono with language, category, speaker and source labels.

  Examples are stored in the order the build yields them (sorted by id within each split);
  shuffling belongs to the input pipeline, whose order is a function of (seed, step). The
  metadata holds the bad-input counts and every example's length, which length bucketing
  needs without reading the audio.
  """

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "int16 16 kHz mono audio; text, language, category, "
                                    "speaker, source; bad-input counts and lengths in the "
                                    "metadata."}

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This module's file, found without importlib_resources.

    TFDS's own lookup probes `importlib_resources` (an etils[epath] extra that slim
    environments lack) for every builder that lives in a package; the builder only needs
    the path to look for a checksums file, which it does not have.
    """
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, data_dir: str, options: BuildOptions,
               examples: Sequence[SourceExample], policy: bad_input.BadInputPolicy):
    self._options = options
    self._examples = examples
    self._policy = policy
    self._build_metadata = tfds.core.MetadataDict()
    config = tfds.core.BuilderConfig(name=options.name,
                                     description=f"{options.kind} from {options.source_path}")
    super().__init__(data_dir=data_dir, config=config, file_format="array_record")

  @property
  def build_metadata(self) -> tfds.core.MetadataDict:
    """Saved as metadata.json next to the data; readers get it as `info.metadata`."""
    return self._build_metadata

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(
        builder=self,
        description="Speech-text pairs for CLASP retrieval training and evaluation.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                           encoding=tfds.features.Encoding.BYTES),
            "text": tfds.features.Text(),
            "language": tfds.features.Text(),
            "category": tfds.features.Text(),
            "speaker": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
        metadata=self._build_metadata,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Sources are local; nothing is downloaded.
    by_split = collections.defaultdict(list)
    for example in self._examples:
      by_split[example.split].append(example)
    generators = {}
    for split in SPLITS:
      if by_split[split]:
        generators[split] = self._generate_examples(split, sorted(by_split[split],
                                                                  key=lambda e: e.id))
      else:
        logging.warning("split %s has no examples and is not written", split)
    return generators

  def _generate_examples(self, split: str, examples: Sequence[SourceExample]):
    limits = self._options.limits
    lengths = self._build_metadata.setdefault("num_samples", {}).setdefault(split, [])
    # Each clip's peak before resampling, for the authors' normalisation order (reader.py).
    peaks = self._build_metadata.setdefault("source_peak", {}).setdefault(split, [])
    decoded = _ordered_parallel_map(
        lambda example: bad_input.decode_or_error(example.audio_path, limits), examples,
        self._options.num_workers)
    progress = cli.Progress(len(examples), "clips", verb=f"{self._options.name}/{split}: decoded")
    for position, (example, result) in enumerate(zip(examples, decoded)):
      clip = bad_input.accept_clip(result, self._policy)
      progress.update(position + 1)
      if clip is None:
        continue
      audio = np.clip(np.round(clip.audio * INT16_SCALE), -32768, 32767).astype(np.int16)
      lengths.append(int(audio.shape[0]))
      peaks.append(float(clip.source_peak))
      # Zero-padded keys keep the stored order equal to the yield order.
      yield f"{position:09d}", {
          "id": example.id,
          "audio": audio,
          "text": example.text,
          "language": example.language,
          "category": example.category,
          "speaker": example.speaker,
          "source": self._options.kind,
      }
    if not lengths:
      # TFDS cannot write an empty split, and one whose every input is bad means the
      # layout is broken (say, a split's audio was never extracted): say so plainly.
      skipped = {kind: n for kind, n in self._policy.skipped.items() if n}
      raise ValueError(f"split {split}: none of its {len(examples)} inputs is usable "
                       f"(skipped so far: {skipped}); see the log for the paths")


def _drop_unusable_rows(examples: Iterable[SourceExample],
                        policy: bad_input.BadInputPolicy) -> list[SourceExample]:
  """Empty transcripts and repeated ids, checked before splitting so they cannot skew it."""
  kept, seen = [], set()
  for example in examples:
    try:
      text = bad_input.check_text(example.text, example.audio_path)
    except bad_input.BadInputError as error:
      policy.reject(error)
      continue
    if example.id in seen:
      policy.reject(bad_input.BadInputError(example.audio_path, bad_input.DUPLICATE_ID,
                                            f"id {example.id!r} already used"))
      continue
    seen.add(example.id)
    kept.append(dataclasses.replace(example, text=text))
  return kept


def build_dataset(examples: Sequence[SourceExample], data_dir: str, options: BuildOptions,
                  overwrite: bool = False) -> str:
  """Checks, splits, decodes and writes `examples`; returns the dataset directory.

  Raises:
    bad_input.BadInputError: under `options.strict`, at the first unusable input.
    FileExistsError: the dataset exists and `overwrite` is False.
    ValueError: a split has inputs but none of them is usable.
  """
  options = dataclasses.replace(options, name=dataset_name(options.name))
  target = os.path.join(data_dir, BUILDER_NAME, options.name, DATASET_VERSION)
  if os.path.exists(target):
    if not overwrite:
      raise FileExistsError(f"{target} exists; pass --overwrite to rebuild it")
    shutil.rmtree(target)
  policy = bad_input.BadInputPolicy(strict=options.strict)
  rows = _drop_unusable_rows(examples, policy)
  rows = splits.assign_splits(rows, seed=options.seed)
  rows = splits.drop_shared_sentences(rows, policy)
  builder = ClaspSpeechText(data_dir=data_dir, options=options, examples=rows, policy=policy)
  builder_metadata = builder.build_metadata
  builder_metadata.update({
      "kind": options.kind,
      "source_path": options.source_path,
      "split_seed": options.seed,
      "sample_rate": audio_io.TARGET_SAMPLE_RATE,
      "audio_scale": INT16_SCALE,
      "strict": options.strict,
      "limits": dataclasses.asdict(options.limits),
  })
  with tempfile.TemporaryDirectory(prefix="clasp_tfds_downloads_") as download_dir:
    builder.download_and_prepare(download_dir=download_dir)
  # Counts are final only now; rewrite the metadata TFDS saved after the last split.
  summary = policy.summary()
  builder_metadata["bad_input"] = summary
  builder_metadata.save_metadata(builder.data_dir)
  written = {split: len(builder_metadata["num_samples"].get(split, [])) for split in SPLITS}
  logging.info("built %s: %s examples written, skipped %s, converted %s", builder.data_dir,
               written, {k: v for k, v in summary["skipped"].items() if v},
               {k: v for k, v in summary["converted"].items() if v})
  return os.fspath(builder.data_dir)
