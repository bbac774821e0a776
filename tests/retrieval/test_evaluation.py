"""Every metric, protocol, option and direction against the brute-force reference."""

import itertools

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from clasp_jax.retrieval import evaluation as protocols
from clasp_jax.retrieval import scoring
from tests.helpers import retrieval_reference as reference

# Tiles much smaller than the corpus, so every run crosses tile and chunk borders and pads.
BLOCKING = scoring.Blocking(block_rows=8, block_cols=16, chunk_rows=16, chunk_cols=32,
                            pair_batch=2)
# Square tiles: the plain paired protocol counts its diagonal tiles in the gold-pair pass.
SQUARE = scoring.Blocking(block_rows=8, block_cols=8, chunk_rows=16, chunk_cols=24,
                          pair_batch=2)
CROSS_LINGUAL = (("fr", "en"), ("de", "en"))


@pytest.fixture(scope="module")
def arrays():
  return reference.planted_corpus(seed=1)


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.asarray(jax.devices()[:2]), ("data",))


def soft_lists(protocol):
  def lists(tag, query_keys, candidate_keys):
    queries, candidates = protocols.soft_candidates(query_keys, candidate_keys, protocol, tag)
    return {int(q): [int(c) for c in row] for q, row in zip(queries, candidates)}
  return lists


@pytest.mark.parametrize("kind,skip_ties,duplicates_as_hits,square",
                         [(*combo, False) for combo in itertools.product(
                             ("hard", "soft"), (False, True), (False, True))] +
                         [("hard", skip_ties, False, True) for skip_ties in (False, True)])
def test_matches_brute_force(arrays, mesh, kind, skip_ties, duplicates_as_hits, square):
  protocol = protocols.Protocol(kind=kind, num_candidates=10, seed=3, skip_ties=skip_ties,
                                duplicates_as_hits=duplicates_as_hits,
                                cross_lingual=CROSS_LINGUAL)
  got = protocols.evaluate(arrays, protocol, mesh=mesh, blocking=SQUARE if square else BLOCKING)
  want = reference.reference_metrics(arrays, kind=kind, skip_ties=skip_ties,
                                     duplicates_as_hits=duplicates_as_hits,
                                     cross_lingual=CROSS_LINGUAL,
                                     candidate_lists=soft_lists(protocol))
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_key_names_follow_the_issue(arrays, mesh):
  got = protocols.evaluate(arrays, protocols.Protocol(cross_lingual=(("fr", "en"),)),
                           mesh=mesh, blocking=BLOCKING)
  for name in ("speech_to_text/hits@1", "speech_to_text/hits@5", "speech_to_text/hits@10",
               "text_to_speech/mrr", "speech_to_text/mean_rank", "text_to_speech/median_rank",
               "by_category/news/speech_to_text/hits@1",
               "by_category/belles_lettres/text_to_speech/mrr",
               "by_language/fr/text_to_speech/hits@1", "by_source/fleurs/speech_to_text/mrr",
               "cross_lingual/text_fr-speech_en/text_to_speech/hits@1",
               "cross_lingual/text_fr-speech_en/speech_to_text/mean_rank"):
    assert name in got, name
  assert not any(name.startswith("cross_lingual/text_de") for name in got)


def test_breakdowns_add_up_to_the_whole(arrays, mesh):
  got = protocols.evaluate(arrays, protocols.Protocol(breakdowns=("source",)), mesh=mesh,
                           blocking=BLOCKING)
  assert not any(name.startswith(("by_category", "by_language")) for name in got)
  for direction in protocols.DIRECTIONS:
    parts = [got[f"by_source/{source}/{direction}/num_queries"] for source in ("brown", "fleurs")]
    assert sum(parts) == got[f"{direction}/num_queries"] == 96
    weighted = sum(got[f"by_source/{source}/{direction}/mean_rank"] * count
                   for source, count in zip(("brown", "fleurs"), parts))
    assert weighted / 96 == pytest.approx(got[f"{direction}/mean_rank"])


