"""Reading audio files of any common format as 16 kHz mono float32.

Shared by the speech towers' CLIs and the dataset builders, so every entry point decodes,
mixes and resamples the same way.
"""

from __future__ import annotations

import math
import os

import numpy as np
import scipy.signal
import soundfile

TARGET_SAMPLE_RATE = 16_000


class UnusableInputError(Exception):
  """A file that cannot be used; `kind` (one of the subclass' KINDS) says why, for counted skips.

  The message is "PATH: <what> (detail)", where `describe(kind)` gives <what>.
  """

  KINDS: tuple[str, ...] = ()

  def __init__(self, path: str, kind: str, detail: str = ""):
    assert kind in self.KINDS, kind
    self.path = os.fspath(path)
    self.kind = kind
    self.detail = detail
    message = f"{self.path}: {self.describe(kind)}"
    if detail:
      message += f" ({detail})"
    super().__init__(message)

  @staticmethod
  def describe(kind: str) -> str:
    return kind


class AudioReadError(UnusableInputError):
  """An audio file that cannot be read."""

  KINDS = ("missing", "empty", "undecodable")

  @staticmethod
  def describe(kind: str) -> str:
    return f"{kind} audio file"


def to_mono(audio: np.ndarray) -> np.ndarray:
  """Averages channels: (frames,) or (frames, channels) -> (frames,)."""
  audio = np.asarray(audio, dtype=np.float32)
  if audio.ndim == 2:
    audio = audio.mean(axis=1)
  elif audio.ndim != 1:
    raise ValueError(f"audio must be (frames,) or (frames, channels), got {audio.shape}")
  return audio


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
  """Polyphase resampling with an anti-aliasing filter (exact for integer rate ratios)."""
  if source_rate == target_rate:
    return np.asarray(audio, dtype=np.float32)
  if source_rate <= 0 or target_rate <= 0:
    raise ValueError(f"sample rates must be positive, got {source_rate} -> {target_rate}")
  divisor = math.gcd(int(source_rate), int(target_rate))
  up, down = target_rate // divisor, source_rate // divisor
  return scipy.signal.resample_poly(audio, up, down).astype(np.float32)


def read_audio(path: str | os.PathLike, sample_rate: int = TARGET_SAMPLE_RATE):
  """Returns (audio float32 mono at `sample_rate`, original sample rate, channel count).

  Raises AudioReadError for missing, empty and undecodable files (truncated files that
  libsndfile still opens yield the frames it could read).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise AudioReadError(path, "missing")
  if os.path.getsize(path) == 0:
    raise AudioReadError(path, "empty", "0 bytes")
  try:
    audio, source_rate = soundfile.read(path, dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
    raise AudioReadError(path, "undecodable", str(error).strip()) from None
  channels = audio.shape[1]
  if audio.shape[0] == 0:
    raise AudioReadError(path, "empty", "no audio frames")
  audio = resample(to_mono(audio), source_rate, sample_rate)
  return audio, int(source_rate), int(channels)


def load_audio(path: str | os.PathLike, sample_rate: int = TARGET_SAMPLE_RATE) -> np.ndarray:
  """Decodes `path` to mono float32 at `sample_rate`; see `read_audio` for errors."""
  return read_audio(path, sample_rate)[0]


def is_silent(audio: np.ndarray, threshold: float = 1e-6) -> bool:
  """True when no sample rises above `threshold` in magnitude (peak normalising would divide by ~0)."""
  return audio.size == 0 or float(np.max(np.abs(audio))) <= threshold


def peak_normalize(audio: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """x / max|x| as in the paper, but finite for silent clips (the paper divided by zero)."""
  peak = np.max(np.abs(audio), axis=-1, keepdims=True) if audio.size else 0.0
  return (audio / np.maximum(peak, eps)).astype(np.float32)
