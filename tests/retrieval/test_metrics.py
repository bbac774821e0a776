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


# Three queries: nothing above and one tie after the gold (0), nothing above and one tie before
# the gold (1), one candidate above and no tie (2).
ABOVE, TIES, TIES_BEFORE = np.array([0, 0, 1]), np.array([1, 1, 0]), np.array([0, 1, 0])


@pytest.mark.parametrize("rule,hits1,hits2,mrr,mean_rank", [
    ("optimistic", 2 / 3, 1, 5 / 6, 4 / 3),
    ("paper", 1 / 3, 1, 5 / 6, 4 / 3),  # argmax loses query 1's tie; ranks stay optimistic.
    ("pessimistic", 0, 1, 1 / 2, 2),
    ("expected", 1 / 3, 1, 2 / 3, 5 / 3),  # Queries 0 and 1 are coin tosses between rank 1 and 2.
])
def test_tie_rules_on_a_hand_worked_case(rule, hits1, hits2, mrr, mean_rank):
  result = metrics.metrics_from_counts(ABOVE, TIES, TIES_BEFORE, rule=rule, ks=(1, 2))
  assert result["hits@1"] == pytest.approx(hits1)
  assert result["hits@2"] == pytest.approx(hits2)
  assert result["mrr"] == pytest.approx(mrr)
  assert result["mean_rank"] == pytest.approx(mean_rank)


def test_expected_rule_averages_over_every_place_among_the_ties():
  rng = np.random.default_rng(1)
  above = rng.integers(0, 30, 200)
  ties = rng.integers(0, 6, 200) * (rng.random(200) < 0.5)
  result = metrics.metrics_from_counts(above, ties, rule="expected", ks=(1, 3, 10))
  places = [1 + a + np.arange(t + 1) for a, t in zip(above, ties)]
  for k in (1, 3, 10):
    assert result[f"hits@{k}"] == pytest.approx(np.mean([np.mean(p <= k) for p in places]),
                                                rel=1e-12)
  assert result["mrr"] == pytest.approx(np.mean([np.mean(1 / p) for p in places]), rel=1e-12)
  assert result["median_rank"] == pytest.approx(np.median([np.mean(p) for p in places]))
  # Without ties every rule is the plain rank rule.
  plain = metrics.metrics_from_ranks(1 + above)
  zeros = np.zeros_like(above)
  for rule in metrics.TIE_RULES:
    assert metrics.metrics_from_counts(above, zeros, zeros, rule=rule) == pytest.approx(plain)


def test_tie_rules_say_what_they_need():
  with pytest.raises(ValueError, match="needs ties_before"):
    metrics.metrics_from_counts(ABOVE, TIES, rule="paper")
  with pytest.raises(ValueError, match="needs ties"):
    metrics.metrics_from_counts(ABOVE, rule="expected")
  with pytest.raises(ValueError, match="tie rule must be one of"):
    metrics.metrics_from_counts(ABOVE, TIES, rule="random")


@pytest.mark.parametrize("seed", range(6))
def test_decision_metrics_equal_scikit_learn(seed):
  sk = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(seed)
  size = int(rng.integers(1, 40))
  truth = rng.random(size) < rng.random()
  # Seeds 0 and 1 predict one label only, where some per-label ratios divide by zero.
  predicted = rng.random(size) < [0.0, 1.0, 0.5, 0.1, 0.9, 0.5][seed]
  got = metrics.decision_metrics(
      int(np.sum(truth & predicted)), int(np.sum(~truth & predicted)),
      int(np.sum(truth & ~predicted)), int(np.sum(~truth & ~predicted)))
  truth, predicted = truth.astype(int), predicted.astype(int)
  for average in ("macro", "micro"):
    assert got[f"{average}_precision"] == pytest.approx(
        sk.precision_score(truth, predicted, average=average, zero_division=0))
    assert got[f"{average}_recall"] == pytest.approx(
        sk.recall_score(truth, predicted, average=average, zero_division=0))
    assert got[f"{average}_f1"] == pytest.approx(
        sk.f1_score(truth, predicted, average=average, zero_division=0))


def test_threshold_metrics_of_a_hand_worked_case():
  # Gold scores 0.875, 0.75, 0.5 at threshold 0.5: every gold is accepted (3 true positives);
  # one other candidate per query is accepted too (3 false positives) of 6 non-gold ones.
  got = metrics.threshold_metrics(np.array([0.875, 0.75, 0.5]), np.ones(3), np.ones(3),
                                  np.ones(3), np.full(3, 3), threshold=0.5)
  assert got["golden_accuracy"] == 1.0
  assert got["macro_precision"] == pytest.approx((3 / 6 + 3 / 3) / 2)
  assert got["macro_recall"] == pytest.approx((3 / 3 + 3 / 6) / 2)
  assert got["micro_f1"] == pytest.approx(6 / 9)
