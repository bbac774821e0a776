"""Speaking fortunes sentences with espeak-ng: the offline corpus behind `synthesize`.

Sentences come from `fortunes`; each language gets several synthetic speakers (espeak-ng
voice, variant, speed and pitch drawn from the seed); every utterance is resampled to
16 kHz and written as a WAV file listed in a JSONL manifest, which is then built like any
other manifest dataset. espeak-ng runs in parallel processes; all choices come from the
seed, so a seed always gives the same manifest and audio files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from typing import Sequence

from absl import logging
import numpy as np
import soundfile

from clasp_jax.common import cli
from clasp_jax.data import audio_io
from clasp_jax.data import fortunes
from clasp_jax.data.sources import manifest
from clasp_jax.data import splits
from clasp_jax.data import tfds_builder
from clasp_jax.data.sources.source import SPLITS, SourceExample

KIND = "synthetic"
DATASET_NAME = "fortunes_espeak"
# espeak-ng's own voices (no MBROLA) per language; the first is the language's default.
VOICES = {
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd"),
    "de": ("de",),
    "es": ("es", "es-419"),
    "it": ("it",),
}
# Human-sounding voice variants shipped with espeak-ng (male m1-m7, female f1-f5).
VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
SPEED_WPM = (130, 190)
PITCH = (25, 75)


class SynthesisError(RuntimeError):
  """espeak-ng is missing or failed on a sentence."""


@dataclasses.dataclass(frozen=True)
class Speaker:
  """One synthetic speaker: an espeak-ng voice and variant at a fixed speed and pitch."""

  id: str
  voice: str
  variant: str
  speed_wpm: int
  pitch: int

  def espeak_arguments(self) -> list[str]:
    voice = f"{self.voice}+{self.variant}" if self.variant else self.voice
    return ["-v", voice, "-s", str(self.speed_wpm), "-p", str(self.pitch)]


def espeak_data_dir(espeak: str) -> str | None:
  """Where espeak-ng keeps its voices ("Data at: ..." in its version line)."""
  try:
    version = subprocess.run([espeak, "--version"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  match = re.search(r"Data at:\s*(\S+)", version)
  return match.group(1) if match else None


def installed_variants(espeak: str) -> tuple[str, ...]:
  """The VARIANTS this espeak-ng has (all of them on Debian's espeak-ng-data)."""
  data_dir = espeak_data_dir(espeak)
  if data_dir is None:
    return ()
  folder = os.path.join(data_dir, "voices", "!v")
  return tuple(v for v in VARIANTS if os.path.isfile(os.path.join(folder, v)))


def make_speakers(language: str, count: int, seed: int,
                  variants: Sequence[str]) -> list[Speaker]:
  """`count` speakers that differ in voice/variant, speed and pitch, drawn from `seed`."""
  language_index = list(fortunes.LANGUAGE_FOLDERS).index(language)
  rng = np.random.default_rng([seed, language_index, 1])
  voices = VOICES[language]
  variant_order = [variants[i] for i in rng.permutation(len(variants))] if variants else [""]
  speakers = []
  for number in range(count):
    speakers.append(Speaker(
        id=f"{language}-s{number:02d}",
        voice=voices[number % len(voices)],
        variant=variant_order[number % len(variant_order)],
        speed_wpm=int(rng.integers(SPEED_WPM[0], SPEED_WPM[1] + 1)),
        pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
    ))
  return speakers


def plan_corpus(sentences: Sequence[fortunes.Sentence], output: str, seed: int,
                speakers: dict[str, list[Speaker]]) -> list[tuple[SourceExample, Speaker]]:
  """Utterance ids, speakers, audio paths and per-language sentence splits."""
  planned = []
  by_language = collections.defaultdict(list)
  for sentence in sentences:
    by_language[sentence.language].append(sentence)
  for language_index, (language, group) in enumerate(by_language.items()):
    rng = np.random.default_rng([seed, language_index, 2])
    choices = rng.integers(0, len(speakers[language]), size=len(group))
    examples = []
    for number, (sentence, choice) in enumerate(zip(group, choices)):
      speaker = speakers[language][int(choice)]
      utterance_id = f"{language}-{number:05d}"
      examples.append((SourceExample(
          id=utterance_id,
          audio_path=os.path.join(output, "audio", language, f"{utterance_id}.wav"),
          text=sentence.text,
          language=language,
          category=sentence.category,
          speaker=speaker.id,
      ), speaker))
    # Split each language on its own, so every split holds every language.
    split_examples = splits.assign_splits([e for e, _ in examples], seed=seed + language_index)
    planned += [(split_example, speaker) for split_example, (_, speaker)
                in zip(split_examples, examples)]
  return planned


def speak(example: SourceExample, speaker: Speaker, espeak: str) -> float:
  """Writes one utterance as 16 kHz 16-bit mono WAV; returns its duration in seconds."""
  os.makedirs(os.path.dirname(example.audio_path), exist_ok=True)
  raw_path = example.audio_path + ".espeak.wav"
  command = [espeak, "-b", "1", *speaker.espeak_arguments(), "-w", raw_path, "--stdin"]
  try:
    subprocess.run(command, input=example.text.encode("utf-8"), capture_output=True,
                   check=True, timeout=120)
    audio, rate = soundfile.read(raw_path, dtype="float32", always_2d=True)
  except (OSError, subprocess.SubprocessError, soundfile.LibsndfileError) as error:
    detail = getattr(error, "stderr", b"") or b""
    raise SynthesisError(f"espeak-ng failed on {example.id} ({' '.join(command)}): "
                         f"{error} {detail.decode(errors='replace').strip()}") from None
  finally:
    if os.path.exists(raw_path):
      os.remove(raw_path)
  audio = audio_io.resample(audio_io.to_mono(audio), rate, audio_io.TARGET_SAMPLE_RATE)
  partial_path = example.audio_path + ".partial"
  soundfile.write(partial_path, np.clip(audio, -1.0, 1.0), audio_io.TARGET_SAMPLE_RATE,
                  subtype="PCM_16", format="WAV")
  os.replace(partial_path, example.audio_path)
  return audio.shape[0] / audio_io.TARGET_SAMPLE_RATE


def synthesize_corpus(output: str, languages: Sequence[str], num_sentences: int, seed: int,
                      speakers_per_language: int = 8, num_workers: int = 2,
                      fortunes_dir: str = fortunes.DEFAULT_FORTUNES_DIR,
                      espeak: str = "espeak-ng", build: bool = True,
                      overwrite: bool = False) -> dict:
  """Writes the corpus to `output`; returns its summary (also saved as summary.json).

  Raises:
    SynthesisError: espeak-ng is missing or fails.
    FileExistsError: `output` already holds a corpus and `overwrite` is False.
    ValueError, FileNotFoundError: unknown language or fortunes not installed.
  """
  started = time.monotonic()
  unknown = [language for language in languages if language not in VOICES]
  if unknown:
    raise ValueError(f"languages {unknown} have no fortunes package; choose from "
                     f"{', '.join(VOICES)}")
  if shutil.which(espeak) is None:
    raise SynthesisError(f"{espeak} not found: install espeak-ng "
                         "(scripts/install_system_packages.sh)")
  manifest_path = os.path.join(output, "manifest.jsonl")
  if os.path.exists(manifest_path):
    if not overwrite:
      raise FileExistsError(f"{output} already holds a corpus; pass --overwrite to replace it")
    for stale in ("audio", "tfds"):
      shutil.rmtree(os.path.join(output, stale), ignore_errors=True)
  os.makedirs(output, exist_ok=True)

  sentences = fortunes.sample_sentences(languages, num_sentences, seed, fortunes_dir)
  variants = installed_variants(espeak)
  speakers = {language: make_speakers(language, speakers_per_language, seed, variants)
              for language in languages}
  planned = plan_corpus(sentences, output, seed, speakers)
  logging.info("speaking %d sentences in %s with %d workers", len(planned),
               ",".join(languages), num_workers)

  durations = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
    futures = [pool.submit(speak, example, speaker, espeak) for example, speaker in planned]
    progress = cli.Progress(len(futures), "utterances", verb="spoken")
    for done, future in enumerate(futures, start=1):
      durations.append(future.result())
      progress.update(done)
  synthesis_s = time.monotonic() - started
  examples = [example for example, _ in planned]
  manifest.write_manifest(manifest_path, examples)

  summary = {
      "utterances": len(examples),
      "hours": round(sum(durations) / 3600, 3),
      "per_language_split": {
          language: {split: sum(e.language == language and e.split == split
                                for e in examples) for split in SPLITS}
          for language in languages},
      "speakers": {language: [dataclasses.asdict(s) for s in group]
                   for language, group in speakers.items()},
      "manifest": manifest_path,
      "synthesis_seconds": round(synthesis_s, 1),
  }
  if build:
    options = tfds_builder.BuildOptions(name=DATASET_NAME, kind=KIND, seed=seed,
                                        num_workers=max(1, num_workers),
                                        source_path=manifest_path)
    summary["dataset_dir"] = tfds_builder.build_dataset(
        manifest.read_examples(manifest_path), os.path.join(output, "tfds"), options,
        overwrite=True)
  summary["total_seconds"] = round(time.monotonic() - started, 1)
  with open(os.path.join(output, "summary.json"), "w", encoding="utf-8") as stream:
    json.dump(summary, stream, indent=2)
  return summary
