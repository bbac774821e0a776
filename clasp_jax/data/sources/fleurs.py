"""FLEURS (HF google/fleurs) from its released layout.

Per language (e.g. `data/en_us/`): `train.tsv`, `dev.tsv`, `test.tsv` without a header
(id, file_name, raw_transcription, transcription, phonemes, num_samples, gender) and the
audio archives `audio/{split}.tar.gz`, extracted in place to `audio/{split}/*.wav`. The
official splits are kept (they are sentence-disjoint by design; the build enforces it).
Several speakers read each sentence, so FLEURS ids repeat; example ids add the file name.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Sequence

from clasp_jax.data.sources.layout import AudioIndex
from clasp_jax.data.sources.source import SourceExample, canonical_split

KIND = "fleurs"
CATEGORY = "fleurs"
RELEASE_SPLITS = ("train", "dev", "test")


def _has_split_tables(folder: str) -> bool:
  return any(os.path.isfile(os.path.join(folder, f"{split}.tsv")) for split in RELEASE_SPLITS)


def language_dirs(root: str, languages: Sequence[str] = ()) -> dict[str, str]:
  """FLEURS language code -> its folder, for `root` = the release, its data/ or one language."""
  if _has_split_tables(root):
    found = {os.path.basename(os.path.normpath(root)): root}
  else:
    base = os.path.join(root, "data") if os.path.isdir(os.path.join(root, "data")) else root
    found = {name: os.path.join(base, name) for name in sorted(os.listdir(base))
             if os.path.isdir(os.path.join(base, name))
             and _has_split_tables(os.path.join(base, name))}
  if not found:
    raise FileNotFoundError(f"no FLEURS {{train,dev,test}}.tsv under {root}")
  if languages:
    missing = sorted(set(languages) - set(found))
    if missing:
      raise FileNotFoundError(f"FLEURS languages {missing} not under {root}; found "
                              f"{sorted(found)}")
    found = {code: found[code] for code in languages}
  return found


def read_examples(root: str | os.PathLike, languages: Sequence[str] = ()) -> list[SourceExample]:
  """Reads every (or the given) language's split tables; text is the raw transcription."""
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
          if len(row) < 3:
            raise ValueError(f"{table}:{line_number}: expected id, file_name, "
                             f"raw_transcription, ... separated by tabs")
          file_name, raw_text = row[1], row[2]
          candidates = (os.path.join(folder, "audio", release_split, file_name),
                        os.path.join(folder, release_split, file_name))
          audio_path = next((p for p in candidates if os.path.isfile(p)), None)
          examples.append(SourceExample(
              id=f"{code}/{release_split}/{os.path.splitext(file_name)[0]}",
              audio_path=audio_path or index.resolve(file_name),
              text=raw_text,
              language=code.split("_")[0],
              category=CATEGORY,
              speaker="",  # FLEURS publishes gender, not speaker ids.
              split=canonical_split(release_split),
          ))
  return examples
