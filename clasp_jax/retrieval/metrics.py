"""Retrieval metrics as pure NumPy functions.

The paper's rank is 1 + the number of candidates that score strictly higher than the gold one,
which resolves every tie in the query's favour. Exact ties are common in practice (duplicate
texts through a frozen text tower embed identically), so how a tie counts is a rule of its own
(`TIE_RULES`, docs/evaluation.md):

  expected: the expectation over a uniformly random order of the tied candidates (the default:
    a tie is a coin toss, so a model that scores everything alike gets chance-level numbers).
  paper: the authors' code: HITS@1 is `np.argmax(row) == gold`, so a tie goes to the lower
    index; MRR and ranks take the strictly-greater rank.
  optimistic: the strictly-greater rank for everything (every tie is won).
  pessimistic: every tied candidate ranks above the gold one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.special

DEFAULT_KS = (1, 5, 10)
DIRECTIONS = ("speech_to_text", "text_to_speech")
TIE_RULES = ("expected", "paper", "optimistic", "pessimistic")
DEFAULT_TIE_RULE = "expected"


def gold_ranks(scores: np.ndarray, gold: np.ndarray | None = None) -> np.ndarray:
  """Ranks of each query's gold candidate.

  Args:
    scores: (num_queries, num_candidates) similarity scores.
    gold: (num_queries,) index of the gold candidate; defaults to the diagonal.
  Returns:
    (num_queries,) int64 ranks, 1 is best.
  """
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be 2-D, got shape {scores.shape}")
  if gold is None:
    if scores.shape[0] > scores.shape[1]:
      raise ValueError(f"diagonal gold needs num_queries <= num_candidates, got {scores.shape}")
    gold = np.arange(scores.shape[0])
  gold = np.asarray(gold)
  gold_scores = scores[np.arange(scores.shape[0]), gold]
  return 1 + np.sum(scores > gold_scores[:, None], axis=1, dtype=np.int64)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """HITS@k, mean reciprocal rank, mean and median rank of a set of gold ranks."""
  ranks = np.asarray(ranks, dtype=np.float64)
  if ranks.size == 0:
    raise ValueError("no ranks to summarise")
  metrics = {f"hits@{k}": float(np.mean(ranks <= k)) for k in ks}
  metrics["mrr"] = float(np.mean(1.0 / ranks))
  metrics["mean_rank"] = float(np.mean(ranks))
  metrics["median_rank"] = float(np.median(ranks))
  return metrics


def metrics_from_counts(above: np.ndarray, ties: Optional[np.ndarray] = None,
                        ties_before: Optional[np.ndarray] = None, *,
                        rule: str = DEFAULT_TIE_RULE,
                        ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """HITS@k, MRR, mean and median rank of queries under a tie rule (TIE_RULES).

  Args:
    above: (q,) candidates scoring strictly higher than the gold one.
    ties: (q,) non-gold candidates scoring exactly the gold score (expected, pessimistic).
    ties_before: (q,) of those, the ones at a lower index than the gold candidate (paper).
  """
  if rule not in TIE_RULES:
    raise ValueError(f"tie rule must be one of {TIE_RULES}, got {rule!r}")
  above = np.asarray(above, dtype=np.int64)
  if above.size == 0:
    raise ValueError("no queries to summarise")
  needs = {"expected": "ties", "pessimistic": "ties", "paper": "ties_before"}.get(rule)
  if needs and {"ties": ties, "ties_before": ties_before}[needs] is None:
    raise ValueError(f"the {rule!r} tie rule needs {needs}")
  if rule == "optimistic":
    return metrics_from_ranks(1 + above, ks)
  if rule == "pessimistic":
    return metrics_from_ranks(1 + above + np.asarray(ties, np.int64), ks)
  if rule == "paper":
    metrics = metrics_from_ranks(1 + above, ks)
    if 1 in ks:
      # argmax == gold: nothing above and no tie at a lower index.
      won = (above == 0) & (np.asarray(ties_before) == 0)
      metrics["hits@1"] = float(np.mean(won))
    return metrics
  # Expected: the gold candidate lands uniformly on ranks above + 1 ... above + ties + 1.
  above = above.astype(np.float64)
  ties = np.asarray(ties, dtype=np.float64)
  positions = ties + 1
  metrics = {f"hits@{k}": float(np.mean(np.clip(k - above, 0, positions) / positions))
             for k in ks}
  # Mean of 1 / (above + 1 + j) over j < positions: a difference of digammas (harmonic
  # numbers); exact division where nothing ties.
  reciprocal = np.where(
      ties == 0, 1.0 / (above + 1),
      (scipy.special.digamma(above + positions + 1) - scipy.special.digamma(above + 1)) /
      positions)
  expected_rank = 1 + above + ties / 2
  metrics["mrr"] = float(np.mean(reciprocal))
  metrics["mean_rank"] = float(np.mean(expected_rank))
  metrics["median_rank"] = float(np.median(expected_rank))
  return metrics


def decision_metrics(true_positives: int, false_positives: int, false_negatives: int,
                     true_negatives: int) -> dict[str, float]:
  """Macro and micro precision, recall and F1 of binary decisions, as scikit-learn's
  `precision_recall_fscore_support` computes them for labels {0, 1} (zero_division=0).

  Macro averages the per-label scores over the labels that occur in the truth or the
  predictions; micro pools the counts of those labels (for two labels every micro score is the
  accuracy).
  """
  # Per label: (correct, predicted as the label, truly the label).
  labels = {1: (true_positives, true_positives + false_positives,
                true_positives + false_negatives),
            0: (true_negatives, true_negatives + false_negatives,
                true_negatives + false_positives)}
  present = [counts for counts in labels.values() if counts[1] or counts[2]]
  if not present:
    raise ValueError("no decisions to summarise")

  def ratio(numerator, denominator):
    return numerator / denominator if denominator else 0.0

  def f1(correct, predicted, true):
    return ratio(2 * correct, predicted + true)  # 2PR / (P + R) in counts.

  metrics = {
      "macro_precision": float(np.mean([ratio(c, p) for c, p, _ in present])),
      "macro_recall": float(np.mean([ratio(c, t) for c, _, t in present])),
      "macro_f1": float(np.mean([f1(*counts) for counts in present])),
  }
  correct, predicted, true = (sum(column) for column in zip(*present))
  metrics["micro_precision"] = ratio(correct, predicted)
  metrics["micro_recall"] = ratio(correct, true)
  metrics["micro_f1"] = f1(correct, predicted, true)
  return metrics


def threshold_metrics(gold_score: np.ndarray, gold_at_threshold: np.ndarray,
                      gold_members: np.ndarray, at_threshold: np.ndarray,
                      num_candidates: np.ndarray, threshold: float) -> dict[str, float]:
  """The authors' thresholded retrieval numbers over a set of queries.

  golden_accuracy: share of queries whose gold score is at least `threshold`. The decision
  metrics pool one binary decision per (query, candidate): truth 1 for gold candidates, 0 for
  the rest; prediction 1 where the candidate scores at least `threshold`.

  Args:
    gold_score: (q,) best gold score per query.
    gold_at_threshold / gold_members: (q,) gold candidates at or above the threshold / in all.
    at_threshold: (q,) non-gold candidates at or above the threshold.
    num_candidates: (q,) candidates per query.
  """
  true_positives = int(np.sum(gold_at_threshold))
  false_negatives = int(np.sum(gold_members)) - true_positives
  false_positives = int(np.sum(at_threshold))
  true_negatives = int(np.sum(num_candidates) - np.sum(gold_members)) - false_positives
  metrics = {"golden_accuracy": float(np.mean(np.asarray(gold_score) >= np.float32(threshold)))}
  metrics.update(decision_metrics(true_positives, false_positives, false_negatives,
                                  true_negatives))
  return metrics


def bidirectional_metrics(zspeech: np.ndarray, ztext: np.ndarray,
                          ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Hard-protocol metrics both ways for paired embeddings (row i of each is a pair).

  Keys look like 'speech_to_text/hits@1' and 'text_to_speech/mrr'.
  """
  zspeech = np.asarray(zspeech, dtype=np.float32)
  ztext = np.asarray(ztext, dtype=np.float32)
  if zspeech.shape != ztext.shape:
    raise ValueError(f"paired embeddings differ in shape: {zspeech.shape} vs {ztext.shape}")
  scores = zspeech @ ztext.T  # (n, d) @ (d, n) -> (n, n); row = speech query.
  metrics = {}
  for direction, direction_scores in (("speech_to_text", scores), ("text_to_speech", scores.T)):
    for name, value in metrics_from_ranks(gold_ranks(direction_scores), ks).items():
      metrics[f"{direction}/{name}"] = value
  return metrics