def test_duplicates_as_hits_only_ever_improves_ranks(arrays, mesh):
  plain = protocols.evaluate(arrays, protocols.Protocol(breakdowns=()), mesh=mesh,
                             blocking=BLOCKING)
  merged = protocols.evaluate(arrays, protocols.Protocol(breakdowns=(),
                                                         duplicates_as_hits=True),
                              mesh=mesh, blocking=BLOCKING)
  for direction in protocols.DIRECTIONS:
    assert merged[f"{direction}/mean_rank"] <= plain[f"{direction}/mean_rank"]
  assert merged["speech_to_text/mean_rank"] < plain["speech_to_text/mean_rank"]


def test_soft_protocol_depends_on_the_seed_only(arrays, mesh):
  def soft(seed):
    return protocols.evaluate(arrays, protocols.Protocol(kind="soft", num_candidates=10,
                                                         seed=seed, breakdowns=()),
                              mesh=mesh, blocking=BLOCKING)
  assert soft(5) == soft(5)
  assert soft(5) != soft(6)


def test_a_perfect_model_scores_perfectly(mesh):
  rng = np.random.default_rng(0)
  zspeech = rng.standard_normal((50, 16)).astype(np.float32)
  got = protocols.evaluate({"speech": zspeech, "text": zspeech.copy()},
                           protocols.Protocol(kind="hard"), mesh=mesh, blocking=BLOCKING,
                           normalize=True)
  for direction in protocols.DIRECTIONS:
    assert got[f"{direction}/hits@1"] == 1.0
    assert got[f"{direction}/mean_rank"] == 1.0


@pytest.mark.parametrize("arrays_update,protocol_args,message", [
    ({"text": np.zeros((5, 8), np.float32)}, {}, "must pair row by row"),
    ({"speech": np.full((96, 8), np.nan, np.float32)}, {}, "not finite"),
    ({"category": np.array(["a"] * 5)}, {}, "category must have shape"),
    ({}, {"breakdowns": ("color",)}, "unknown breakdowns"),
    ({}, {"kind": "medium"}, "protocol must be one of"),
    ({}, {"kind": "soft", "num_candidates": 500}, "pool holds 96"),
    ({"text_id": None}, {"duplicates_as_hits": True}, "needs text_id"),
    ({}, {"cross_lingual": (("xx", "en"),)}, "no text in that language"),
])
def test_bad_input_is_refused_with_a_reason(arrays, mesh, arrays_update, protocol_args,
                                             message):
  changed = {**arrays, **arrays_update}
  changed = {name: value for name, value in changed.items() if value is not None}
  with pytest.raises(protocols.InputError, match=message):
    protocols.evaluate(changed, protocols.Protocol(**protocol_args), mesh=mesh,
                       blocking=BLOCKING)


def test_normalize_makes_scores_cosines(mesh):
  rng = np.random.default_rng(2)
  zspeech = rng.standard_normal((40, 8)).astype(np.float32)
  ztext = zspeech + 0.5 * rng.standard_normal((40, 8)).astype(np.float32)
  scaled = {"speech": zspeech * rng.uniform(0.1, 10, (40, 1)).astype(np.float32),
            "text": ztext * rng.uniform(0.1, 10, (40, 1)).astype(np.float32)}
  unit = {"speech": zspeech / np.linalg.norm(zspeech, axis=1, keepdims=True),
          "text": ztext / np.linalg.norm(ztext, axis=1, keepdims=True)}
  protocol = protocols.Protocol(breakdowns=())
  given = scaled["speech"].copy()
  assert (protocols.evaluate(scaled, protocol, mesh=mesh, blocking=BLOCKING, normalize=True)
          == pytest.approx(protocols.evaluate(unit, protocol, mesh=mesh, blocking=BLOCKING)))
  np.testing.assert_array_equal(scaled["speech"], given)  # The caller's arrays are untouched.
  with pytest.raises(protocols.InputError, match="all zeros"):
    protocols.evaluate({"speech": np.zeros((4, 8), np.float32), "text": unit["text"][:4]},
                       protocol, mesh=mesh, blocking=BLOCKING, normalize=True)
