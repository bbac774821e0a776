"""Per-source text preparation: the authors' rules and where they apply."""

import pytest

from clasp_jax.data import text_prep


def test_rules():
  text = "It's  Mr. O'Neil's \"turn\" -- now, 3:45!"
  assert text_prep.prepare(text, "as_is") == text
  assert text_prep.prepare(text, "lowercase") == text.lower()
  assert text_prep.prepare(text, "lowercase_no_punctuation") == "its mr oneils turn now 345"
  # Only ASCII punctuation goes, as with the standard library's tables the authors used.
  assert text_prep.prepare("Ça va — «bien»?", "lowercase_no_punctuation") == "ça va — «bien»"
  with pytest.raises(ValueError, match="text rule must be one of"):
    text_prep.prepare(text, "stem")


def test_paper_preparation_is_per_source():
  texts = ["Hello, World!", "Hello, World!", "Hello, World!"]
  sources = ["common_voice", "speech_brown", "fleurs"]
  assert text_prep.prepare_by_source(texts, sources, "paper") == [
      "hello world", "Hello, World!", "Hello, World!"]
  assert text_prep.prepare_by_source(texts, sources, "as_is") == texts
  assert text_prep.prepare_by_source(texts, "common_voice", "paper") == ["hello world"] * 3
  assert text_prep.transcript_rule("paper") == "lowercase"
  assert text_prep.transcript_rule("as_is") == "as_is"
  with pytest.raises(ValueError, match="preparation must be one of"):
    text_prep.prepare_by_source(texts, sources, "authors")
  with pytest.raises(ValueError, match="3 texts but 2 sources"):
    text_prep.prepare_by_source(texts, sources[:2], "paper")
