"""Speech Brown (HF llm-lab/SpeechBrown) from its released layout.

The release is `global_metadata.json` plus ten zip parts of synthesised clips (one
Tacotron2 + WaveGlow voice). Extract the parts anywhere under one folder next to the
metadata; clips are found by their recorded path, else by file name. The release has no
split: the build assigns a seeded 80/10/10 split over distinct sentences, computed over
every metadata entry so that extracting only some parts does not move sentences between
splits (the clips of missing parts are counted as missing).
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from clasp_jax.data.sources.layout import AudioIndex
from clasp_jax.data.sources.source import SourceExample

KIND = "speech_brown"
METADATA_FILE = "global_metadata.json"
LANGUAGE = "en"
SPEAKER = "tacotron2_waveglow"
CATEGORIES = ("adventure", "belles_lettres", "editorial", "fiction", "government", "hobbies",
              "humor", "learned", "lore", "mystery", "news", "religion", "reviews", "romance",
              "science_fiction")


def _records(metadata: Any, path: str) -> list[dict[str, Any]]:
  """Entries of the metadata file, a list of objects or an object keyed by id."""
  if isinstance(metadata, list):
    return metadata
  if isinstance(metadata, dict) and all(isinstance(v, dict) for v in metadata.values()):
    return [{"id": key, **value} for key, value in metadata.items()]
  raise ValueError(f"{path}: expected a list of entries or an object keyed by id")


def read_examples(root: str | os.PathLike) -> list[SourceExample]:
  """Reads `root/global_metadata.json`; each entry needs audio_file_path, category, text."""
  root = os.fspath(root)
  metadata_path = os.path.join(root, METADATA_FILE)
  if not os.path.isfile(metadata_path):
    raise FileNotFoundError(f"{metadata_path} not found: point --source at the folder holding "
                            f"the Speech Brown {METADATA_FILE} and the extracted parts")
  with open(metadata_path, encoding="utf-8") as stream:
    records = _records(json.load(stream), metadata_path)
  index = AudioIndex(root)
  examples, unknown_categories = [], set()
  for number, record in enumerate(records):
    recorded = record.get("audio_file_path") or record.get("audio_path") or ""
    if not recorded:
      raise ValueError(f"{metadata_path}: entry {number} has no audio_file_path")
    category = str(record.get("category", "")).strip()
    if category not in CATEGORIES:
      unknown_categories.add(category)
    examples.append(SourceExample(
        id=str(record.get("id", os.path.splitext(os.path.basename(recorded))[0])),
        audio_path=index.resolve(recorded),
        text=str(record.get("text") or ""),
        language=LANGUAGE,
        category=category,
        speaker=SPEAKER,
    ))
  if unknown_categories:
    logging.warning("%s: categories outside the 15 Brown categories: %s", metadata_path,
                    sorted(unknown_categories))
  return examples
