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


@pytest.mark.parametrize("source,preparation,want", [
    ("common_voice", "paper", ["hello world", "its fine"]),
    ("common_voice", "as_is", ["Hello, World!", "It's fine."]),
    ("speech_brown", "paper", ["Hello, World!", "It's fine."]),
])
def test_the_pipeline_prepares_sentences_by_source_for_the_text_encoder(source, preparation,
                                                                         want):
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clasp_jax.data import features, pipeline  # pylint: disable=g-import-not-at-top
  arrays = {name: np.zeros((2, 3), np.float32) for name in features.FEATURE_FIELDS}
  arrays.update({name: np.zeros(2, np.int32) for name in features.LABEL_FIELDS})
  split = features.FeatureSplit(arrays, ["c"], ["en"], source=source,
                                sentences=["Hello, World!", "It's fine."])
  seen = []

  def text_encoder(texts):
    seen.extend(texts)
    return {"input_ids": np.zeros((len(texts), 4), np.int32)}

  # The config key as configs/base.py holds it.
  config = ml_collections.ConfigDict({
      "seed": 0, "batch_size": 2, "eval_batch_size": 2, "data": {"kind": "features"},
      "model": {"text": {"encoder": "unused", "preparation": preparation}}})
  batches = pipeline.for_split(config, "test", mesh=None, train=False,
                               text_encoder=text_encoder, source=split)
  batches.local_batch(0)
  assert seen == want
