"""Flax BERT encoder and its RoBERTa / XLM-R variant.

The text tower of CLASP is a frozen multilingual sentence encoder (LaBSE, a BERT; XLM-R was the
paper's alternative). Both architectures are the same post-LN transformer; they differ only in
how position ids are made: BERT counts from 0, RoBERTa counts real tokens from
`pad_token_id + 1` and gives padding the padding index (a fairseq convention kept by every
RoBERTa checkpoint). One module with a `position_offset` covers both.

Parameter paths are regular so that the trainer can freeze or unfreeze them by regex:

  embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
  embeddings/layer_norm/{scale,bias}
  encoder/layer_<i>/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_<i>/attention/layer_norm/{scale,bias}
  encoder/layer_<i>/mlp/{intermediate,output}/{kernel,bias}
  encoder/layer_<i>/mlp/layer_norm/{scale,bias}
  pooler/dense/{kernel,bias}            (only when the checkpoint has a pooler)

`top_layers_regex` builds the pattern that selects the top k layers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clasp_jax.models import activations
from clasp_jax.models import attention
from clasp_jax.models import precision

# model_type in config.json -> does it count positions past the padding index?
SUPPORTED_MODEL_TYPES = {"bert": False, "roberta": True, "xlm-roberta": True}

@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT-family encoder (hashable, so it can be a static jit argument)."""

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int = 2
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  # 0 for BERT (positions 0, 1, ...); pad_token_id + 1 for RoBERTa / XLM-R.
  position_offset: int = 0
  with_pooler: bool = True
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  # Matmul precision: "highest" keeps float32 parity with PyTorch on GPU/TPU (whose default
  # rounds matmul inputs to bf16/tf32); "default" is faster for fine-tuning.
  precision: str = "highest"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                       f"{self.num_heads}")
    activations.hf_activation(self.hidden_act)  # Rejects names the tower does not implement.
    precision.validate(self.precision)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def max_tokens(self) -> int:
    """Longest input the position table can hold (RoBERTa loses the offset's rows)."""
    return self.max_position_embeddings - self.position_offset

  @property
  def matmul_precision(self) -> jax.lax.Precision:
    return precision.lax_precision(self.precision)

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any], **overrides) -> BertConfig:
    """Reads a Hugging Face `config.json` dict; rejects what this encoder does not implement."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: "
                       f"{sorted(SUPPORTED_MODEL_TYPES)}")
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"unsupported position_embedding_type {position_type!r} (only absolute)")
    if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
      raise ValueError("decoder / cross-attention BERT configs are not sentence encoders")
    pad_token_id = hf_config.get("pad_token_id")
    pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    fields = dict(
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=int(hf_config["hidden_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=int(hf_config["num_attention_heads"]),
        intermediate_size=int(hf_config["intermediate_size"]),
        max_position_embeddings=int(hf_config["max_position_embeddings"]),
        type_vocab_size=int(hf_config.get("type_vocab_size", 2)),
        hidden_act=str(hf_config.get("hidden_act", "gelu")),
        layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        pad_token_id=pad_token_id,
        position_offset=pad_token_id + 1 if SUPPORTED_MODEL_TYPES[model_type] else 0,
        hidden_dropout=float(hf_config.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(hf_config.get("attention_probs_dropout_prob", 0.1)),
    )
    fields.update(overrides)
    return cls(**fields)


def position_ids_for(input_ids: jax.Array, config: BertConfig) -> jax.Array:
  """(batch, length) int positions, BERT- or RoBERTa-style."""
  length = input_ids.shape[1]
  if config.position_offset == 0:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), input_ids.shape)
  # RoBERTa numbers real tokens from pad+1 and maps every pad token to the pad index; which
  # tokens count as real is read from the ids, not the attention mask, as in fairseq.
  is_token = (input_ids != config.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(is_token, axis=1) * is_token + config.pad_token_id


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *,
               deterministic: bool) -> jax.Array:
    config = self.config
    embed = lambda size, name: nn.Embed(size, config.hidden_size, dtype=config.dtype, name=name)
    hidden = embed(config.vocab_size, "word_embeddings")(input_ids)
    hidden += embed(config.max_position_embeddings, "position_embeddings")(
        position_ids_for(input_ids, config))
    hidden += embed(config.type_vocab_size, "token_type_embeddings")(token_type_ids)
    hidden = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, name="layer_norm")(
        hidden)
    return nn.Dropout(config.hidden_dropout)(hidden, deterministic=deterministic)


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=config.dtype, precision=config.matmul_precision, name=name)


def _output_block(config: BertConfig, projected: jax.Array, residual: jax.Array,
                  deterministic: bool) -> jax.Array:
  """Dropout, residual add, LayerNorm: the post-LN ending of both sub-layers (BertOutput).

  Called from a compact method, so the LayerNorm's parameters sit under that sub-layer.
  """
  projected = nn.Dropout(config.hidden_dropout)(projected, deterministic=deterministic)
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, name="layer_norm")(
      projected + residual)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a post-LN residual block (BertAttention)."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool) -> jax.Array:
    config = self.config
    query, key, value = attention.fused_dense(
        hidden, [attention.DenseParams(config.hidden_size, name=name)
                 for name in ("query", "key", "value")],
        dtype=config.dtype, precision=config.matmul_precision)
    context = attention.multi_head_attention(
        query, key, value, attention_mask, config.num_heads, precision=config.matmul_precision,
        dropout=lambda weights: nn.Dropout(config.attention_dropout)(
            weights, deterministic=deterministic))
    return _output_block(config, _dense(config, config.hidden_size, "output")(context), hidden,
                         deterministic)


class FeedForward(nn.Module):
  """Intermediate dense + activation + output dense, post-LN residual (BertIntermediate/Output)."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, *, deterministic: bool) -> jax.Array:
    config = self.config
    expanded = _dense(config, config.intermediate_size, "intermediate")(hidden)
    expanded = activations.hf_activation(config.hidden_act)(expanded)
    return _output_block(config, _dense(config, config.hidden_size, "output")(expanded), hidden,
                         deterministic)


