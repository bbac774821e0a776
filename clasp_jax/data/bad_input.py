"""What a dataset build does with unusable inputs: skip and count by default, stop under strict.

Real corpora hold missing, empty, truncated or non-audio files, silent clips, clips far
longer than training can use, odd sample rates and channel layouts, and empty transcripts.
Every such input is either skipped and counted (so the build log and the dataset metadata
say exactly what was dropped and why) or, under `strict`, stops the build with the
offending path. Odd sample rates and channel counts are converted (resampled to 16 kHz,
mixed to mono) and counted, because the audio itself is fine.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import struct

from absl import logging
import numpy as np
import soundfile

from clasp_jax.data import audio_io

# Inputs that are skipped (or stop a strict build).
MISSING = "missing"
EMPTY = "empty"
TRUNCATED = "truncated"
NOT_AUDIO = "not_audio"
SILENT = "silent"
TOO_LONG = "too_long"
LOW_SAMPLE_RATE = "low_sample_rate"
EMPTY_TEXT = "empty_text"
DUPLICATE_ID = "duplicate_id"
SHARED_SENTENCE = "shared_sentence"
SKIP_KINDS = (MISSING, EMPTY, TRUNCATED, NOT_AUDIO, SILENT, TOO_LONG, LOW_SAMPLE_RATE,
              EMPTY_TEXT, DUPLICATE_ID, SHARED_SENTENCE)

# Inputs that are kept after conversion; counted so a surprising source shows up.
RESAMPLED = "resampled"
DOWNMIXED = "downmixed"
CONVERT_KINDS = (RESAMPLED, DOWNMIXED)

# Leading bytes of the containers libsndfile reads; a file that starts like one of them but
# does not decode to the end is truncated (or corrupt), anything else is not audio.
_MAGIC_PREFIXES = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM", b".snd", b"caff")


class BadInputError(audio_io.UnusableInputError):
  """An input the policy rejects; `kind` is one of SKIP_KINDS."""

  KINDS = SKIP_KINDS


@dataclasses.dataclass(frozen=True)
class AudioLimits:
  """Thresholds that decide whether decoded audio is usable for training.

  Attributes:
    max_duration_s: clips longer than this are skipped (the input pipeline crops to its own,
      usually shorter, maximum; this bound keeps absurd files out of the dataset).
    min_sample_rate: sources below this rate lack the speech band HuBERT was trained on.
    silence_peak: a clip whose peak magnitude is at or below this is silent; peak
      normalisation would divide by ~0 (the paper's NaN).
  """

  max_duration_s: float = 30.0
  min_sample_rate: int = 8_000
  silence_peak: float = 1e-4


@dataclasses.dataclass
class Clip:
  """Decoded audio at 16 kHz mono, with what the source looked like."""

  audio: np.ndarray  # (num_samples,) float32 in [-1, 1]
  source_sample_rate: int
  source_channels: int


class BadInputPolicy:
  """Counts skipped and converted inputs, or raises on the first skip when `strict`."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.skipped: collections.Counter[str] = collections.Counter()
    self.converted: collections.Counter[str] = collections.Counter()

  def reject(self, error: BadInputError) -> None:
    """Records a skip; re-raises it under strict so the build stops at that path."""
    if self.strict:
      raise error
    self.skipped[error.kind] += 1
    logging.warning("skipping %s", error)

  def note_conversion(self, kind: str) -> None:
    assert kind in CONVERT_KINDS, kind
    self.converted[kind] += 1

  def summary(self) -> dict[str, dict[str, int]]:
    """Every kind with its count (zeros included, so the metadata lists what was checked)."""
    return {
        "skipped": {kind: int(self.skipped[kind]) for kind in SKIP_KINDS},
        "converted": {kind: int(self.converted[kind]) for kind in CONVERT_KINDS},
    }


def check_text(text: str | None, path: str) -> str:
  """Returns the stripped text; empty or whitespace-only text is a BadInputError."""
  stripped = " ".join((text or "").split())
  if not stripped:
    raise BadInputError(path, EMPTY_TEXT, "no transcript")
  return stripped


def _wav_data_shortfall(path: str) -> int:
  """Bytes missing from a RIFF/WAVE data chunk (0 when complete or not a plain WAV).

  libsndfile silently shortens a cut WAV to what is present, so truncation has to be read
  from the header: the data chunk declares more bytes than the file holds.
  """
  file_size = os.path.getsize(path)
  with open(path, "rb") as stream:
    header = stream.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
      return 0
    offset = 12
    while offset + 8 <= file_size:
      stream.seek(offset)
      chunk_id, chunk_size = struct.unpack("<4sI", stream.read(8))
      if chunk_id == b"data":
        if chunk_size in (0, 0xFFFFFFFF):  # Streaming writers leave the size unset.
          return 0
        return max(0, chunk_size - (file_size - offset - 8))
      offset += 8 + chunk_size + (chunk_size & 1)
  return 0


def _looks_like_audio(path: str) -> bool:
  with open(path, "rb") as stream:
    head = stream.read(4)
  if head.startswith(_MAGIC_PREFIXES):
    return True
  # An MPEG audio frame starts with an 11-bit sync word.
  return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


def decode_clip(path: str | os.PathLike, limits: AudioLimits) -> Clip:
  """Decodes `path` to 16 kHz mono float32 or raises BadInputError saying why it is unusable.

  Raises:
    BadInputError: kind missing, empty, truncated, not_audio, low_sample_rate, too_long or
      silent.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise BadInputError(path, MISSING)
  if os.path.getsize(path) == 0:
    raise BadInputError(path, EMPTY, "0 bytes")
  shortfall = _wav_data_shortfall(path)
  if shortfall:
    raise BadInputError(path, TRUNCATED, f"WAV data chunk is {shortfall} bytes short")
  try:
    info = soundfile.info(path)
  except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
    kind = TRUNCATED if _looks_like_audio(path) else NOT_AUDIO
    raise BadInputError(path, kind, str(error).strip()) from None
  try:
    audio, source_rate = soundfile.read(path, dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as error:
    raise BadInputError(path, TRUNCATED, str(error).strip()) from None
  if audio.shape[0] == 0:
    raise BadInputError(path, EMPTY, "no audio frames")
  # MP3 frame counts from the header are estimates; only a clear shortfall is truncation.
  if info.frames > 0 and audio.shape[0] < 0.98 * info.frames - 2 * 1152:
    raise BadInputError(path, TRUNCATED,
                        f"decoded {audio.shape[0]} of {info.frames} frames in the header")
  if source_rate < limits.min_sample_rate:
    raise BadInputError(path, LOW_SAMPLE_RATE,
                        f"{source_rate} Hz < {limits.min_sample_rate} Hz")
  duration_s = audio.shape[0] / source_rate
  if duration_s > limits.max_duration_s:
    raise BadInputError(path, TOO_LONG, f"{duration_s:.1f} s > {limits.max_duration_s:.1f} s")
  channels = audio.shape[1]
  mono = audio_io.resample(audio_io.to_mono(audio), source_rate, audio_io.TARGET_SAMPLE_RATE)
  peak = float(np.max(np.abs(mono))) if mono.size else 0.0
  if peak <= limits.silence_peak:
    raise BadInputError(path, SILENT, f"peak {peak:.2e} <= {limits.silence_peak:.0e}")
  return Clip(audio=np.clip(mono, -1.0, 1.0), source_sample_rate=int(source_rate),
              source_channels=int(channels))


def decode_or_error(path: str | os.PathLike, limits: AudioLimits) -> Clip | BadInputError:
  """decode_clip that returns the error instead of raising (for worker threads).

  Workers only decode; the build's main thread hands each result to the policy in input
  order, so counts need no lock and a strict build stops at the first bad path in order.
  """
  try:
    return decode_clip(path, limits)
  except BadInputError as error:
    return error


def accept_clip(result: Clip | BadInputError, policy: BadInputPolicy) -> Clip | None:
  """Applies `policy` to a decode result: None for a counted skip, conversions counted."""
  if isinstance(result, BadInputError):
    policy.reject(result)
    return None
  if result.source_sample_rate != audio_io.TARGET_SAMPLE_RATE:
    policy.note_conversion(RESAMPLED)
  if result.source_channels != 1:
    policy.note_conversion(DOWNMIXED)
  return result
