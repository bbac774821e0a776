"""FLEURS (HF google/fleurs) from its released layout.

Per language (e.g. `data/en_us/`): `train.tsv`, `dev.tsv`, `test.tsv` without a header
(id, file_name, raw_transcription, transcription, phonemes, num_samples, gender) and the
audio archives `audio/{split}.tar.gz`, extracted in place to `audio/{split}/*.wav`. The
official splits are kept (they are sentence-disjoint by design; the build enforces it).
Several speakers read each sentence, so FLEURS ids repeat; example ids add the file name.
The text is the normalised `transcription` column (lower case, no punctuation), the one the
authors embedded, or `raw_transcription` on request (`TEXT_COLUMNS`).
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Sequence

from clasp_jax.data.sources import layout
from clasp_jax.data.sources.layout import AudioIndex
from clasp_jax.data.sources.source import SourceExample, canonical_split

KIND = "fleurs"
CATEGORY = "fleurs"
RELEASE_SPLITS = ("train", "dev", "test")
# Text columns and their position in a row; the first is the default (the authors' choice).
TEXT_COLUMNS = {"transcription": 3, "raw_transcription": 2}


def _has_split_tables(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, f"{split}.tsv")) for split in RELEASE_SPLITS)


def language_dirs(root: str, languages: Sequence[str] = ()) -> dict[str, str]:
  """FLEURS language code -> its folder, for `root` = the release, its data/ or one language."""
  data = os.path.join(root, "data")
  return layout.language_folders(root, _has_split_tables, languages, release="FLEURS",
                                 tables="{train,dev,test}.tsv",
                                 search_in=data if os.path.isdir(data) else root)


def read_examples(root: str | os.PathLike, languages: Sequence[str] = (),
                  text_column: str = "transcription") -> list[SourceExample]:
  """Reads every (or the given) language's split tables; text from `text_column`."""
  if text_column not in TEXT_COLUMNS:
    raise ValueError(f"FLEURS text column must be one of {tuple(TEXT_COLUMNS)}, got "
                     f"{text_column!r}")
  column = TEXT_COLUMNS[text_column]
  csv.field_size_limit(sys.maxsize)
  examples = []
  for code, folder in language_dirs(os.fspath(root), languages).items():
    index = AudioIndex(folder)
    for release_split in RELEASE_SPLITS:
      table = os.path.join(folder, f"{release_split}.tsv")
      if not os.path.isfile(table):
        continue
      with open(table, encoding="utf-8", newline="") as stream:
        for line_number, row in enumerate(
            csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
          if len(row) <= column:
            raise ValueError(f"{table}:{line_number}: expected id, file_name, "
                             f"raw_transcription, transcription, ... separated by tabs")
          file_name, text = row[1], row[column]
          candidates = (os.path.join(folder, "audio", release_split, file_name),
                        os.path.join(folder, release_split, file_name))
          audio_path = next((p for p in candidates if os.path.isfile(p)), None)
          examples.append(SourceExample(
              id=f"{code}/{release_split}/{os.path.splitext(file_name)[0]}",
              audio_path=audio_path or index.resolve(file_name),
              text=text,
              language=code.split("_")[0],
              category=CATEGORY,
              speaker="",  # FLEURS publishes gender, not speaker ids.
              split=canonical_split(release_split),
          ))
  return examples
