"""The brute-force retrieval reference checked against hand-worked cases."""

import numpy as np
import pytest

from tests.helpers.retrieval_reference import (authors_direction, direction_ranks,
                                                planted_corpus, summary, tied_corpus)


def test_rank_rule_on_a_hand_worked_matrix():
  # Query 0: gold 2.0, one candidate above (3.0), one tie (2.0) -> rank 2, not skipped.
  # Query 1: gold 5.0 ties the top with candidate 0 -> rank 1, skipped with tie skipping.
  # Query 2: gold 1.0 is the unique top -> rank 1.
  scores = [[3.0, 2.0, 2.0],
            [5.0, 5.0, 4.0],
            [0.0, -1.0, 1.0]]
  keys = [0, 1, 2]
  ranks, skipped = direction_ranks(scores, keys, [1, 0, 2])
  assert ranks == {0: 2, 1: 1, 2: 1} and skipped == set()
  ranks, skipped = direction_ranks(scores, keys, [1, 0, 2], skip_ties=True)
  assert ranks == {0: 2, 2: 1} and skipped == {1}


def test_duplicate_gold_uses_the_best_member():
  # Candidates 0 and 1 share key 7: query 0 takes the better of them (4.0); only candidate 2
  # (5.0) is above it.
  scores = [[1.0, 4.0, 5.0, 3.0]]
  ranks, _ = direction_ranks(scores, [7], [7, 7, 8, 9])
  assert ranks == {0: 2}


def test_summary_matches_definitions():
  values = summary([1, 2, 4, 20])
  assert values["hits@1"] == pytest.approx(0.25)
  assert values["hits@5"] == pytest.approx(0.75)
  assert values["mrr"] == pytest.approx((1 + 0.5 + 0.25 + 0.05) / 4)
  assert values["median_rank"] == pytest.approx(3.0)


def test_planted_corpus_has_its_ties():
  arrays = planted_corpus()
  full = arrays["speech"].astype(np.float64) @ arrays["text"].astype(np.float64).T
  ranks, skipped = direction_ranks(full, np.arange(96), np.arange(96), skip_ties=True)
  assert skipped, "the planted duplicates must produce tied-at-top queries"
  assert len(set(arrays["text_id"])) < 96


def test_authors_loop_on_a_hand_worked_matrix():
  # Query 0: gold (index 0) ties index 1 at the top -> argmax 0, a hit.
  # Query 1: gold (index 1) ties index 0 at the top -> argmax 0, a miss; skipped when asked.
  # Query 2: index 0 scores above the gold -> a miss of rank 2, never skipped.
  scores = [[0.875, 0.875, 0.125],
            [0.75, 0.75, 0.25],
            [0.625, 0.25, 0.5]]
  outcomes, skipped = authors_direction(scores, [0, 1, 2], [0, 1, 2])
  assert outcomes == {0: (True, 1), 1: (False, 1), 2: (False, 2)} and skipped == set()
  outcomes, skipped = authors_direction(scores, [0, 1, 2], [0, 1, 2], skip_ties=True)
  assert outcomes == {0: (True, 1), 2: (False, 2)} and skipped == {1}
  # In a candidate list the list order decides: the gold listed last loses every tie.
  outcomes, _ = authors_direction(scores, [0, 1, 2], [0, 1, 2], {0: [1, 2, 0]})
  assert outcomes == {0: (False, 1)}


def test_tied_corpus_ties_on_both_sides_of_the_gold():
  arrays = tied_corpus()
  full = arrays["speech"].astype(np.float64) @ arrays["text"].astype(np.float64).T
  keys = np.arange(64)
  outcomes, skipped = authors_direction(full, keys, keys, skip_ties=True)
  ranks, tied = direction_ranks(full, keys, keys, skip_ties=True)
  won_ties = [q for q in tied if q not in skipped]
  assert len(skipped) >= 10 and len(won_ties) >= 3
  assert all(outcomes[q][0] for q in won_ties)
