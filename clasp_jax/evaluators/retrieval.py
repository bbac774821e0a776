"""Retrieval evaluator for the trainer: `config.evals.<name>.type = 'retrieval'`.

The trainer embeds its evaluation split and hands the embeddings over; this module only scores
them, with the same protocols as `python -m clasp_jax.evaluate`, and yields plain
(name, value) pairs that the trainer prefixes with '<eval name>/' and writes to TensorBoard and
metrics.jsonl. Example config entry:

  config.evals.test_hard = dict(type='retrieval', split='test', protocol='hard',
                                every_steps=1000, skip_ties=False)
  config.evals.test_soft = dict(type='retrieval', split='test', protocol='soft',
                                num_candidates=100, seed=0, every_steps=1000)

Keys read here (missing keys take these defaults): protocol ('hard'), num_candidates (100),
seed (0), skip_ties (False), duplicates_as_hits (False), breakdowns (None: every field
present), cross_lingual (() of 'text_lang:speech_lang'), ks ((1, 5, 10)), normalize (False),
and optional tile sizes block_rows, block_cols, chunk_rows, chunk_cols. `type`, `split` and
`every_steps` belong to the trainer.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np

from clasp_jax.retrieval import evaluation as protocols
from clasp_jax.retrieval import scoring


def _as_tuple(value: Any) -> tuple[Any, ...]:
  """A config list given as a sequence or as one comma-separated string."""
  if isinstance(value, str):
    return tuple(item.strip() for item in value.split(",") if item.strip())
  return tuple(value)


def protocol_from_config(config: ml_collections.ConfigDict) -> protocols.Protocol:
  breakdowns = config.get("breakdowns", None)
  return protocols.Protocol(
      kind=config.get("protocol", "hard"),
      num_candidates=int(config.get("num_candidates", 100)),
      seed=int(config.get("seed", 0)),
      skip_ties=bool(config.get("skip_ties", False)),
      duplicates_as_hits=bool(config.get("duplicates_as_hits", False)),
      breakdowns=None if breakdowns is None else _as_tuple(breakdowns),
      cross_lingual=protocols.parse_cross_lingual(_as_tuple(config.get("cross_lingual", ()))),
      ks=tuple(int(k) for k in _as_tuple(config.get("ks", (1, 5, 10)))),
  )


class Evaluator:
  """Scores one split's embeddings with one retrieval protocol."""

  def __init__(self, config: ml_collections.ConfigDict, *,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.config = config
    self.protocol = protocol_from_config(config)
    self.blocking = scoring.make_blocking(
        **{name: int(config.get(name, 0) or 0)
           for name in ("block_rows", "block_cols", "chunk_rows", "chunk_cols")})
    self.normalize = bool(config.get("normalize", False))
    self.mesh = mesh

  def run(self, embeddings: Mapping[str, np.ndarray]) -> Iterator[tuple[str, float]]:
    """Yields ('speech_to_text/hits@1', value), ('by_category/news/...', value), ..."""
    corpus = protocols.Corpus.from_mapping(embeddings, normalize=self.normalize)
    metrics = protocols.evaluate(corpus, self.protocol, mesh=self.mesh,
                                 blocking=self.blocking)
    for name in sorted(metrics):
      yield name, float(metrics[name])

