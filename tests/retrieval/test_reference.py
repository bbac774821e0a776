"""The brute-force retrieval reference checked against hand-worked cases."""

import numpy as np
import pytest

from tests.helpers.retrieval_reference import direction_ranks, planted_corpus, summary


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
