"""A training workdir's saved config: how the trainer resumes and how evaluation rebuilds it."""

from __future__ import annotations

import json
import os

import ml_collections

from clasp_jax.common.config_args import ConfigError

CONFIG_FILE = "config.json"


class WorkdirError(ConfigError):
  """A folder that is not a readable training workdir; the message says what is missing."""


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config the trainer wrote into `workdir` (unlocked: callers may retarget it)."""
  workdir = os.fspath(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise WorkdirError(f"{workdir} is not a training workdir: {path} is missing")
  try:
    with open(path, encoding="utf-8") as stream:
      values = json.load(stream)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise WorkdirError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(values, dict):
    raise WorkdirError(f"{path}: expected a JSON object, got {type(values).__name__}")
  return ml_collections.ConfigDict(values)
