"""Local recordings described by a JSONL or CSV manifest.

One row per utterance with at least the audio path and its text; language, category, id,
speaker and split are optional. Relative audio paths are read from the manifest's folder.

  {"audio": "clips/a.flac", "text": "Hello there.", "language": "en", "category": "news"}

  audio,text,language,category,id,split
  clips/a.flac,Hello there.,en,news,a,train
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterable, Sequence

from clasp_jax.data.sources.source import SourceExample, canonical_split

KIND = "manifest"
# Accepted column names, canonical name first.
_COLUMNS = {
    "audio": ("audio", "audio_path", "audio_file_path", "path", "file"),
    "text": ("text", "sentence", "transcription", "transcript"),
    "language": ("language", "lang", "locale"),
    "category": ("category",),
    "id": ("id",),
    "speaker": ("speaker", "speaker_id", "client_id"),
    "split": ("split",),
}
MANIFEST_FIELDS = ("id", "audio", "text", "language", "category", "speaker", "split")


def _rows(path: str) -> Iterable[tuple[int, dict[str, Any]]]:
  """(line number, row) pairs of a .jsonl/.json-lines or .csv/.tsv manifest."""
  extension = os.path.splitext(path)[1].lower()
  # utf-8-sig: spreadsheet exports start CSV files with a byte-order mark.
  with open(path, encoding="utf-8-sig", newline="") as stream:
    if extension in (".csv", ".tsv"):
      reader = csv.DictReader(stream, delimiter="\t" if extension == ".tsv" else ",")
      for row in reader:
        yield reader.line_num, row
      return
    if extension not in (".jsonl", ".json"):
      raise ValueError(f"{path}: manifest must end in .jsonl, .json, .csv or .tsv")
    for line_number, line in enumerate(stream, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{line_number}: expected a JSON object per line")
      yield line_number, row


def _field(row: dict[str, Any], name: str) -> str | None:
  for alias in _COLUMNS[name]:
    if alias in row and row[alias] is not None:
      return str(row[alias])
  return None


def read_examples(manifest_path: str | os.PathLike, default_language: str = "und",
                  default_category: str = "uncategorized") -> list[SourceExample]:
  """Reads a manifest; rows keep their order. Text is checked later by the build policy.

  Raises:
    ValueError: the manifest cannot be parsed or a row has no audio path.
  """
  manifest_path = os.fspath(manifest_path)
  root = os.path.dirname(os.path.abspath(manifest_path))
  examples = []
  for line_number, row in _rows(manifest_path):
    audio = _field(row, "audio")
    if not audio:
      raise ValueError(f"{manifest_path}:{line_number}: no audio path (one of the columns "
                       f"{', '.join(_COLUMNS['audio'])})")
    audio_path = audio if os.path.isabs(audio) else os.path.join(root, audio)
    example_id = _field(row, "id") or os.path.splitext(os.path.normpath(audio))[0]
    try:
      split = canonical_split(_field(row, "split"))
    except ValueError as error:
      raise ValueError(f"{manifest_path}:{line_number}: {error}") from None
    examples.append(SourceExample(
        id=example_id,
        audio_path=audio_path,
        text=_field(row, "text") or "",
        language=_field(row, "language") or default_language,
        category=_field(row, "category") or default_category,
        speaker=_field(row, "speaker") or "",
        split=split,
    ))
  return examples


def write_manifest(path: str | os.PathLike, examples: Sequence[SourceExample]) -> None:
  """Writes a JSONL manifest with audio paths relative to the manifest's folder."""
  path = os.fspath(path)
  root = os.path.dirname(os.path.abspath(path))
  with open(path, "w", encoding="utf-8") as stream:
    for example in examples:
      row = {
          "id": example.id,
          "audio": os.path.relpath(os.path.abspath(example.audio_path), root),
          "text": example.text,
          "language": example.language,
          "category": example.category,
          "speaker": example.speaker,
          "split": example.split or "",
      }
      stream.write(json.dumps(row, ensure_ascii=False) + "\n")
