"""Reading Hugging Face BERT / XLM-R checkpoints into the Flax parameter tree of `bert.py`.

Every tensor is mapped by an explicit rule (name, transpose, expected shape). A checkpoint
that lacks an expected tensor or holds one that no rule consumes is refused with the list of
names, so a wrong architecture or a silently half-loaded model cannot slip through.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from clasp_jax.models.bert import BertConfig

# safetensors dtype tags -> numpy dtypes (bf16 via ml_dtypes, which numpy lacks).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}

# Buffers that older transformers versions saved next to the weights; they hold no learned
# values (arange / zeros) and the Flax model recomputes them.
BUFFER_NAMES = ("embeddings.position_ids", "embeddings.token_type_ids")

# Wrapper prefixes of task models (BertForMaskedLM, XLMRobertaForMaskedLM, ...).
_BASE_MODEL_PREFIXES = ("bert.", "roberta.", "model.")


class CheckpointError(ValueError):
  """A checkpoint that does not match the architecture it is loaded into."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of a .safetensors file as a host numpy array (bf16 included)."""
  with open(path, "rb") as stream:
    (header_size,) = struct.unpack("<Q", stream.read(8))
    header = json.loads(stream.read(header_size))
    data = stream.read()
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    array = np.frombuffer(data[begin:end], dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
    tensors[name] = array.reshape(entry["shape"])
  return tensors


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict without unpickling code (`weights_only=True`)."""
  import torch  # Optional dependency: only .bin checkpoints need it.

  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
  tensors = {}
  for name, tensor in state.items():
    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    tensors[name] = tensor.numpy()
  return tensors


def read_folder_tensors(folder: str | os.PathLike,
                        stem: str = "model") -> dict[str, np.ndarray]:
  """Reads `<stem>.safetensors` (preferred), `pytorch_model.bin`, or their sharded indexes.

  `stem` is "model" for Hugging Face models and sentence-transformers Dense folders alike.
  """
  folder = os.fspath(folder)
  candidates = [
      (f"{stem}.safetensors", read_safetensors),
      (f"{stem}.safetensors.index.json", read_safetensors),
      ("pytorch_model.bin", read_torch_bin),
      ("pytorch_model.bin.index.json", read_torch_bin),
  ]
  for filename, reader in candidates:
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
      continue
    if not filename.endswith(".index.json"):
      return reader(path)
    with open(path) as stream:
      shard_names = sorted(set(json.load(stream)["weight_map"].values()))
    tensors = {}
    for shard_name in shard_names:
      tensors.update(reader(os.path.join(folder, shard_name)))
    return tensors
  raise CheckpointError(f"{folder}: no weights found (looked for "
                        f"{', '.join(name for name, _ in candidates)})")


def _find_base_prefix(names: Iterable[str]) -> str:
  names = set(names)
  if "embeddings.word_embeddings.weight" in names:
    return ""
  for prefix in _BASE_MODEL_PREFIXES:
    if f"{prefix}embeddings.word_embeddings.weight" in names:
      return prefix
  raise CheckpointError("checkpoint has no embeddings.word_embeddings.weight (with or without a "
                        f"{'/'.join(_BASE_MODEL_PREFIXES)} prefix): not a BERT-family model")


TensorRule = tuple[str, tuple[str, ...], bool, tuple[int, ...]]


def expected_tensors(config: BertConfig) -> list[TensorRule]:
  """The mapping table: (HF name, Flax path, transpose?, Flax shape) for every parameter."""
  hidden, inner = config.hidden_size, config.intermediate_size
  rules = []

  def linear(hf_name: str, path: tuple[str, ...], in_size: int, out_size: int):
    # torch.nn.Linear stores (out, in); flax.linen.Dense wants (in, out).
    rules.append((f"{hf_name}.weight", path + ("kernel",), True, (in_size, out_size)))
    rules.append((f"{hf_name}.bias", path + ("bias",), False, (out_size,)))

  def layer_norm(hf_name: str, path: tuple[str, ...]):
    rules.append((f"{hf_name}.weight", path + ("scale",), False, (hidden,)))
    rules.append((f"{hf_name}.bias", path + ("bias",), False, (hidden,)))

  for table, rows in (("word_embeddings", config.vocab_size),
                      ("position_embeddings", config.max_position_embeddings),
                      ("token_type_embeddings", config.type_vocab_size)):
    rules.append((f"embeddings.{table}.weight", ("embeddings", table, "embedding"), False,
                  (rows, hidden)))
  layer_norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for index in range(config.num_layers):
    hf_layer, flax_layer = f"encoder.layer.{index}", ("encoder", f"layer_{index}")
    for projection in ("query", "key", "value"):
      linear(f"{hf_layer}.attention.self.{projection}", flax_layer + ("attention", projection),
             hidden, hidden)
    linear(f"{hf_layer}.attention.output.dense", flax_layer + ("attention", "output"), hidden,
           hidden)
    layer_norm(f"{hf_layer}.attention.output.LayerNorm", flax_layer + ("attention", "layer_norm"))
    linear(f"{hf_layer}.intermediate.dense", flax_layer + ("mlp", "intermediate"), hidden, inner)
    linear(f"{hf_layer}.output.dense", flax_layer + ("mlp", "output"), inner, hidden)
    layer_norm(f"{hf_layer}.output.LayerNorm", flax_layer + ("mlp", "layer_norm"))
  if config.with_pooler:
    linear("pooler.dense", ("pooler", "dense"), hidden, hidden)
  return rules


def _legacy_name(name: str) -> str:
  # TF-converted checkpoints call LayerNorm parameters gamma/beta.
  return re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", name))


def _listing(items: list[str], separator: str, limit: int = 10) -> str:
  # A wrong architecture can miss hundreds of tensors; the first few tell what went wrong.
  shown = separator.join(items[:limit])
  return shown if len(items) <= limit else f"{shown}{separator}... ({len(items)} in all)"


def has_pooler(tensors: Mapping[str, Any]) -> bool:
  prefix = _find_base_prefix(tensors)
  return f"{prefix}pooler.dense.weight" in tensors


def bert_params_from_hf(tensors: Mapping[str, np.ndarray], config: BertConfig, *,
                        ignore_unused: Iterable[str] = (),
                        source: str = "checkpoint") -> dict[str, Any]:
  """Maps a Hugging Face state dict onto the Flax parameter tree of `BertModel(config)`.

  Args:
    tensors: name -> array, e.g. from `read_folder_tensors`.
    config: the architecture; decides which tensors are expected and their shapes.
    ignore_unused: regexes (re.search) of checkpoint tensors that may stay unused, e.g.
      r"^lm_head\\." for a masked-LM checkpoint. Nothing is ignored by default.
    source: name used in error messages.

  Raises:
    CheckpointError: listing missing tensors, unused tensors or shape mismatches.
  """
  prefix = _find_base_prefix(tensors)
  ignore_patterns = [re.compile(pattern) for pattern in ignore_unused]
  params: dict[str, Any] = {}
  consumed, missing, mismatched = set(), [], []
  for hf_name, path, transpose, shape in expected_tensors(config):
    name = prefix + hf_name
    if name not in tensors and prefix + _legacy_name(hf_name) in tensors:
      name = prefix + _legacy_name(hf_name)
    if name not in tensors:
      missing.append(name)
      continue
    consumed.add(name)
    array = np.asarray(tensors[name])
    if transpose:
      array = array.T
    if array.shape != shape:
      mismatched.append(f"{name}: checkpoint {array.shape} vs expected {shape}")
      continue
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(array, dtype=np.float32)
  buffers = {prefix + name for name in BUFFER_NAMES}
  unused = sorted(name for name in tensors
                  if name not in consumed and name not in buffers
                  and not any(pattern.search(name) for pattern in ignore_patterns))
  problems = []
  if missing:
    problems.append(f"missing tensors: {_listing(missing, ', ')}")
  if mismatched:
    problems.append(f"shape mismatches: {_listing(mismatched, '; ')}")
  if unused:
    problems.append(f"unused tensors: {_listing(unused, ', ')}")
  if problems:
    raise CheckpointError(f"{source} does not match the {config.num_layers}-layer "
                          f"{'RoBERTa' if config.position_offset else 'BERT'} encoder: "
                          + " | ".join(problems))
  return params


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(os.fspath(folder), "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
  with open(path) as stream:
    return json.load(stream)
