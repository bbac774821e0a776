"""Embedding a whole split through the input pipeline: what evaluators and `evaluate` score.

`predict_fn(state, arrays) -> (zspeech, ztext)` runs on one global batch (a sharded, jitted
function in the trainer); the split is read once by an evaluation pipeline
(`data.pipeline.for_split(..., train=False)`; shortest clips first when the data has length
buckets), padding rows are cut off, and every process gets the whole split's embeddings back in
stored order, with the labels the retrieval protocols break down by.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from clasp_jax.data import pipeline as pipeline_lib

PredictFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]


def _to_host(tree):
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)


def embed_split(predict_fn: PredictFn, state: Any,
                pipeline: pipeline_lib.InputPipeline) -> dict[str, np.ndarray]:
  """Paired embeddings and labels of every example of the pipeline's split, in stored order."""
  speech, text, order, hosts = [], [], [], []
  for batch in pipeline.iterate():
    zspeech, ztext = predict_fn(state, batch.arrays)
    zspeech, ztext, valid, index = _to_host(
        (zspeech, ztext, batch.arrays["valid"], batch.arrays["example_index"]))
    valid = valid.astype(bool)
    speech.append(zspeech[valid])
    text.append(ztext[valid])
    order.append(index[valid])
    if jax.process_count() == 1:  # This process's rows are the whole batch.
      hosts.append({field: values[valid] for field, values in batch.host.items()})
  order = np.concatenate(order)
  stored = np.argsort(order, kind="stable")  # The pipeline may visit clips by length.
  order = order[stored]
  if jax.process_count() == 1:
    host = {field: np.concatenate([h[field] for h in hosts])[stored]
            for field in pipeline_lib.HOST_FIELDS}
  else:  # Each process saw only its rows' texts: describe the whole split instead.
    host = pipeline_lib.describe(pipeline.source, order)
  return labelled_embeddings(np.concatenate(speech)[stored], np.concatenate(text)[stored], host)


def labelled_embeddings(speech: np.ndarray, text: np.ndarray,
                        host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The mapping the retrieval protocols read (retrieval.evaluation.Corpus.from_mapping)."""
  embeddings = {
      "speech": np.asarray(speech, np.float32),
      "text": np.asarray(text, np.float32),
      "category": np.asarray(host["category"]).astype(str),
      "language": np.asarray(host["language"]).astype(str),
  }
  sources = np.asarray(host["source"]).astype(str)
  if sources.size and sources.any():
    embeddings["source"] = sources
  sentences = np.asarray(host["text"]).astype(str)
  if sentences.size and all(sentences):  # Equal sentences share an id: duplicates are found.
    embeddings["text_id"] = np.unique(sentences, return_inverse=True)[1].astype(np.int64)
  return embeddings
