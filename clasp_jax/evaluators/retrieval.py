"""Retrieval evaluator for the trainer: `config.evals.<name>.type = 'retrieval'`.

The evaluator owns its data: it reads its split (`split`, default 'validation') through the
same input pipeline as training, embeds it with the trainer's `predict_fn(state, batch)`, and
scores it with the same protocols as `python -m clasp_jax.evaluate`, yielding plain
(name, value) pairs that the trainer prefixes with '<eval name>/' and writes to TensorBoard and
metrics.jsonl. Example config entry:

  config.evals.test_hard = dict(type='retrieval', split='test', protocol='hard',
                                every_steps=1000, skip_ties=False)
  config.evals.test_soft = dict(type='retrieval', split='test', protocol='soft',
                                num_candidates=100, seed=0, every_steps=1000)

Keys read here (missing keys take these defaults): protocol ('hard'), num_candidates (100),
seed (0), ties ('expected'; 'paper' for the authors' argmax rule, see
clasp_jax/retrieval/metrics.py), skip_ties (False), threshold (None: no thresholded numbers),
candidates ('': random soft candidates; a candidate-list file otherwise), duplicates_as_hits
(False), breakdowns (None: every field present), cross_lingual (() of
'text_lang:speech_lang'), ks ((1, 5, 10)), normalize (False), and optional tile sizes
block_rows, block_cols, chunk_rows, chunk_cols. `type`, `split` and `every_steps` belong to
the trainer.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np

from clasp_jax.inference import split_embedding
from clasp_jax.retrieval import evaluation as protocols
from clasp_jax.retrieval import scoring


def protocol_from_config(config: ml_collections.ConfigDict) -> protocols.Protocol:
  """The protocol of an evaluator's config: the keys and defaults of `evaluate`'s flags."""
  return protocols.protocol_from_settings(lambda name: config.get(name, None))


class Evaluator:
  """Embeds one split with the model under training and scores it with one protocol.

  `make_pipeline(split)` returns the evaluation pipeline of that split (the trainer binds the
  config, mesh and text encoder); `predict_fn(state, batch) -> (zspeech, ztext)`. Both may be
  omitted to use `score` alone on embeddings computed elsewhere.
  """

  def __init__(self, config: ml_collections.ConfigDict, *,
               predict_fn: Optional[split_embedding.PredictFn] = None,
               make_pipeline: Optional[Callable[[str], Any]] = None,
               mesh: Optional[jax.sharding.Mesh] = None):
    self.config = config
    self.protocol = protocol_from_config(config)
    self.blocking = scoring.make_blocking(
        **{name: int(config.get(name, 0) or 0)
           for name in ("block_rows", "block_cols", "chunk_rows", "chunk_cols")})
    self.normalize = bool(config.get("normalize", False))
    self.candidates_path = str(config.get("candidates", "") or "")
    if self.candidates_path and self.protocol.kind != "soft":
      raise protocols.InputError("candidates are for protocol='soft'")
    self.mesh = mesh
    self.predict_fn = predict_fn
    self.split = config.get("split", "validation")
    self.pipeline = make_pipeline(self.split) if make_pipeline is not None else None

  def embed(self, state: Any) -> dict[str, np.ndarray]:
    if self.pipeline is None or self.predict_fn is None:
      raise ValueError("this evaluator was built without predict_fn and make_pipeline")
    return split_embedding.embed_split(self.predict_fn, state, self.pipeline)

  def run(self, state: Any) -> Iterator[tuple[str, float]]:
    """Embeds the split with `state` and yields its metrics (see `score`)."""
    yield from self.score(self.embed(state))

  def score(self, embeddings: Mapping[str, np.ndarray]) -> Iterator[tuple[str, float]]:
    """Yields ('speech_to_text/hits@1', value), ('by_category/news/...', value), ..."""
    corpus = protocols.Corpus.from_mapping(embeddings, normalize=self.normalize)
    candidates = (protocols.read_candidates(self.candidates_path, corpus.size)
                  if self.candidates_path else None)
    metrics = protocols.evaluate(corpus, self.protocol, mesh=self.mesh,
                                 blocking=self.blocking, candidates=candidates)
    for name in sorted(metrics):
      yield name, float(metrics[name])
