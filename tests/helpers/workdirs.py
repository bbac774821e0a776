"""Workdirs the tests write directly: a config and a `best` checkpoint of perturbed weights.

Training even a tiny audio model compiles its train and eval steps for minutes on the shared
2-core machine; conversion and inference tests only need a workdir whose weights and BatchNorm
statistics are far from any initialisation (so a layout or statistics mix-up shows), which
this writes in seconds.
"""

import json
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from clasp_jax.common.mesh import data_mesh

from clasp_jax.models import clasp
from clasp_jax.trainer.checkpointing import Checkpointer
from configs import base


class _State:
  def __init__(self, step, params, batch_stats):
    self.step = np.asarray(step, np.int32)
    self.params = params
    self.batch_stats = batch_stats


def _perturbed(variables, seed):
  """Parameters moved by noise, running means shifted and variances spread (as training would)."""
  rng = np.random.default_rng(seed)

  def move(path, leaf):
    leaf = np.asarray(leaf, np.float32)
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return (0.5 + rng.random(leaf.shape)).astype(np.float32)
    scale = 0.1 if "'mean'" in name else 0.05
    return (leaf + scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(move, jax.device_get(variables))


def write_workdir(config, workdir, *, step=7, seed=0):
  """`config` with perturbed initial weights as the workdir's best checkpoint at `step`."""
  built = clasp.build(config)
  model = built.model
  if model.speech_kind == "audio":
    dims = {"audio": 16_000}
  else:
    dims = {name: int(dim) for name, dim in config.data.dims.items() if name != "text"}
  if built.text_tower is not None:
    dims["input_ids"] = 8
  else:
    dims["text"] = int(config.model.embed_dim)
  variables = jax.jit(lambda key: model.init(key, clasp.example_batch(dims), train=False))(
      jax.random.key(seed))
  variables = _perturbed(variables, seed)
  params = dict(variables["params"])
  if built.text_tower is not None:
    params["text_encoder"] = _perturbed({"p": built.text_tower.params}, seed + 1)["p"]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")
  # Replicated over every local device, as the trainer saves its state.
  replicated = NamedSharding(data_mesh(), P())
  params, batch_stats = jax.device_put((params, variables.get("batch_stats", {})), replicated)
  checkpointer = Checkpointer(str(workdir), every_steps=0, keep=1)
  try:
    checkpointer.save_best(step, _State(step, params, batch_stats), {"step": step})
  finally:
    checkpointer.close()
  return workdir


def tiny_audio_config(text_encoder):
  """The tiny audio-mode model of tests/trainer/test_audio_training.py, with a text tower."""
  config = base.get_config("tiny,speech=audio")
  config.data.kind = "audio"
  config.data.max_duration_s = 1.0
  config.model.text.kind = "encoder"
  config.model.text.encoder = str(text_encoder)
  config.model.text.max_length = 16
  return config


def paper_features_config(fusion="concat"):
  """The paper's feature-mode fusion encoder (1024 + 1000 -> 768), inputs L2-normalised."""
  config = base.get_config(f"paper,fusion={fusion}")
  config.data.dims.speech, config.data.dims.spectrogram, config.data.dims.text = 1024, 1000, 768
  return config


def read_state(workdir, checkpoint="best"):
  """(state as nested dicts, record) of a workdir's checkpoint ('best', 'latest' or a step)."""
  checkpointer = Checkpointer(str(workdir), every_steps=0, keep=1)
  try:
    return checkpointer.read(checkpoint)
  finally:
    checkpointer.close()


def read_variables(workdir, checkpoint="best"):
  state, record = read_state(workdir, checkpoint)
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, record
