"""Greedy CTC decoding against transformers' Wav2Vec2CTCTokenizer."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from clasp_jax.inference import ctc  # pylint: disable=g-import-not-at-top

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "E": 5, "T": 6, "A": 7, "O": 8,
         "N": 9, "'": 10, "H": 11}


@pytest.fixture(scope="module", params=[False, True], ids=["upper", "lower"])
def tokenizer_folder(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp("tokenizer")
  (folder / "vocab.json").write_text(json.dumps(VOCAB))
  tokenizer = transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"),
                                                do_lower_case=request.param)
  tokenizer.save_pretrained(folder)
  return tokenizer, folder


def test_decode_matches_transformers_batch_decode(tokenizer_folder):
  tokenizer, folder = tokenizer_folder
  vocabulary = ctc.CtcVocabulary.from_folder(folder)
  assert vocabulary.blank_id == 0 and len(vocabulary.tokens) == len(VOCAB)
  rng = np.random.RandomState(0)
  # Blank-heavy frame sequences like real CTC output, with repeats and delimiters.
  blank_heavy = [0.4] + [0.6 / (len(VOCAB) - 1)] * (len(VOCAB) - 1)
  sequences = [rng.choice(len(VOCAB), size=rng.randint(0, 40), p=blank_heavy) for _ in range(200)]
  sequences += [np.array([4, 4, 6, 6, 0, 6, 11, 5, 4, 0, 4, 7, 9, 4]), np.array([0, 0, 0])]
  expected = [tokenizer.decode(sequence.tolist()) for sequence in sequences]
  assert [vocabulary.decode(sequence.tolist()) for sequence in sequences] == expected
  assert vocabulary.decode([4, 4, 6, 6, 0, 6, 11, 5, 4, 0, 4, 7, 9, 4]) == (
      "tthe  an" if tokenizer.do_lower_case else "TTHE  AN")


def test_greedy_decode_uses_valid_frames_only(tokenizer_folder):
  _, folder = tokenizer_folder
  vocabulary = ctc.CtcVocabulary.from_folder(folder)
  ids = np.array([[6, 6, 0, 11, 5, 5], [7, 9, 0, 0, 6, 6]])
  logits = np.eye(len(VOCAB), dtype=np.float32)[ids] * 5.0  # (batch, frames, vocab), argmax = ids
  frame_mask = np.array([[True] * 6, [True, True, False, False, False, False]])
  texts = ctc.greedy_decode(logits, frame_mask, vocabulary)
  expected = ["THE", "AN"]
  assert texts == ([text.lower() for text in expected] if vocabulary.do_lower_case else expected)
  with pytest.raises(ValueError, match="only"):
    ctc.greedy_decode(np.zeros((1, 2, len(VOCAB) + 3)), np.ones((1, 2), bool), vocabulary)


def test_vocabulary_errors_are_clear(tmp_path):
  with pytest.raises(ctc.VocabularyError, match="no vocab.json"):
    ctc.CtcVocabulary.from_folder(tmp_path)
  (tmp_path / "vocab.json").write_text(json.dumps({"eng": VOCAB, "fra": VOCAB}))
  with pytest.raises(ctc.VocabularyError, match="target_lang"):
    ctc.CtcVocabulary.from_folder(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"target_lang": "fra"}))
  assert ctc.CtcVocabulary.from_folder(tmp_path).tokens[11] == "H"
  (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "A": 2}))
  with pytest.raises(ctc.VocabularyError, match=r"token ids \[1\]"):
    ctc.CtcVocabulary.from_folder(tmp_path)
