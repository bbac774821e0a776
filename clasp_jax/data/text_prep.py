"""How a sentence is prepared before the text encoder, per source, as the authors did.

The authors embedded each source's text differently (CLASP_REFERENCE.md, Pipeline 7):
Common Voice sentences lowercased with punctuation removed; FLEURS through its normalised
`transcription` column (chosen when the dataset is built: `--fleurs_text`); the ASR cascade's
CTC transcripts (upper case from the CTC vocabulary) lowercased before LaBSE, which is cased.
Speech Brown and other sources went in as written.

Rules (`RULES`):
  as_is: the text unchanged.
  lowercase: str.lower().
  lowercase_no_punctuation: str.lower(), ASCII punctuation (Python's `string.punctuation`)
    removed and runs of whitespace collapsed. The authors' notebooks remove punctuation with
    the standard library's `string` tables; characters outside them (curly quotes, dashes)
    stay, as theirs would.

`PREPARATIONS`: 'as_is' prepares nothing; 'paper' applies `PAPER_RULES` by source.
"""

from __future__ import annotations

import string
from typing import Iterable, Sequence

RULES = ("as_is", "lowercase", "lowercase_no_punctuation")
PREPARATIONS = ("as_is", "paper")
# Source (a dataset's `source` / build kind) -> the authors' rule; other sources: as_is.
PAPER_RULES = {"common_voice": "lowercase_no_punctuation"}
# The ASR cascade's transcripts before the sentence encoder.
PAPER_TRANSCRIPT_RULE = "lowercase"

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def prepare(text: str, rule: str) -> str:
  """`text` under one of RULES."""
  if rule == "as_is":
    return text
  if rule == "lowercase":
    return text.lower()
  if rule == "lowercase_no_punctuation":
    return " ".join(text.lower().translate(_PUNCTUATION).split())
  raise ValueError(f"text rule must be one of {RULES}, got {rule!r}")


def source_rule(source: str, preparation: str) -> str:
  """The rule a text from `source` gets under `preparation` (one of PREPARATIONS)."""
  if preparation not in PREPARATIONS:
    raise ValueError(f"text preparation must be one of {PREPARATIONS}, got {preparation!r}")
  return PAPER_RULES.get(source, "as_is") if preparation == "paper" else "as_is"


def prepare_by_source(texts: Sequence[str], sources: Iterable[str] | str,
                      preparation: str) -> list[str]:
  """Each text prepared by its source's rule; `sources` is one per text or one for all."""
  if isinstance(sources, str):
    sources = [sources] * len(texts)
  sources = list(sources)
  if len(sources) != len(texts):
    raise ValueError(f"{len(texts)} texts but {len(sources)} sources")
  return [prepare(text, source_rule(source, preparation))
          for text, source in zip(texts, sources)]


def transcript_rule(preparation: str) -> str:
  """The rule the ASR cascade's transcripts get under `preparation`."""
  if preparation not in PREPARATIONS:
    raise ValueError(f"text preparation must be one of {PREPARATIONS}, got {preparation!r}")
  return PAPER_TRANSCRIPT_RULE if preparation == "paper" else "as_is"
