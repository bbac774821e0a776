"""A trained workdir as a model: its config, its chosen checkpoint, and embedding with it.

  trained = load_trained(WORKDIR, checkpoint="best")
  embeddings = trained.embed_split("test")          # what the evaluators score

The model is rebuilt from the workdir's config by the same code as in training
(`models.towers.build`), the split is read by the same input pipeline, and the variables come
from the checkpoint (`best` by default: the step that scored best on the early-stopping metric,
or the newest when no evaluation ran).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.data import pipeline
from clasp_jax.inference import split_embedding
from clasp_jax.models import towers
from clasp_jax.trainer import steps
from clasp_jax.trainer.checkpointing import Checkpointer


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a training workdir: {path} is missing")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class TrainedModel:
  """A rebuilt model with the variables of one checkpoint, replicated over `mesh`."""

  workdir: str
  config: ml_collections.ConfigDict
  built: towers.BuiltModel
  variables: dict[str, Any]
  step: int
  mesh: Mesh

  @functools.cached_property
  def predict_fn(self):
    """(variables, global batch) -> (zspeech, ztext), sharded over the mesh like in training."""
    return steps.shard_over_mesh(functools.partial(steps.embed_step, model=self.built.model),
                                 self.mesh, batch_out=True)

  def embed_split(self, split: str, *, batch_size: int = 0) -> dict[str, np.ndarray]:
    """Every example of `split` of the config's data, embedded as the evaluators embed it."""
    config = self.config.copy_and_resolve_references()
    batch_size = batch_size or config.eval_batch_size
    config.eval_batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
    split_pipeline = pipeline.for_split(config, split, mesh=self.mesh, train=False,
                                        text_encoder=self.built.text_encoder)
    return split_embedding.embed_split(self.predict_fn, _VariablesState(self.variables),
                                       split_pipeline)


@dataclasses.dataclass
class _VariablesState:
  """What `steps.embed_step` reads of a train state."""

  variables: dict[str, Any]

  @property
  def params(self):
    return self.variables["params"]

  @property
  def batch_stats(self):
    return self.variables["batch_stats"]


jax.tree_util.register_pytree_node(
    _VariablesState, lambda state: ((state.variables,), None),
    lambda _, children: _VariablesState(children[0]))


def load_trained(workdir: str, *, checkpoint: int | str = "best",
                 features_dir: str = "") -> TrainedModel:
  """Rebuilds the model of `workdir` with the variables of `checkpoint` ('best', 'latest', or a
  step). `features_dir` points a feature-mode config at another feature folder."""
  config = read_workdir_config(workdir)
  if features_dir:
    config.data.kind, config.data.directory = "features", features_dir
  mesh = Mesh(np.asarray(jax.devices()), (steps.AXIS,))
  built = towers.build(config)
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    state, record = checkpointer.read(checkpoint)
  finally:
    checkpointer.close()
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  return TrainedModel(workdir=workdir, config=config, built=built, variables=variables,
                      step=int(record["step"]), mesh=mesh)


def embed_workdir_split(workdir: str, split_name: str, *, batch_size: int = 0,
                        features_dir: str = "", checkpoint: int | str = "best"
                        ) -> tuple[dict[str, np.ndarray], int]:
  """Embeds a split with a checkpoint of a training workdir; returns (embeddings, step)."""
  trained = load_trained(workdir, checkpoint=checkpoint, features_dir=features_dir)
  return trained.embed_split(split_name, batch_size=batch_size), trained.step
