"""The trainer's retrieval evaluator: config defaults, names, the same numbers as the CLI."""

import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np
import pytest

from clasp_jax.retrieval import evaluation as protocols
from clasp_jax.retrieval import scoring
from clasp_jax.evaluators import retrieval
from tests.helpers import retrieval_reference as reference

SMALL_TILES = dict(block_rows=8, block_cols=16, chunk_rows=16, chunk_cols=32)


@pytest.fixture(scope="module")
def embeddings():
  arrays = reference.planted_corpus(seed=2)
  # What the trainer hands over: normalised float32 pairs and per-row labels, no query_text.
  unit = {name: arrays[name] / np.linalg.norm(arrays[name], axis=1, keepdims=True)
          for name in ("speech", "text")}
  return {**unit, "category": list(arrays["category"]), "language": arrays["language"],
          "text_id": arrays["text_id"]}


def test_minimal_config_takes_the_defaults(embeddings):
  config = ml_collections.ConfigDict({"type": "retrieval", "split": "test"})
  evaluator = retrieval.Evaluator(config)
  assert evaluator.protocol == protocols.Protocol()
  assert evaluator.blocking == scoring.make_blocking()
  got = dict(evaluator.score(embeddings))
  want = protocols.evaluate(embeddings, protocols.Protocol())
  assert got == pytest.approx(want)
  assert "speech_to_text/hits@1" in got and "text_to_speech/mrr" in got
  assert "by_category/news/speech_to_text/hits@1" in got
  assert "by_language/fr/text_to_speech/mean_rank" in got
  assert all(isinstance(value, float) for value in got.values())
  assert not any(name.startswith(("retrieval/", "test/")) for name in got)


def test_config_keys_reach_the_protocol(embeddings):
  config = ml_collections.ConfigDict(dict(
      type="retrieval", split="test", protocol="soft", num_candidates=12, seed=4,
      skip_ties=True, duplicates_as_hits=True, breakdowns="category", every_steps=100,
      cross_lingual=["fr:en"], ks=(1, 3), **SMALL_TILES))
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  evaluator = retrieval.Evaluator(config, mesh=mesh)
  assert evaluator.protocol == protocols.Protocol(
      kind="soft", num_candidates=12, seed=4, skip_ties=True, duplicates_as_hits=True,
      breakdowns=("category",), cross_lingual=(("fr", "en"),), ks=(1, 3))
  got = dict(evaluator.score(embeddings))
  one_device = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  want = protocols.evaluate(embeddings, evaluator.protocol, mesh=one_device)
  assert got == pytest.approx(want)
  assert "speech_to_text/hits@3" in got and "speech_to_text/hits@5" not in got
  assert "speech_to_text/num_skipped" in got
  assert "cross_lingual/text_fr-speech_en/text_to_speech/mrr" in got
  assert not any(name.startswith("by_language") for name in got)


def test_bad_config_fails_at_construction():
  with pytest.raises(protocols.InputError, match="protocol must be one of"):
    retrieval.Evaluator(ml_collections.ConfigDict({"type": "retrieval", "protocol": "fuzzy"}))
  with pytest.raises(protocols.InputError, match="TEXT_LANGUAGE:SPEECH_LANGUAGE"):
    retrieval.Evaluator(ml_collections.ConfigDict({"cross_lingual": "fr-en"}))
