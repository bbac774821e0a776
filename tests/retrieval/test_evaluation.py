"""Every metric, protocol, option and direction against the brute-force reference."""

import dataclasses
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
                                cross_lingual=CROSS_LINGUAL, ties="optimistic")
  got = protocols.evaluate(arrays, protocol, mesh=mesh, blocking=SQUARE if square else BLOCKING)
  want = reference.reference_metrics(arrays, kind=kind, skip_ties=skip_ties,
                                     duplicates_as_hits=duplicates_as_hits,
                                     cross_lingual=CROSS_LINGUAL,
                                     candidate_lists=soft_lists(protocol))
  assert_same_metrics(got, want)


def assert_same_metrics(got, want):
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


@pytest.fixture(scope="module")
def tied():
  return reference.tied_corpus()


def given_lists(size, num_candidates, seed):
  """Candidate lists for the paired corpus: query i's own item at a random place among
  random others (duplicates of its text included when drawn)."""
  rng = np.random.default_rng(seed)
  lists = np.empty((size, num_candidates), np.int64)
  for query in range(size):
    others = rng.choice(np.delete(np.arange(size), query), num_candidates - 1, replace=False)
    lists[query] = np.insert(others, rng.integers(0, num_candidates), query)
  return lists


def listed(lists, protocol):
  """The reference's candidate lists: the given ones for the paired corpus' directions, the
  sampler's for cross-lingual pairs."""
  sampled = soft_lists(protocol)

  def lists_for(tag, query_keys, candidate_keys):
    if len(tag) == 1:
      return {query: row.tolist() for query, row in enumerate(lists)}
    return sampled(tag, query_keys, candidate_keys)
  return lists_for


@pytest.mark.parametrize("skip_ties", [False, True])
@pytest.mark.parametrize("duplicates_as_hits", [False, True])
@pytest.mark.parametrize("kind,square", [("hard", False), ("hard", True), ("soft", False)])
def test_paper_rule_is_the_authors_loop(tied, mesh, kind, square, skip_ties,
                                        duplicates_as_hits):
  """--ties=paper against the authors' loop (np.argmax first, strictly-greater rank, their
  skip condition): whole set, per source, cross-lingual, both directions, query counts."""
  protocol = protocols.Protocol(kind=kind, num_candidates=10, seed=5, skip_ties=skip_ties,
                                duplicates_as_hits=duplicates_as_hits, ties="paper",
                                cross_lingual=CROSS_LINGUAL)
  got = protocols.evaluate(tied, protocol, mesh=mesh, blocking=SQUARE if square else BLOCKING)
  want = reference.reference_metrics(tied, kind=kind, ties="paper", skip_ties=skip_ties,
                                     duplicates_as_hits=duplicates_as_hits,
                                     cross_lingual=CROSS_LINGUAL,
                                     candidate_lists=soft_lists(protocol))
  assert_same_metrics(got, want)
  # The corpus makes the rule matter: it loses ties the optimistic rule wins.
  optimistic = protocols.evaluate(tied, dataclasses.replace(protocol, ties="optimistic"),
                                  mesh=mesh, blocking=BLOCKING)
  if not skip_ties:
    assert got["text_to_speech/hits@1"] < optimistic["text_to_speech/hits@1"]
  else:
    # The authors skip only the partner with the higher index, so they keep more queries.
    for direction in protocols.DIRECTIONS:
      assert got[f"{direction}/num_queries"] > optimistic[f"{direction}/num_queries"] or (
          kind == "soft")
      assert (got[f"{direction}/num_queries"] + got[f"{direction}/num_skipped"] ==
              optimistic[f"{direction}/num_queries"] + optimistic[f"{direction}/num_skipped"])


@pytest.mark.parametrize("ties", ["paper", "expected", "optimistic", "pessimistic"])
@pytest.mark.parametrize("skip_ties,duplicates_as_hits", [(False, False), (True, True)])
def test_given_candidate_lists_and_threshold(tied, mesh, ties, skip_ties, duplicates_as_hits):
  """The soft protocol over candidate lists from a file (gold anywhere), both directions, with
  the thresholded numbers checked against scikit-learn."""
  pytest.importorskip("sklearn")
  lists = given_lists(len(tied["speech"]), 9, seed=7)
  protocol = protocols.Protocol(kind="soft", num_candidates=9, seed=1, ties=ties,
                                skip_ties=skip_ties, duplicates_as_hits=duplicates_as_hits,
                                threshold=1.0, cross_lingual=(("fr", "en"),))
  got = protocols.evaluate(tied, protocol, mesh=mesh, blocking=BLOCKING, candidates=lists)
  want = reference.reference_metrics(tied, kind="soft", ties=ties, skip_ties=skip_ties,
                                     duplicates_as_hits=duplicates_as_hits, threshold=1.0,
                                     cross_lingual=(("fr", "en"),),
                                     candidate_lists=listed(lists, protocol))
  assert_same_metrics(got, want)
  for direction in protocols.DIRECTIONS:
    assert 0 < got[f"{direction}/macro_f1"] < 1 and 0 < got[f"{direction}/golden_accuracy"] < 1


