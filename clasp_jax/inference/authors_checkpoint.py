"""A workdir made from one of the authors' released fusion encoders.

`models/torch_pickle.py` reads their whole-module checkpoint without running it; this writes
what it holds as a workdir every command reads: `config.json` (the given training config, with
the model settings and feature widths of the checkpoint, and the inputs L2-normalised as the
authors' inference notebook requires) and the weights as the workdir's best checkpoint, the
one `evaluate --workdir`, `embed` and `config.init_from` take by default. It holds no
optimizer state: to train on from it, start a new workdir with `--config.init_from=DIR`.
"""

from __future__ import annotations

import json
import os
import shutil

import ml_collections
import numpy as np

from clasp_jax.common.config_args import ConfigError
from clasp_jax.models import torch_pickle
from clasp_jax.trainer.checkpointing import Checkpointer

IMPORTED_STEP = 0


class _ImportedState:
  """What Checkpointer.save_best reads of a train state."""

  def __init__(self, params, batch_stats):
    self.step = np.asarray(IMPORTED_STEP, np.int32)
    self.params = params
    self.batch_stats = batch_stats


def config_for(imported: torch_pickle.FusionImport,
               config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the model and feature widths of the imported network."""
  config = ml_collections.ConfigDict(config.to_dict())
  settings = imported.settings
  config.model.fusion = settings["fusion"]
  config.model.mode = settings["mode"]
  config.model.embed_dim = settings["embed_dim"]
  config.model.branch_hidden = tuple(settings["branch_hidden"])
  config.model.speech_branch_hidden = tuple(settings["branch_hidden"])
  config.model.spectrogram_branch_hidden = tuple(settings["spectrogram_branch_hidden"])
  if "fusion_hidden" in settings:
    config.model.fusion_hidden = tuple(settings["fusion_hidden"])
  # "Do not forget to normalize your spectrogram and SSL embeddings" (their inference notebook).
  config.model.normalize_inputs = True
  config.data.dims = ml_collections.ConfigDict(
      {**imported.dims, "text": settings["embed_dim"]})
  return config


def write_workdir(checkpoint_path: str, workdir: str, config: ml_collections.ConfigDict, *,
                  overwrite: bool = False) -> torch_pickle.FusionImport:
  """Imports `checkpoint_path` into `workdir` (see the module docstring).

  Raises:
    torch_pickle.UnsafeCheckpointError: the file is refused (nothing in it ran).
    FileNotFoundError: no such checkpoint.
    ConfigError: `workdir` already holds a run and `overwrite` is not set.
  """
  imported = torch_pickle.import_fusion_encoder(checkpoint_path)
  if os.path.exists(os.path.join(workdir, "config.json")) and not overwrite:
    raise ConfigError(f"{workdir} already holds a run (config.json); choose another workdir")
  config = config_for(imported, config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")
  params = {"speech_encoder": imported.params}
  batch_stats = {"speech_encoder": imported.batch_stats}
  for stale in ("best", "checkpoints"):  # An overwritten run's weights must not linger.
    shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    checkpointer.save_best(IMPORTED_STEP, _ImportedState(params, batch_stats), {
        "step": IMPORTED_STEP,
        "imported_from": os.path.abspath(checkpoint_path),
        "authors_class": imported.class_name,
    })
  finally:
    checkpointer.close()
  with open(os.path.join(workdir, "imported.json"), "w") as f:
    json.dump({"checkpoint": os.path.abspath(checkpoint_path), "class": imported.class_name,
               "settings": imported.settings, "dims": imported.dims}, f, indent=2)
  return imported
