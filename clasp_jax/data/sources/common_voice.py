"""Common Voice (Mozilla) from its released layout.

Per locale (e.g. `cv-corpus-4/en/`): `validated.tsv` and the official `train.tsv`,
`dev.tsv`, `test.tsv` with a header (client_id, path, sentence, up_votes, down_votes, age,
gender, accent, ... ) and `clips/*.mp3`. With `splits="official"` the split tables are used
(Common Voice builds them sentence-disjoint; the build enforces it); with
`splits="validated"` every validated clip is read and the build makes a seeded 80/10/10
sentence split. The speaker is the contributor's client_id.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Sequence

from clasp_jax.data.sources import layout
from clasp_jax.data.sources.source import SourceExample, canonical_split

KIND = "common_voice"
CATEGORY = "common_voice"
OFFICIAL_SPLITS = ("train", "dev", "test")
SPLIT_MODES = ("official", "validated")


def locale_dirs(root: str, locales: Sequence[str] = ()) -> dict[str, str]:
  """Locale -> folder, for `root` = one locale's folder or the corpus folder above them."""
  return layout.language_folders(
      root, lambda folder: os.path.isfile(os.path.join(folder, "validated.tsv")), locales,
      release="Common Voice", tables="validated.tsv", items="locales")


def _clip_path(folder: str, recorded: str) -> str:
  """Early releases list clip names without the .mp3 extension."""
  path = os.path.join(folder, "clips", recorded)
  if not os.path.splitext(recorded)[1] and not os.path.isfile(path):
    path += ".mp3"
  return path


def _read_table(table: str, folder: str, locale: str,
                split: str | None) -> list[SourceExample]:
  examples = []
  with open(table, encoding="utf-8", newline="") as stream:
    reader = csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    missing_columns = {"path", "sentence"} - set(reader.fieldnames or ())
    if missing_columns:
      raise ValueError(f"{table}: missing columns {sorted(missing_columns)}")
    for row in reader:
      recorded = row["path"]
      examples.append(SourceExample(
          id=f"{locale}/{os.path.splitext(recorded)[0]}",
          audio_path=_clip_path(folder, recorded),
          text=row["sentence"] or "",
          language=row.get("locale") or locale,
          category=CATEGORY,
          speaker=row.get("client_id") or "",
          split=split,
      ))
  return examples


def read_examples(root: str | os.PathLike, locales: Sequence[str] = (),
                  splits: str = "official") -> list[SourceExample]:
  """Reads the official split tables (or validated.tsv) of every or the given locales."""
  if splits not in SPLIT_MODES:
    raise ValueError(f"splits must be one of {SPLIT_MODES}, got {splits!r}")
  csv.field_size_limit(sys.maxsize)
  examples = []
  for locale, folder in locale_dirs(os.fspath(root), locales).items():
    if splits == "validated":
      examples += _read_table(os.path.join(folder, "validated.tsv"), folder, locale, None)
      continue
    tables = {s: os.path.join(folder, f"{s}.tsv") for s in OFFICIAL_SPLITS}
    absent = [t for t in tables.values() if not os.path.isfile(t)]
    if absent:
      raise FileNotFoundError(f"official split tables {absent} missing; use "
                              f"--common_voice_splits=validated to split validated.tsv")
    for release_split, table in tables.items():
      examples += _read_table(table, folder, locale, canonical_split(release_split))
  return examples