@pytest.mark.parametrize("ties", ["expected", "pessimistic"])
@pytest.mark.parametrize("kind,skip_ties,duplicates_as_hits,square", [
    ("hard", False, False, True), ("hard", True, True, False), ("soft", False, True, False)])
def test_tie_aware_rules_match_brute_force(tied, mesh, ties, kind, skip_ties, duplicates_as_hits,
                                           square):
  pytest.importorskip("sklearn")
  protocol = protocols.Protocol(kind=kind, num_candidates=10, seed=2, ties=ties,
                                skip_ties=skip_ties, duplicates_as_hits=duplicates_as_hits,
                                threshold=0.0, cross_lingual=CROSS_LINGUAL)
  got = protocols.evaluate(tied, protocol, mesh=mesh, blocking=SQUARE if square else BLOCKING)
  want = reference.reference_metrics(tied, kind=kind, ties=ties, skip_ties=skip_ties,
                                     duplicates_as_hits=duplicates_as_hits, threshold=0.0,
                                     cross_lingual=CROSS_LINGUAL,
                                     candidate_lists=soft_lists(protocol))
  assert_same_metrics(got, want)


# docs/evaluation.md's worked example: rows are speech queries, columns texts, gold on the
# diagonal. Query 0 ties its gold with a later text, query 1 with an earlier one, query 2 has
# one text above its gold.
WORKED_SCORES = np.array([[0.875, 0.875, 0.125],
                          [0.75, 0.75, 0.25],
                          [0.625, 0.25, 0.5]], np.float32)
WORKED = {  # (ties, skip_ties): (hits@1, mrr, mean rank, num_queries)
    ("paper", False): (1 / 3, 5 / 6, 4 / 3, 3),
    ("paper", True): (1 / 2, 3 / 4, 3 / 2, 2),
    ("optimistic", False): (2 / 3, 5 / 6, 4 / 3, 3),
    ("optimistic", True): (0, 1 / 2, 2, 1),
    ("pessimistic", False): (0, 1 / 2, 2, 3),
    ("expected", False): (1 / 3, 2 / 3, 5 / 3, 3),
}


@pytest.mark.parametrize("ties,skip_ties", sorted(WORKED))
def test_the_worked_example_of_the_docs(mesh, ties, skip_ties):
  # Text embeddings are the unit vectors, so each score is exactly the speech row's entry.
  arrays = {"speech": WORKED_SCORES, "text": np.eye(3, dtype=np.float32)}
  got = protocols.evaluate(arrays, protocols.Protocol(ties=ties, skip_ties=skip_ties,
                                                      threshold=0.5), mesh=mesh,
                           blocking=BLOCKING)
  hits, mrr, mean_rank, count = WORKED[ties, skip_ties]
  assert got["speech_to_text/hits@1"] == pytest.approx(hits)
  assert got["speech_to_text/mrr"] == pytest.approx(mrr)
  assert got["speech_to_text/mean_rank"] == pytest.approx(mean_rank)
  assert got["speech_to_text/num_queries"] == count
  if not skip_ties:
    assert got["speech_to_text/golden_accuracy"] == 1.0
    assert got["speech_to_text/macro_precision"] == pytest.approx(0.75)
    assert got["speech_to_text/macro_recall"] == pytest.approx(0.75)
    assert got["speech_to_text/macro_f1"] == pytest.approx(2 / 3)
    assert got["speech_to_text/micro_f1"] == pytest.approx(2 / 3)


def test_candidate_lists_are_checked(tmp_path, arrays):
  path = tmp_path / "lists.txt"
  lists = given_lists(96, 5, seed=0)
  path.write_text("\n".join(",".join(map(str, row)) for row in lists) + "\n")
  np.testing.assert_array_equal(protocols.read_candidates(str(path), 96), lists)
  for text, message in [("1 2\n" * 95, "95 lines"), ("1 2\n" * 95 + "1 x\n", ":96: not a list"),
                        ("1 2\n" * 95 + "1 2 3\n", "3 candidates"),
                        ("1 2\n" * 95 + "1 96\n", "must lie in")]:
    path.write_text(text)
    with pytest.raises(protocols.InputError, match=message):
      protocols.read_candidates(str(path), 96)
  no_gold = lists.copy()
  no_gold[4] = [0, 1, 2, 3, 5]
  with pytest.raises(protocols.InputError, match="list 5 .query 4. holds no gold"):
    protocols.evaluate(arrays, protocols.Protocol(kind="soft"), blocking=BLOCKING,
                       candidates=no_gold)
  with pytest.raises(protocols.InputError, match="soft protocol"):
    protocols.evaluate(arrays, protocols.Protocol(), blocking=BLOCKING, candidates=lists)


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
    ({}, {"ties": "random"}, "ties must be one of"),
    ({}, {"threshold": float("nan")}, "threshold must be a finite"),
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
