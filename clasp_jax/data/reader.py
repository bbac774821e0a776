"""Random access to built datasets, one split or several concatenated.

Reading goes through TFDS's array_record data source (no TensorFlow): any example can be
fetched by index, which is what a step-addressed, per-process input pipeline needs.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

_TEXT_FIELDS = ("id", "text", "language", "category", "speaker", "source")


def find_dataset_dir(path: str | os.PathLike) -> str:
  """The directory holding dataset_info.json: `path` itself or its only such descendant."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(glob.glob(os.path.join(glob.escape(path), "**", "dataset_info.json"),
                           recursive=True))
  if len(found) == 1:
    return os.path.dirname(found[0])
  if not found:
    raise FileNotFoundError(f"no built dataset (dataset_info.json) under {path}")
  raise ValueError(f"several datasets under {path}; pass one of: "
                   + ", ".join(os.path.dirname(f) for f in found))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The build metadata: bad-input counts, lengths per split, limits, source."""
  with open(os.path.join(find_dataset_dir(path), "metadata.json"), encoding="utf-8") as f:
    return json.load(f)


def _decode(record: dict[str, Any]) -> dict[str, Any]:
  decoded = dict(record)
  for field in _TEXT_FIELDS:
    value = decoded[field]
    decoded[field] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
  return decoded


class SpeechTextSplit:
  """One split of one built dataset.

  Items are dicts with `audio` (int16 (num_samples,)) and the text fields as `str`, and
  `source_peak` (float: the clip's peak before it was resampled, in the units of `audio` /
  audio_scale, which the authors divided by) when the dataset recorded it (datasets built
  before it did have no such key: normalise by the peak of `audio` then).
  `lengths` holds every example's sample count (from the metadata, without reading audio).
  """

  def __init__(self, path: str | os.PathLike, split: str):
    self.dataset_dir = find_dataset_dir(path)
    builder = tfds.builder_from_directory(self.dataset_dir)
    if split not in builder.info.splits:
      raise ValueError(f"{self.dataset_dir} has no split {split!r}; it has "
                       f"{sorted(builder.info.splits)}")
    self.split = split
    self.metadata = read_metadata(self.dataset_dir)
    self._source = builder.as_data_source(split)
    self.lengths = np.asarray(self.metadata["num_samples"][split], dtype=np.int64)
    if len(self.lengths) != len(self._source):
      raise ValueError(f"{self.dataset_dir}: metadata lists {len(self.lengths)} lengths for "
                       f"{split} but the split holds {len(self._source)} examples")
    peaks = self.metadata.get("source_peak", {}).get(split)
    self.source_peaks = None if peaks is None else np.asarray(peaks, dtype=np.float64)
    if self.source_peaks is not None and len(self.source_peaks) != len(self.lengths):
      raise ValueError(f"{self.dataset_dir}: metadata lists {len(self.source_peaks)} peaks for "
                       f"{split} but the split holds {len(self.lengths)} examples")

  def __len__(self) -> int:
    return len(self._source)

  def _with_peak(self, record: dict[str, Any], index: int) -> dict[str, Any]:
    if self.source_peaks is not None:
      record["source_peak"] = float(self.source_peaks[index])
    return record

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._with_peak(_decode(self._source[int(index)]), int(index))

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Several examples at once (array_record batches the reads)."""
    indices = [int(i) for i in indices]
    records = self._source.__getitems__(indices)
    return [self._with_peak(_decode(record), index) for record, index in zip(records, indices)]


class ConcatenatedSplit:
  """Several splits read as one (e.g. Speech Brown + FLEURS + Common Voice training)."""

  def __init__(self, parts: Sequence[SpeechTextSplit]):
    if not parts:
      raise ValueError("no splits to concatenate")
    self.parts = list(parts)
    self._offsets = np.cumsum([0] + [len(part) for part in self.parts])
    self.lengths = np.concatenate([part.lengths for part in self.parts])

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _locate(self, index: int) -> tuple[SpeechTextSplit, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} outside [0, {len(self)})")
    part = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return self.parts[part], int(index - self._offsets[part])

  def __getitem__(self, index: int) -> dict[str, Any]:
    part, local = self._locate(int(index))
    return part[local]

  def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]


def open_split(paths: str | os.PathLike | Sequence[str | os.PathLike],
               split: str) -> SpeechTextSplit | ConcatenatedSplit:
  """Opens `split` of one dataset, or of several concatenated in the given order."""
  if isinstance(paths, (str, os.PathLike)):
    return SpeechTextSplit(paths, split)
  parts = [SpeechTextSplit(path, split) for path in paths]
  return parts[0] if len(parts) == 1 else ConcatenatedSplit(parts)
