"""Assembling CLASP from config: the model, the pretrained tower weights, and the text input.

`build(config)` reads `config.model` (and the loss, which decides whether the logit scale and
bias are learnt) and returns everything the trainer, inference and the tests need to put a
model together, loading each pretrained tower once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from clasp_jax.common.config_args import ConfigError
from clasp_jax.models import text_tower as text_tower_lib
from clasp_jax.models.clasp import ClaspModel, model_from_config

TextEncoder = Callable[[Sequence[str]], dict[str, np.ndarray]]


def text_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model.text`, or the top-level `config.text` of configs written before it moved."""
  if "text" in config.model:
    return config.model.text
  return config.get("text", ml_collections.ConfigDict({"encoder": ""}))


def tokenizer_for(tower: text_tower_lib.TextTower) -> TextEncoder:
  """Sentences -> fixed-length `input_ids` and `attention_mask` (one compiled shape)."""

  def encode(texts: Sequence[str]) -> dict[str, np.ndarray]:
    input_ids, attention_mask = tower.pad_batch(tower.tokenize(list(texts)),
                                                length=tower.max_length)
    return {"input_ids": np.asarray(input_ids, np.int32),
            "attention_mask": np.asarray(attention_mask, np.int32)}

  return encode


@dataclasses.dataclass
class BuiltModel:
  """A model from config with what goes with it.

  `pretrained`: top-level parameter name -> weights that `create_train_state` places into the
  state instead of a random initialisation. `text_encoder`: what the input pipeline runs on each
  batch's sentences (None when the text embeddings are precomputed in the data).
  """

  model: ClaspModel
  pretrained: dict[str, Any]
  text_encoder: TextEncoder | None
  text_tower: text_tower_lib.TextTower | None
  speech_description: str
  text_description: str
  embed_dim: int

  def check_batch(self, arrays: Mapping[str, np.ndarray], host: Mapping[str, np.ndarray]):
    """Clear errors for data that cannot feed this model (before anything is compiled)."""
    if self.text_tower is not None:
      if not all(str(text) for text in host["text"]):
        raise ConfigError("the text encoder needs the sentences of each split, but this data "
                          "has none (feature splits need sentences.json; synthetic_features "
                          "has none)")
    elif "text" not in arrays:
      raise ConfigError("the data holds no precomputed text embeddings ('text'): set "
                        "config.model.text.encoder to run a sentence encoder")
    else:
      width = arrays["text"].shape[-1]
      if width != self.embed_dim:
        raise ConfigError(f"config.model.embed_dim={self.embed_dim} must equal the text "
                          f"embedding width ({width})")


def build(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> BuiltModel:
  text = text_settings(config)
  tower = None
  if text.get("encoder", ""):
    tower = text_tower_lib.load(text.encoder, max_length=text.get("max_length", 0) or None)
  model = model_from_config(config.model, config.loss, axis_name=axis_name,
                            text_encoder=tower.model if tower is not None else None)
  embed_dim = tower.embedding_dim if tower is not None else config.model.embed_dim
  if tower is not None and tower.embedding_dim != config.model.embed_dim:
    raise ConfigError(f"config.model.embed_dim={config.model.embed_dim} must equal the text "
                      f"tower's embedding width ({tower.embedding_dim})")
  text_description = (f"{text.encoder} ({tower.embedding_dim}-d, top "
                      f"{text.get('trainable_top_layers', 0)} layers trainable)"
                      if tower is not None else "precomputed embeddings")
  return BuiltModel(
      model=model,
      pretrained={"text_encoder": tower.params} if tower is not None else {},
      text_encoder=tokenizer_for(tower) if tower is not None else None,
      text_tower=tower,
      speech_description=f"{config.model.fusion} fusion over precomputed features",
      text_description=text_description,
      embed_dim=embed_dim)
