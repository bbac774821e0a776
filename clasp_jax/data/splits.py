"""Train/validation/test splits that never share a sentence.

A retrieval test set whose sentences also occur in training measures memorisation, so the
rule is the same for every source: two utterances with the same normalised text always
land in the same split. Layouts without a split get a seeded 80/10/10 split of their
distinct sentences; layouts with official splits keep them, and any sentence that crosses
splits is dropped from the less precious split (test is kept intact, then validation).
"""

from __future__ import annotations

import dataclasses
import string
import unicodedata
from typing import Iterable, Sequence

import numpy as np

from clasp_jax.data import bad_input
from clasp_jax.data.sources.source import SPLITS, SourceExample

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# When a sentence sits in several official splits, it stays in the first of these.
_KEEP_PRIORITY = ("test", "validation", "train")


def normalize_sentence(text: str) -> str:
  """Case-, punctuation- and whitespace-insensitive form used to compare sentences."""
  text = unicodedata.normalize("NFKC", text).casefold()
  kept = [" " if unicodedata.category(char).startswith("P") or char in string.punctuation
          else char for char in text]
  return " ".join("".join(kept).split())


def assign_splits(examples: Sequence[SourceExample], seed: int,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[SourceExample]:
  """Gives every example without a split one, grouped by normalised sentence.

  Sentences that already have a split (from some of the examples) keep it. The remaining
  distinct sentences are sorted, permuted with `seed` and cut at the cumulative fractions,
  so the result depends only on the set of sentences and the seed, not on input order.
  """
  if len(fractions) != len(SPLITS) or not np.isclose(sum(fractions), 1.0):
    raise ValueError(f"fractions must be {len(SPLITS)} numbers summing to 1, got {fractions}")
  known = {}
  for example in examples:
    if example.split is not None:
      known.setdefault(normalize_sentence(example.text), example.split)
  free = sorted({normalize_sentence(example.text) for example in examples
                 if example.split is None} - set(known))
  order = np.random.default_rng(seed).permutation(len(free))
  bounds = np.round(np.cumsum(fractions) * len(free)).astype(int)
  for rank, position in enumerate(order):
    split_index = int(np.searchsorted(bounds, rank, side="right"))
    known[free[position]] = SPLITS[min(split_index, len(SPLITS) - 1)]
  return [example if example.split is not None else
          dataclasses.replace(example, split=known[normalize_sentence(example.text)])
          for example in examples]


def sentences_by_split(examples: Iterable[SourceExample]) -> dict[str, set[str]]:
  """Normalised sentences present in each split."""
  result: dict[str, set[str]] = {split: set() for split in SPLITS}
  for example in examples:
    result[example.split].add(normalize_sentence(example.text))
  return result


def drop_shared_sentences(examples: Sequence[SourceExample],
                          policy: bad_input.BadInputPolicy) -> list[SourceExample]:
  """Removes utterances whose sentence also occurs in a more precious split.

  Each removal is a `shared_sentence` skip under `policy` (a strict build stops there).
  """
  owner: dict[str, str] = {}
  for split in _KEEP_PRIORITY:
    for example in examples:
      if example.split == split:
        owner.setdefault(normalize_sentence(example.text), split)
  kept = []
  for example in examples:
    keeper = owner[normalize_sentence(example.text)]
    if keeper != example.split:
      policy.reject(bad_input.BadInputError(
          example.audio_path, bad_input.SHARED_SENTENCE,
          f"sentence of {example.split} example {example.id!r} is also in {keeper}"))
      continue
    kept.append(example)
  return kept
