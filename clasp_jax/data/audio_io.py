"""Reading audio files of any common format as 16 kHz mono float32.

Shared by the speech towers' CLIs and the dataset builders, so every entry point decodes,
mixes and resamples the same way, and the way the authors did: `librosa.load(path, sr=16000)`
(channels averaged, then resampled by soxr at its 'HQ' quality, the length fixed to
ceil(n * ratio)), with the peak normalisation x / max|x| applied to the audio at its source
rate, before resampling, as their extraction code divides before it resamples.
"""

from __future__ import annotations

import math
import os

import numpy as np
import soundfile
import soxr

TARGET_SAMPLE_RATE = 16_000

# What a folder walk takes for audio: every format libsndfile reads, plus .m4a, which releases
# ship and libsndfile cannot decode; listing it turns such a file into a named "undecodable"
# error instead of a silent gap.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aiff", ".aif",
                    ".aifc", ".au", ".snd", ".w64", ".caf", ".rf64")


def is_audio_file(name: str) -> bool:
  """Whether a file name has one of `AUDIO_EXTENSIONS` (any case)."""
  return name.lower().endswith(AUDIO_EXTENSIONS)


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
  """librosa.resample(res_type='soxr_hq'): soxr at HQ quality, length ceil(n * ratio)."""
  audio = np.asarray(audio, dtype=np.float32)
  if source_rate == target_rate:
    return audio
  if source_rate <= 0 or target_rate <= 0:
    raise ValueError(f"sample rates must be positive, got {source_rate} -> {target_rate}")
  resampled = soxr.resample(audio, source_rate, target_rate, quality="HQ")
  length = int(math.ceil(audio.shape[0] * float(target_rate) / source_rate))
  if resampled.shape[0] < length:
    resampled = np.pad(resampled, (0, length - resampled.shape[0]))
  return np.asarray(resampled[:length], dtype=np.float32)


def peak(audio: np.ndarray) -> float:
  """max |x|, 0 for no samples."""
  return float(np.max(np.abs(audio))) if np.size(audio) else 0.0


def peak_normalize(audio: np.ndarray, eps: float = 1e-6,
                   source_peak: float | None = None) -> np.ndarray:
  """x / max|x| as in the paper, but finite for silent clips (the paper divided by zero).

  `source_peak`: divide by this peak instead, the one the clip had at its source rate before
  it was resampled (what the authors divided by; built datasets record it).
  """
  if source_peak is not None:
    divisor = np.float32(max(float(source_peak), eps))
    return (np.asarray(audio, np.float32) / divisor).astype(np.float32)
  maximum = np.max(np.abs(audio), axis=-1, keepdims=True) if audio.size else 0.0
  return (audio / np.maximum(maximum, eps)).astype(np.float32)


# read_audio's keyword of the same name shadows it there.
_divide_by_peak = peak_normalize


def read_audio(path: str | os.PathLike, sample_rate: int = TARGET_SAMPLE_RATE, *,
               peak_normalize: bool = False):
  """Returns (audio float32 mono at `sample_rate`, original sample rate, channel count).

  With `peak_normalize` the mono audio is divided by its peak at the source rate, before
  resampling (the authors' order; the resampled peak may differ slightly from 1).

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
  audio = to_mono(audio)
  if peak_normalize:
    audio = _divide_by_peak(audio)
  audio = resample(audio, source_rate, sample_rate)
  return audio, int(source_rate), int(channels)


def load_audio(path: str | os.PathLike, sample_rate: int = TARGET_SAMPLE_RATE, *,
               peak_normalize: bool = False) -> np.ndarray:
  """Decodes `path` to mono float32 at `sample_rate`; see `read_audio`."""
  return read_audio(path, sample_rate, peak_normalize=peak_normalize)[0]


def is_silent(audio: np.ndarray, threshold: float = 1e-6) -> bool:
  """True when no sample rises above `threshold` in magnitude (peak normalising would divide by ~0)."""
  return audio.size == 0 or float(np.max(np.abs(audio))) <= threshold
