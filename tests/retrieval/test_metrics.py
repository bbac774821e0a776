"""Retrieval metrics: the paper's rank rule and both directions."""

import numpy as np
import pytest

from clasp_jax.retrieval import metrics


def test_rank_counts_strictly_higher_scores_only():
  scores = np.array([[0.9, 0.9, 0.1],    # tie with gold: rank 1
                     [0.5, 0.2, 0.7],    # two higher: rank 3
                     [0.3, 0.3, 0.3]])   # all tied: rank 1
  np.testing.assert_array_equal(metrics.gold_ranks(scores), [1, 3, 1])
  np.testing.assert_array_equal(metrics.gold_ranks(scores, np.array([2, 0, 1])), [3, 2, 1])


def test_metrics_from_ranks():
  result = metrics.metrics_from_ranks(np.array([1, 2, 6, 20]), ks=(1, 5, 10))
  assert result["hits@1"] == 0.25 and result["hits@5"] == 0.5 and result["hits@10"] == 0.75
  assert result["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 20) / 4)
  assert result["mean_rank"] == pytest.approx(29 / 4) and result["median_rank"] == 4.0


def test_bidirectional_metrics_against_a_loop():
  rng = np.random.default_rng(0)
  speech, text = rng.standard_normal((2, 40, 8)).astype(np.float32)
  result = metrics.bidirectional_metrics(speech, text)
  scores = speech @ text.T
  for direction, matrix in (("speech_to_text", scores), ("text_to_speech", scores.T)):
    ranks = [1 + sum(matrix[i, j] > matrix[i, i] for j in range(40)) for i in range(40)]
    assert result[f"{direction}/mean_rank"] == pytest.approx(np.mean(ranks))
    assert result[f"{direction}/hits@1"] == pytest.approx(np.mean(np.array(ranks) == 1))


def test_mismatched_shapes_are_an_error():
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.bidirectional_metrics(np.zeros((3, 4)), np.zeros((2, 4)))
