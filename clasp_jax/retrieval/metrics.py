"""Retrieval metrics as pure NumPy functions.

Rank follows the paper's rule: 1 + the number of candidates that score strictly higher than
the gold one, so ties are resolved in the query's favour.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
DIRECTIONS = ("speech_to_text", "text_to_speech")


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
