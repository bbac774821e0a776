"""Reading configs that workdirs wrote, whatever release of the config layout wrote them."""

from __future__ import annotations

import copy

import ml_collections

from clasp_jax.common.config_args import ConfigError

TEXT_DEFAULTS = {"kind": "precomputed", "encoder": "", "trainable_top_layers": 0,
                 "max_length": 64}


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
      text.update({key: legacy[key] for key in ("encoder", "trainable_top_layers", "max_length")
                   if key in legacy})
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
