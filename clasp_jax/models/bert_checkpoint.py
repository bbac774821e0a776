"""The tensor table of Hugging Face BERT / XLM-R checkpoints for the Flax encoder of `bert.py`.

Reading and the strict mapping are `hf_checkpoint`'s; this module only says which checkpoint
tensor becomes which Flax parameter, in which layout and shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from clasp_jax.models import hf_checkpoint
from clasp_jax.models.bert import BertConfig
from clasp_jax.models.hf_checkpoint import CheckpointError  # noqa: F401  (re-exported)

# Buffers that older transformers versions saved next to the weights; they hold no learned
# values (arange / zeros) and the Flax model recomputes them.
BUFFER_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")

# Wrapper prefixes of task models (BertForMaskedLM, XLMRobertaForMaskedLM, ...).
_BASE_MODEL_PREFIXES = ("bert.", "roberta.", "model.")


def base_prefix(names: Iterable[str]) -> str:
  """'' for a bare encoder, or the task model's prefix ('bert.', 'roberta.', 'model.')."""
  names = set(names)
  for prefix in ("",) + _BASE_MODEL_PREFIXES:
    if f"{prefix}embeddings.word_embeddings.weight" in names:
      return prefix
  raise CheckpointError("checkpoint has no embeddings.word_embeddings.weight (with or without a "
                        f"{'/'.join(_BASE_MODEL_PREFIXES)} prefix): not a BERT-family model")


def has_pooler(tensors: Mapping[str, Any]) -> bool:
  return f"{base_prefix(tensors)}pooler.dense.weight" in tensors


def expected_tensors(config: BertConfig, prefix: str = "") -> list[hf_checkpoint.TensorRule]:
  """The rule table: every parameter of `BertModel(config)`, checkpoint names under `prefix`."""
  hidden, inner = config.hidden_size, config.intermediate_size
  table = hf_checkpoint.RuleTable(prefix)
  for name, rows in (("word_embeddings", config.vocab_size),
                     ("position_embeddings", config.max_position_embeddings),
                     ("token_type_embeddings", config.type_vocab_size)):
    table.add(f"embeddings/{name}/embedding", f"embeddings.{name}.weight", (rows, hidden))
  # TF-converted checkpoints call LayerNorm parameters gamma/beta.
  table.layer_norm("embeddings/layer_norm", "embeddings.LayerNorm", hidden, legacy_names=True)
  for index in range(config.num_layers):
    name, path = f"encoder.layer.{index}", f"encoder/layer_{index}"
    for projection in ("query", "key", "value"):
      table.linear(f"{path}/attention/{projection}", f"{name}.attention.self.{projection}",
                   hidden, hidden)
    table.linear(f"{path}/attention/output", f"{name}.attention.output.dense", hidden, hidden)
    table.layer_norm(f"{path}/attention/layer_norm", f"{name}.attention.output.LayerNorm", hidden,
                     legacy_names=True)
    table.linear(f"{path}/mlp/intermediate", f"{name}.intermediate.dense", hidden, inner)
    table.linear(f"{path}/mlp/output", f"{name}.output.dense", inner, hidden)
    table.layer_norm(f"{path}/mlp/layer_norm", f"{name}.output.LayerNorm", hidden,
                     legacy_names=True)
  if config.with_pooler:
    table.linear("pooler/dense", "pooler.dense", hidden, hidden)
  return table.rules


def bert_params_from_hf(tensors: Mapping[str, np.ndarray], config: BertConfig, *,
                        ignore_unused: Iterable[str] = (),
                        source: str = "checkpoint") -> dict[str, Any]:
  """Maps a Hugging Face state dict onto the Flax parameter tree of `BertModel(config)`.

  Args:
    tensors: name -> array, e.g. from `hf_checkpoint.read_weights`.
    config: the architecture; decides which tensors are expected and their shapes.
    ignore_unused: regexes (re.search) of checkpoint tensors that may stay unused, e.g.
      r"^lm_head\\." for a masked-LM checkpoint. Only the saved buffers are ignored by default.
    source: name used in error messages.

  Raises:
    CheckpointError: listing missing tensors, unused tensors or shape mismatches.
  """
  prefix = base_prefix(tensors)
  buffers = [f"^{re.escape(prefix + name)}$" for name in BUFFER_NAMES]
  family = "RoBERTa" if config.position_offset else "BERT"
  return hf_checkpoint.params_from_tensors(
      tensors, expected_tensors(config, prefix), source=source,
      model=f"the {config.num_layers}-layer {family} encoder",
      ignore_unused=[*buffers, *ignore_unused])
