"""Embedding feature splits with a model: during training, and from a trained workdir."""

from __future__ import annotations

import json
import os
import re
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from clasp_jax.trainer import optim
from clasp_jax.models import text_tower
from clasp_jax.trainer.checkpointing import Checkpointer
from clasp_jax.common.config_args import ConfigError
from clasp_jax.data import feature_pipeline, features
from clasp_jax.models.clasp import model_from_config


def tokenize_split(split: features.FeatureSplit, name: str, tower: text_tower.TextTower) -> None:
  """Tokenises the split's sentences once, padded to the tower's maximum length."""
  if split.sentences is None:
    raise ConfigError(f"config.text.encoder needs the sentences of each split, but the {name} "
                      f"split has none (sentences.json); synthetic_features has none either")
  input_ids, attention_mask = tower.pad_batch(tower.tokenize(split.sentences),
                                              length=tower.max_length)
  split.add_tokens(input_ids, attention_mask)


def freeze_text_tower(frozen, tower: text_tower.TextTower, trainable_top_layers: int):
  """Freezes every text-tower parameter but the top layers (and the Dense head) asked for."""
  trainable = (re.compile(text_tower.trainable_top_layers_regex(tower, trainable_top_layers))
               if trainable_top_layers > 0 else None)
  frozen = dict(frozen)
  frozen["text_encoder"] = jax.tree_util.tree_map_with_path(
      lambda path, _: not (trainable and trainable.search(optim.parameter_path(path))),
      tower.params)
  return frozen


def embed_feature_split(embed_batch: Callable, split: features.FeatureSplit, batch_size: int,
                        mesh: Mesh) -> dict[str, np.ndarray]:
  """Paired embeddings and labels of a whole split, in order, as the evaluators take them.

  `embed_batch(global_batch) -> (zspeech, ztext)`; every process gets the whole split back.
  """
  speech, text = [], []
  for batch, valid in feature_pipeline.eval_batches(split, batch_size, mesh,
                                                    drop_remainder=False):
    zspeech, ztext = embed_batch(batch)
    zspeech, ztext = multihost_utils.process_allgather((zspeech, ztext), tiled=True)
    speech.append(np.asarray(zspeech)[:valid])
    text.append(np.asarray(ztext)[:valid])
  embeddings = {
      "speech": np.concatenate(speech),
      "text": np.concatenate(text),
      "category": split.label_names("category").astype(str),
      "language": split.label_names("language").astype(str),
  }
  if split.source:
    embeddings["source"] = np.full(split.num_examples, split.source)
  if split.sentences is not None:  # Equal sentences share an id: duplicates are detectable.
    embeddings["text_id"] = np.unique(np.asarray(split.sentences, dtype=str),
                                      return_inverse=True)[1].astype(np.int64)
  return embeddings


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a training workdir: {path} is missing")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def embed_workdir_split(workdir: str, split_name: str, *, batch_size: int = 0,
                        features_dir: str = "") -> tuple[dict[str, np.ndarray], int]:
  """Embeds a split with the newest checkpoint of a training workdir.

  The data is the workdir config's (`features_dir` points a `features` config elsewhere).
  Returns the embeddings mapping and the checkpoint step.
  """
  config = read_workdir_config(workdir)
  if features_dir:
    config.data.kind, config.data.directory = "features", features_dir
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  batch_size = batch_size or config.eval_batch_size
  batch_size = -(-batch_size // mesh.size) * mesh.size  # A multiple of the device count.
  tower = None
  if config.text.encoder:
    tower = text_tower.load(config.text.encoder, max_length=config.text.max_length or None)
  split = features.load_split(config.data, split_name)
  if tower is not None:
    tokenize_split(split, split_name, tower)
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    state, record = checkpointer.read()
  finally:
    checkpointer.close()
  model = model_from_config(config.model, config.loss,
                            text_encoder=tower.model if tower is not None else None)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}

  @jax.jit
  def embed_batch(variables, batch):
    zspeech, ztext, _ = model.apply(variables, batch, train=False)
    return zspeech, ztext

  embeddings = embed_feature_split(lambda batch: embed_batch(variables, batch), split,
                                   batch_size, mesh)
  return embeddings, int(record["step"])
