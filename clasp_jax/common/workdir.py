"""A training workdir's saved config, read in today's layout whatever release wrote it.

`read_config` is how the trainer resumes and how evaluation, embedding and conversion rebuild
a model; `upgrade_config` is where fields that later releases added get their defaults.
"""

from __future__ import annotations

import copy
import json
import os

import ml_collections
from etils import epath

from clasp_jax.common.config_args import ConfigError

CONFIG_FILE = "config.json"
TEXT_DEFAULTS = {"kind": "precomputed", "encoder": "", "trainable_top_layers": 0,
                 "max_length": 64, "preparation": "as_is"}


class WorkdirError(ConfigError):
  """A folder that is not a readable training workdir; the message says what is missing."""


def upgrade_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` in today's layout; `config` itself is left as it is.

  - The text tower's settings moved from a top-level `text` block (encoder,
    trainable_top_layers, max_length) into `model.text`, which also names its `kind`:
    'encoder' when an encoder folder is set, else 'precomputed'.
  - `model.speech.kind` arrived with audio mode; configs without it were in feature mode.

  A config that holds both a top-level `text` block and `model.text` is refused: which one
  was meant cannot be known.
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    if "model" not in config:
      raise ConfigError("config has no `model` block: not a CLASP training config")
    model = config.model
    if "text" in config:
      if "text" in model:
        raise ConfigError("config has both a top-level `text` block (the old layout) and "
                          "`model.text`; keep only `model.text`")
      legacy = config.text
      text = dict(TEXT_DEFAULTS)
      text.update({key: legacy[key] for key in TEXT_DEFAULTS if key in legacy})
      text["kind"] = "encoder" if text["encoder"] else "precomputed"
      model.text = ml_collections.ConfigDict(text)
      del config["text"]
    elif "text" not in model:
      model.text = ml_collections.ConfigDict(TEXT_DEFAULTS)
    if "speech" not in model:
      model.speech = ml_collections.ConfigDict({"kind": "features"})
    elif "kind" not in model.speech:
      model.speech.kind = "features"
  return config


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config the trainer wrote into `workdir`, upgraded (unlocked: callers may retarget it)."""
  workdir = os.fspath(workdir)
  path = epath.Path(workdir) / CONFIG_FILE  # Local, or gs://... through its file system.
  if not path.is_file():
    raise WorkdirError(f"{workdir} is not a training workdir: {path} is missing")
  try:
    values = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise WorkdirError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(values, dict):
    raise WorkdirError(f"{path}: expected a JSON object, got {type(values).__name__}")
  return upgrade_config(ml_collections.ConfigDict(values))
