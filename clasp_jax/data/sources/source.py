"""One utterance as a source layout describes it, before its audio is decoded.

Every reader (manifest, Speech Brown, FLEURS, Common Voice, the synthetic corpus) turns its
layout into a list of these, so splitting, bad-input handling and the TFDS build are
written once.
"""

from __future__ import annotations

import dataclasses

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}


@dataclasses.dataclass(frozen=True)
class SourceExample:
  """An utterance: where its audio is, what is said, and how it is labelled.

  `split` is None when the layout has no official split; the build then assigns one.
  """

  id: str
  audio_path: str
  text: str
  language: str
  category: str
  speaker: str = ""
  split: str | None = None


def canonical_split(name: str | None) -> str | None:
  """Maps a layout's split name (dev, valid, ...) to train/validation/test; '' is None."""
  if name is None or not name.strip():
    return None
  lowered = name.strip().lower()
  lowered = _SPLIT_ALIASES.get(lowered, lowered)
  if lowered not in SPLITS:
    raise ValueError(f"unknown split {name!r}; expected one of {SPLITS} (or dev/valid/val)")
  return lowered
