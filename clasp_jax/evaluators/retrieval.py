"""Hard-protocol retrieval metrics in both directions over a whole split."""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from clasp_jax import metrics


class Evaluator:

  def __init__(self, config, *, mesh=None):
    del mesh
    self.config = config

  def run(self, embeddings: Mapping[str, np.ndarray]) -> Iterator[tuple[str, float]]:
    yield from metrics.bidirectional_metrics(embeddings["speech"], embeddings["text"]).items()
