"""Greedy CTC decoding with a Hugging Face `Wav2Vec2CTCTokenizer` vocabulary.

The ASR-cascade baseline of CLASP transcribes each clip with HuBERT-CTC / wav2vec2-CTC and
embeds the transcript with LaBSE. Greedy decoding takes the best token per frame, merges
runs of the same token and drops the CTC blank (the tokenizer's pad token), then turns the
word delimiter `|` into a space: the text `processor.batch_decode(logits.argmax(-1))` gives.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np


class VocabularyError(ValueError):
  """A tokenizer folder without a usable CTC vocabulary; the message says why."""


@dataclasses.dataclass(frozen=True)
class CtcVocabulary:
  """Token strings by id plus the tokenizer settings that decoding depends on."""

  tokens: tuple[str, ...]
  pad_token: str = "<pad>"
  word_delimiter_token: str | None = "|"
  replace_word_delimiter_char: str = " "
  do_lower_case: bool = False

  @property
  def blank_id(self) -> int:
    return self.tokens.index(self.pad_token)

  @classmethod
  def from_folder(cls, folder: str | os.PathLike) -> "CtcVocabulary":
    """Reads vocab.json and tokenizer_config.json as saved by Wav2Vec2CTCTokenizer."""
    folder = os.fspath(folder)
    vocab_path = os.path.join(folder, "vocab.json")
    if not os.path.exists(vocab_path):
      raise VocabularyError(
          f"{folder}: no vocab.json (a CTC tokenizer vocabulary is needed to decode)")
    with open(vocab_path, encoding="utf-8") as vocab_file:
      token_to_id = json.load(vocab_file)
    settings = {}
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config_path):
      with open(config_path, encoding="utf-8") as config_file:
        settings = json.load(config_file)
    if token_to_id and all(isinstance(value, dict) for value in token_to_id.values()):
      # Multilingual (MMS-style) vocabularies nest one table per language.
      language = settings.get("target_lang")
      if language not in token_to_id:
        raise VocabularyError(f"{vocab_path}: per-language vocabulary; tokenizer_config.json "
                              f"must set target_lang to one of {sorted(token_to_id)[:10]}")
      token_to_id = token_to_id[language]
    id_to_token = {int(index): token for token, index in token_to_id.items()}
    for index, added in (settings.get("added_tokens_decoder") or {}).items():
      id_to_token.setdefault(int(index), added["content"])
    size = max(id_to_token) + 1
    missing = sorted(set(range(size)) - set(id_to_token))
    if missing:
      raise VocabularyError(f"{vocab_path}: token ids {missing[:10]} have no token")
    vocabulary = cls(
        tokens=tuple(id_to_token[index] for index in range(size)),
        pad_token=settings.get("pad_token", "<pad>"),
        word_delimiter_token=settings.get("word_delimiter_token", "|"),
        replace_word_delimiter_char=settings.get("replace_word_delimiter_char", " "),
        do_lower_case=bool(settings.get("do_lower_case", False)),
    )
    if vocabulary.pad_token not in vocabulary.tokens:
      raise VocabularyError(
          f"{vocab_path}: pad (CTC blank) token {vocabulary.pad_token!r} not in vocabulary")
    return vocabulary

  def decode(self, token_ids: Sequence[int]) -> str:
    """Greedy CTC text of per-frame token ids: merge repeats, drop blanks, map delimiters."""
    if len(token_ids) and (min(token_ids) < 0 or max(token_ids) >= len(self.tokens)):
      raise ValueError(f"token id out of range for a vocabulary of {len(self.tokens)}")
    tokens = [self.tokens[index] for index in token_ids]
    merged = [token for token, _ in itertools.groupby(tokens)]
    characters = [self.replace_word_delimiter_char if token == self.word_delimiter_token else token
                  for token in merged if token != self.pad_token]
    text = "".join(characters).strip()
    return text.lower() if self.do_lower_case else text


def greedy_token_ids(logits, frame_mask) -> list[np.ndarray]:
  """Best token per valid frame for each row of (batch, frames, vocab) logits."""
  best = np.asarray(jnp.argmax(logits, axis=-1))
  frame_mask = np.asarray(frame_mask, bool)
  return [row[mask] for row, mask in zip(best, frame_mask)]


def greedy_decode(logits, frame_mask, vocabulary: CtcVocabulary) -> list[str]:
  """Transcripts of a padded batch of CTC logits."""
  if logits.shape[-1] > len(vocabulary.tokens):
    raise ValueError(f"CTC head has {logits.shape[-1]} outputs but the vocabulary only "
                     f"{len(vocabulary.tokens)} tokens")
  return [vocabulary.decode(ids.tolist()) for ids in greedy_token_ids(logits, frame_mask)]