class TransformerLayer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool) -> jax.Array:
    hidden = SelfAttention(self.config, name="attention")(
        hidden, attention_mask, deterministic=deterministic)
    return FeedForward(self.config, name="mlp")(hidden, deterministic=deterministic)


class Encoder(nn.Module):
  """The layer stack; unrolled (not scanned) so that each layer has its own `layer_<i>` path."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool) -> jax.Array:
    for index in range(self.config.num_layers):
      hidden = TransformerLayer(self.config, name=f"layer_{index}")(
          hidden, attention_mask, deterministic=deterministic)
    return hidden


class Pooler(nn.Module):
  """tanh(Dense(first token)): BERT's next-sentence head input, kept for checkpoint fidelity."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(nn.Module):
  """Returns (token embeddings (b, l, hidden), pooled (b, hidden) or None without a pooler)."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None, *, deterministic: bool = True):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    hidden = Embeddings(self.config, name="embeddings")(
        input_ids, token_type_ids, deterministic=deterministic)
    hidden = Encoder(self.config, name="encoder")(hidden, attention_mask,
                                                  deterministic=deterministic)
    pooled = Pooler(self.config, name="pooler")(hidden) if self.config.with_pooler else None
    return hidden, pooled


def top_layers_regex(num_layers: int, num_top: int, prefix: str = "encoder/") -> str:
  """Regex (for re.search on '/'-joined parameter paths) matching the top `num_top` layers.

  E.g. top_layers_regex(12, 2) == '(?:^|/)encoder/layer_(?:10|11)/'; the pattern matches
  whether or not the tree is nested under other scopes. Matches nothing when num_top is 0.
  """
  if not 0 <= num_top <= num_layers:
    raise ValueError(f"num_top must be in [0, {num_layers}], got {num_top}")
  if num_top == 0:
    return r"(?!)"
  indices = "|".join(str(index) for index in range(num_layers - num_top, num_layers))
  return f"(?:^|/){re.escape(prefix)}layer_(?:{indices})/"
