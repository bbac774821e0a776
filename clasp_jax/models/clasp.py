"""The two-tower CLASP model in feature mode.

The speech tower is the trained fusion encoder over precomputed speech SSL and spectrogram
features. The text tower is a sentence encoder: by default frozen, with its embeddings
precomputed in the batch ('text'); with `text_encoder` set, it runs on token ids
('input_ids', 'attention_mask') so its top layers can be fine-tuned.
Like big_vision's two-tower models, `__call__` returns `(zspeech, ztext, out)` with
L2-normalised embeddings and slash-named diagnostics in `out`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clasp_jax.models.fusion import FusionEncoder


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


class ClaspModel(nn.Module):
  """Fusion speech tower + precomputed text embeddings + the loss's logit scale and bias.

  `logit_scale` holds log(scale) as in CLIP; it is a parameter only when `learn_scale`.
  `max_scale` caps exp(logit_scale) (CLIP caps at 100). `logit_bias` exists for the sigmoid loss.
  """

  fusion: str = "concat"
  mode: str = "joint"
  embed_dim: int = 768
  branch_hidden: tuple[int, ...] = (768, 576)
  branch_dropout: tuple[float, ...] = (0.15, 0.1)
  fusion_hidden: tuple[int, ...] = (1024, 800)
  learn_scale: bool = True
  scale_init: float = 1 / 0.07
  max_scale: float = 100.0
  use_bias: bool = False
  bias_init: float = 0.0
  axis_name: str | None = None
  precision: str = "highest"
  text_encoder: nn.Module | None = None  # A SentenceEncoder; its parameters: 'text_encoder/'.
  speech_branch_hidden: tuple[int, ...] = ()
  spectrogram_branch_hidden: tuple[int, ...] = ()
  normalize_inputs: bool = False

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False):
    speech_encoder = FusionEncoder(
        fusion=self.fusion, mode=self.mode, embed_dim=self.embed_dim,
        branch_hidden=self.branch_hidden, branch_dropout=self.branch_dropout,
        fusion_hidden=self.fusion_hidden, axis_name=self.axis_name, precision=self.precision,
        speech_branch_hidden=self.speech_branch_hidden,
        spectrogram_branch_hidden=self.spectrogram_branch_hidden,
        normalize_inputs=self.normalize_inputs, name="speech_encoder")
    speech_embedding = speech_encoder(batch.get("speech"), batch.get("spectrogram"), train=train)
    zspeech = l2_normalize(speech_embedding)
    if self.text_encoder is None:
      ztext = l2_normalize(batch["text"].astype(jnp.float32))
    else:
      ztext = l2_normalize(self.text_encoder(batch["input_ids"], batch["attention_mask"],
                                             deterministic=not train).astype(jnp.float32))

    if self.learn_scale:
      log_scale = self.param("logit_scale", nn.initializers.constant(math.log(self.scale_init)), ())
      scale = jnp.minimum(jnp.exp(log_scale), self.max_scale)
    else:
      scale = jnp.asarray(self.scale_init, jnp.float32)
    if self.use_bias:
      bias = self.param("logit_bias", nn.initializers.constant(self.bias_init), ())
    else:
      bias = jnp.zeros((), jnp.float32)

    out = {
        "scale": scale,
        "bias": bias,
        "speech/norm": jnp.mean(jnp.linalg.norm(speech_embedding, axis=-1)),
    }
    return zspeech, ztext, out


def model_from_config(model_config: ml_collections.ConfigDict, loss_config: ml_collections.ConfigDict,
                      *, axis_name: str | None = None,
                      text_encoder: nn.Module | None = None) -> ClaspModel:
  """Builds the model the config describes; the loss decides whether scale and bias are learnt."""
  return ClaspModel(
      fusion=model_config.fusion,
      mode=model_config.mode,
      embed_dim=model_config.embed_dim,
      branch_hidden=tuple(model_config.branch_hidden),
      branch_dropout=tuple(model_config.branch_dropout),
      fusion_hidden=tuple(model_config.fusion_hidden),
      # Workdirs written before the field existed computed at "highest" on CPU alike.
      precision=model_config.get("precision", "highest"),
      # Workdirs written before these fields existed had one width for both branches and
      # raw inputs.
      speech_branch_hidden=tuple(model_config.get("speech_branch_hidden", ())),
      spectrogram_branch_hidden=tuple(model_config.get("spectrogram_branch_hidden", ())),
      normalize_inputs=bool(model_config.get("normalize_inputs", False)),
      learn_scale=loss_config.learn_scale,
      scale_init=loss_config.scale_init,
      max_scale=loss_config.max_scale,
      use_bias=loss_config.kind == "sigmoid",
      bias_init=loss_config.bias_init,
      axis_name=axis_name,
      text_encoder=text_encoder,
  )


def example_batch(data_dims: Mapping[str, int], batch_size: int = 2) -> dict[str, Any]:
  """Zeros shaped like one feature batch, for initialisation and shape inference."""
  return {name: jnp.zeros((batch_size, dim), jnp.float32) for name, dim in data_dims.items()}
