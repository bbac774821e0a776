"""Reading any supported layout into SourceExamples, by kind."""

from __future__ import annotations

import os
from typing import Sequence

from clasp_jax.data.sources import common_voice
from clasp_jax.data.sources import fleurs
from clasp_jax.data.sources import manifest
from clasp_jax.data.sources import speech_brown
from clasp_jax.data.sources.source import SourceExample

KINDS = (manifest.KIND, speech_brown.KIND, fleurs.KIND, common_voice.KIND)


def read_source(kind: str, source: str, languages: Sequence[str] = (),
                common_voice_splits: str = "official", default_language: str = "und",
                default_category: str = "uncategorized") -> list[SourceExample]:
  """The utterances of a layout of the given kind."""
  if kind == manifest.KIND:
    return manifest.read_examples(source, default_language, default_category)
  if kind == speech_brown.KIND:
    return speech_brown.read_examples(source)
  if kind == fleurs.KIND:
    return fleurs.read_examples(source, languages)
  if kind == common_voice.KIND:
    return common_voice.read_examples(source, languages, common_voice_splits)
  raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def default_name(kind: str, source: str) -> str:
  if kind == manifest.KIND:
    return os.path.splitext(os.path.basename(source))[0]
  return kind
