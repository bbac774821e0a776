"""The sentence split rule shared by every dataset kind."""

import dataclasses

import pytest

from clasp_jax.data import bad_input
from clasp_jax.data import splits
from clasp_jax.data.sources.source import SPLITS, SourceExample, canonical_split


def make_examples(texts, split=None):
  return [SourceExample(id=f"u{i}", audio_path=f"/a/{i}.wav", text=text, language="en",
                        category="c", split=split) for i, text in enumerate(texts)]


def test_normalize_sentence_ignores_case_punctuation_and_spacing():
  assert splits.normalize_sentence("  Hello,   World! ") == splits.normalize_sentence(
      "hello world")
  assert splits.normalize_sentence("«¿Qué tal?»") == "qué tal"
  assert splits.normalize_sentence("one two") != splits.normalize_sentence("one three")


@pytest.mark.parametrize("num_sentences", [10, 37, 200])
def test_assign_splits_is_80_10_10_over_distinct_sentences(num_sentences):
  texts = [f"Sentence {i}." for i in range(num_sentences)]
  # Every sentence recorded twice, once with different punctuation.
  examples = make_examples(texts + [t.upper().rstrip(".") + "!" for t in texts])
  assigned = splits.assign_splits(examples, seed=5)
  by_split = splits.sentences_by_split(assigned)
  assert sum(len(s) for s in by_split.values()) == num_sentences
  assert by_split["train"].isdisjoint(by_split["validation"] | by_split["test"])
  assert by_split["validation"].isdisjoint(by_split["test"])
  assert abs(len(by_split["train"]) - 0.8 * num_sentences) <= 0.5
  assert abs(len(by_split["validation"]) - 0.1 * num_sentences) <= 1


def test_assign_splits_depends_on_the_seed_not_on_input_order():
  examples = make_examples([f"Sentence {i}." for i in range(60)])
  first = {e.text: e.split for e in splits.assign_splits(examples, seed=1)}
  shuffled = {e.text: e.split for e in splits.assign_splits(examples[::-1], seed=1)}
  other_seed = {e.text: e.split for e in splits.assign_splits(examples, seed=2)}
  assert first == shuffled
  assert first != other_seed


def test_examples_join_the_split_their_sentence_already_has():
  given = make_examples(["Kept in test."], split="test")
  free = [dataclasses.replace(e, id=f"free{i}") for i, e in
          enumerate(make_examples(["kept in TEST", "Something else."] * 3))]
  assigned = splits.assign_splits(given + free, seed=0)
  assert {e.split for e in assigned if splits.normalize_sentence(e.text) == "kept in test"} == {
      "test"}


def test_drop_shared_sentences_keeps_test_then_validation():
  examples = (make_examples(["Alpha.", "Beta.", "Gamma."], split="train")
              + [dataclasses.replace(e, id=f"v{i}") for i, e in
                 enumerate(make_examples(["alpha", "Delta."], split="validation"))]
              + [dataclasses.replace(e, id=f"t{i}") for i, e in
                 enumerate(make_examples(["ALPHA!", "Beta"], split="test"))])
  policy = bad_input.BadInputPolicy()
  kept = splits.drop_shared_sentences(examples, policy)
  assert sorted((e.split, e.text) for e in kept) == [
      ("test", "ALPHA!"), ("test", "Beta"), ("train", "Gamma."), ("validation", "Delta.")]
  assert policy.skipped[bad_input.SHARED_SENTENCE] == 3
  with pytest.raises(bad_input.BadInputError, match="also in test"):
    splits.drop_shared_sentences(examples, bad_input.BadInputPolicy(strict=True))


def test_canonical_split_names():
  assert [canonical_split(n) for n in ("train", "dev", "Valid", "TEST", "", None)] == [
      "train", "validation", "validation", "test", None, None]
  assert set(SPLITS) == {"train", "validation", "test"}
  with pytest.raises(ValueError, match="unknown split"):
    canonical_split("holdout")
