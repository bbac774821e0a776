"""Audio files to padded batches for the speech towers: listing, reading, padding, running.

Shared by `embed speech`, `transcribe` and their Python APIs (`inference/speech.py`). A bad
file (unreadable, or shorter than the encoder's receptive field) is a per-file failure, never
an exception, so one run can report every bad file at once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from clasp_jax.data import audio_io
from clasp_jax.models import wav2vec2
from clasp_jax.models import wav2vec2_checkpoint

# Batches are padded up to a multiple of this many seconds so that jit compiles a handful
# of shapes, not one per clip length.
PAD_MULTIPLE_SECONDS = 1.0


class InputListError(ValueError):
  """--input names nothing usable (missing path, empty folder or list)."""


class ClipTooShortError(Exception):
  """A clip shorter than the encoder's receptive field, which yields no frame at all."""

  def __init__(self, path: str, samples: int, needed: int, sample_rate: int):
    self.path = path
    super().__init__(f"{path}: too short ({samples} samples; the encoder needs at least {needed}, "
                     f"{1000 * needed / sample_rate:.0f} ms at {sample_rate} Hz)")


def list_audio_inputs(input_path: str | os.PathLike) -> list[str]:
  """Audio paths named by --input: a folder's audio files, or the lines of a list file."""
  input_path = os.fspath(input_path)
  if os.path.isdir(input_path):
    paths = []
    for root, folders, files in os.walk(input_path):
      folders.sort()
      paths.extend(os.path.join(root, name) for name in files if audio_io.is_audio_file(name))
    paths.sort()
    if not paths:
      raise InputListError(
          f"{input_path}: folder holds no audio files ({', '.join(audio_io.AUDIO_EXTENSIONS)})")
    return paths
  if not os.path.exists(input_path):
    raise InputListError(f"{input_path}: no such file or folder")
  base = os.path.dirname(os.path.abspath(input_path))
  paths = []
  with open(input_path, encoding="utf-8") as list_file:
    for line in list_file:
      line = line.strip()
      if line and not line.startswith("#"):
        paths.append(line if os.path.isabs(line) else os.path.join(base, line))
  if not paths:
    raise InputListError(f"{input_path}: list file names no audio paths")
  return paths


@dataclasses.dataclass
class ReadFailure:
  path: str
  message: str


def read_clips(paths: Iterable[str], sample_rate: int, min_samples: int,
               prepare: Callable[[np.ndarray], np.ndarray], *, peak_normalize: bool = False
               ) -> Iterator[tuple[str, np.ndarray | ReadFailure]]:
  """Yields (path, prepared waveform) or (path, ReadFailure) in order, never raising per file.

  peak_normalize divides each clip by its peak at the source rate, before resampling (the
  authors' order; see audio_io).
  """
  for path in paths:
    try:
      waveform, _, _ = audio_io.read_audio(path, sample_rate, peak_normalize=peak_normalize)
      if waveform.shape[0] < min_samples:
        raise ClipTooShortError(path, waveform.shape[0], min_samples, sample_rate)
      yield path, prepare(waveform)
    except (audio_io.AudioReadError, ClipTooShortError) as error:
      yield path, ReadFailure(path, str(error))


def pad_batch(waveforms: Sequence[np.ndarray], batch_size: int, pad_multiple: int):
  """Right-pads clips into (batch_size, length) with length a multiple of `pad_multiple`.

  Missing rows (a short last batch) are zero-length, so every batch has one shape per length
  bucket and jit never recompiles for the tail.
  """
  longest = max(waveform.shape[0] for waveform in waveforms)
  length = -(-longest // pad_multiple) * pad_multiple
  batch = np.zeros((batch_size, length), np.float32)
  lengths = np.zeros((batch_size,), np.int32)
  for row, waveform in enumerate(waveforms):
    batch[row, :waveform.shape[0]] = waveform
    lengths[row] = waveform.shape[0]
  return batch, lengths


@dataclasses.dataclass
class BatchRunResult:
  """Outputs per good file in input order, and the failures met."""

  paths: list[str]
  outputs: list
  failures: list[ReadFailure]


def run_batches(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint, paths: Sequence[str],
                forward: Callable[[np.ndarray, np.ndarray], list], *, batch_size: int,
                skip_bad: bool, peak_normalize: bool,
                progress: Callable[[int, int], None] | None = None,
                on_failure: Callable[[ReadFailure], None] | None = None) -> BatchRunResult:
  """Reads, batches and runs `forward(batch, lengths) -> per-row outputs` over all paths.

  Without `skip_bad` the model stops at the first bad file, but the remaining files are
  still read so that every bad file is reported at once. `progress(done, total)` follows the
  files read; `on_failure` hears of each bad file as it is met.
  """
  preprocessing = checkpoint.preprocessing
  prepare = preprocessing.apply  # Peak normalisation happens as the file is read.

  min_samples = wav2vec2.receptive_field(checkpoint.config)
  pad_multiple = max(min_samples, int(PAD_MULTIPLE_SECONDS * preprocessing.sampling_rate))
  result = BatchRunResult([], [], [])
  pending_paths, pending_clips = [], []

  def flush():
    if pending_clips and (skip_bad or not result.failures):
      batch, lengths = pad_batch(pending_clips, batch_size, pad_multiple)
      result.outputs.extend(forward(batch, lengths)[:len(pending_clips)])
      result.paths.extend(pending_paths)
    pending_paths.clear()
    pending_clips.clear()

  clips = read_clips(paths, preprocessing.sampling_rate, min_samples, prepare,
                     peak_normalize=peak_normalize)
  for done, (path, clip) in enumerate(clips, start=1):
    if isinstance(clip, ReadFailure):
      result.failures.append(clip)
      if on_failure is not None:
        on_failure(clip)
    else:
      pending_paths.append(path)
      pending_clips.append(clip)
      if len(pending_clips) == batch_size:
        flush()
    # The last files' line waits for their batch: "done" means embedded, not only read.
    if progress is not None and done < len(paths):
      progress(done, len(paths))
  flush()
  if progress is not None:
    progress(len(paths), len(paths))
  return result
