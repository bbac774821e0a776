"""`load()` for HuBERT / wav2vec2 checkpoints saved by Hugging Face transformers.

A checkpoint folder holds `config.json` and weights as `model.safetensors` (or shards with
`model.safetensors.index.json`) or a PyTorch `pytorch_model.bin` (read with
`weights_only=True`, so no pickled code runs). Every tensor is mapped by an explicit rule in
`tensor_mapping`; loading fails, naming the tensors, when one that the model needs is missing,
when one in the file has no rule (unused), or when a shape disagrees. That turns a silently
half-random encoder into an error at load time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.models import wav2vec2

Array = np.ndarray
Converter = Callable[[Array], Array]


class CheckpointError(ValueError):
  """A checkpoint folder that cannot be loaded faithfully; the message says why."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What the checkpoint's `preprocessor_config.json` asks of the raw waveform."""

  sampling_rate: int = 16_000
  do_normalize: bool = True
  return_attention_mask: bool = False

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any]) -> "Preprocessing":
    return cls(sampling_rate=int(hf.get("sampling_rate", 16_000)),
               do_normalize=bool(hf.get("do_normalize", True)),
               return_attention_mask=bool(hf.get("return_attention_mask", False)))

  def apply(self, waveform: np.ndarray) -> np.ndarray:
    """Zero-mean unit-variance per clip when `do_normalize` (as Wav2Vec2FeatureExtractor does).

    Silent clips stay finite: the 1e-7 in the denominator keeps 0 / sqrt(0 + 1e-7) at 0.
    """
    waveform = np.asarray(waveform, np.float32)
    if not self.do_normalize:
      return waveform
    return ((waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)).astype(np.float32)


@dataclasses.dataclass
class SpeechCheckpoint:
  """A loaded speech tower: the Flax module, its parameters and how to feed it."""

  model: wav2vec2.Model
  params: dict
  config: wav2vec2.Config
  preprocessing: Preprocessing
  path: str


def _linear(weight: Array) -> Array:
  return weight.T  # PyTorch (out, in) -> Flax (in, out)


def _conv1d(weight: Array) -> Array:
  return np.transpose(weight, (2, 1, 0))  # PyTorch (out, in, kernel) -> Flax (kernel, in, out)


def _weight_norm_magnitude(weight_g: Array) -> Array:
  return weight_g.reshape(-1)  # (1, 1, kernel) -> (kernel,): one magnitude per tap (dim=2)


def _identity(tensor: Array) -> Array:
  return tensor


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One Flax parameter and the checkpoint tensor it comes from.

  `names` lists the accepted spellings of the checkpoint name; the weight-norm tensors were
  renamed when PyTorch moved weight_norm to parametrizations, and both spellings exist on
  the Hub.
  """

  flax_path: tuple[str, ...]
  names: tuple[str, ...]
  convert: Converter


def tensor_mapping(config: wav2vec2.Config, prefix: str) -> list[TensorRule]:
  """The complete list of rules for a model of `config`, checkpoint names under `prefix`."""
  rules: list[TensorRule] = []

  def add(flax_path: str, name: str | tuple[str, ...], convert: Converter = _identity):
    names = (name,) if isinstance(name, str) else name
    rules.append(TensorRule(tuple(flax_path.split("/")), tuple(prefix + n for n in names), convert))

  def linear(flax_path: str, name: str):
    add(f"{flax_path}/kernel", f"{name}.weight", _linear)
    add(f"{flax_path}/bias", f"{name}.bias")

  def layer_norm(flax_path: str, name: str):
    add(f"{flax_path}/scale", f"{name}.weight")
    add(f"{flax_path}/bias", f"{name}.bias")

  for index in range(len(config.conv_dim)):
    block = f"feature_extractor.conv_layers.{index}"
    flax_block = f"feature_extractor/conv_layers_{index}"
    add(f"{flax_block}_conv/kernel", f"{block}.conv.weight", _conv1d)
    if config.conv_bias:
      add(f"{flax_block}_conv/bias", f"{block}.conv.bias")
    if config.feat_extract_norm == "layer" or index == 0:
      layer_norm(f"{flax_block}_layer_norm", f"{block}.layer_norm")

  if config.feat_proj_layer_norm:
    layer_norm("feature_projection_layer_norm", "feature_projection.layer_norm")
  linear("feature_projection_projection", "feature_projection.projection")
  if config.has_masked_spec_embed:
    add("masked_spec_embed", "masked_spec_embed")

  pos_conv = "encoder.pos_conv_embed.conv"
  add("encoder/pos_conv_embed_conv/weight_g",
      (f"{pos_conv}.weight_g", f"{pos_conv}.parametrizations.weight.original0"),
      _weight_norm_magnitude)
  add("encoder/pos_conv_embed_conv/weight_v",
      (f"{pos_conv}.weight_v", f"{pos_conv}.parametrizations.weight.original1"), _conv1d)
  add("encoder/pos_conv_embed_conv/bias", f"{pos_conv}.bias")
  layer_norm("encoder/layer_norm", "encoder.layer_norm")

  for index in range(config.num_hidden_layers):
    layer, flax_layer = f"encoder.layers.{index}", f"encoder/layers_{index}"
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
      linear(f"{flax_layer}/attention/{projection}", f"{layer}.attention.{projection}")
    layer_norm(f"{flax_layer}/layer_norm", f"{layer}.layer_norm")
    linear(f"{flax_layer}/feed_forward/intermediate_dense",
           f"{layer}.feed_forward.intermediate_dense")
    linear(f"{flax_layer}/feed_forward/output_dense", f"{layer}.feed_forward.output_dense")
    layer_norm(f"{flax_layer}/final_layer_norm", f"{layer}.final_layer_norm")

  if config.ctc_vocab_size is not None:
    # The CTC head sits beside the `hubert.` / `wav2vec2.` base model, not under it.
    rules.append(TensorRule(("lm_head", "kernel"), ("lm_head.weight",), _linear))
    rules.append(TensorRule(("lm_head", "bias"), ("lm_head.bias",), _identity))
  return rules


def checkpoint_prefix(names: Iterable[str], model_type: str) -> str:
  """'hubert.' for `*ForCTC` / pretraining checkpoints, '' for a bare `HubertModel`."""
  prefix = f"{model_type}."
  return prefix if any(name.startswith(prefix) for name in names) else ""


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _shape_tree(config: wav2vec2.Config) -> dict:
  return jax.eval_shape(lambda: wav2vec2.init_params(config))


def _lookup(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _flat_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  paths = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      paths.extend(_flat_paths(value, prefix + (key,)))
    else:
      paths.append(prefix + (key,))
  return paths


def _summarise(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def convert_state_dict(state_dict: Mapping[str, Array], config: wav2vec2.Config,
                       source: str = "checkpoint") -> dict:
  """Maps a transformers state dict (numpy arrays) to the Flax parameter tree of `config`.

  Raises CheckpointError naming every missing tensor, unused tensor and shape mismatch.
  """
  prefix = checkpoint_prefix(state_dict, config.model_type)
  rules = tensor_mapping(config, prefix)
  expected_shapes = _shape_tree(config)
  rule_paths = {rule.flax_path for rule in rules}
  unmapped_params = ["/".join(path) for path in _flat_paths(expected_shapes)
                     if path not in rule_paths]
  if unmapped_params:  # A mapping bug, not a checkpoint problem: say so plainly.
    raise AssertionError(f"no checkpoint rule for Flax parameters: {_summarise(unmapped_params)}")

  params: dict = {}
  used, missing, mismatched = set(), [], []
  for rule in rules:
    found = [name for name in rule.names if name in state_dict]
    if not found:
      missing.append(" or ".join(rule.names))
      continue
    used.add(found[0])
    value = np.asarray(rule.convert(np.asarray(state_dict[found[0]], np.float32)))
    expected = _lookup(expected_shapes, rule.flax_path).shape
    if value.shape != tuple(expected):
      mismatched.append(f"{found[0]}: {tuple(np.shape(state_dict[found[0]]))} does not give "
                        f"{tuple(expected)} for {'/'.join(rule.flax_path)}")
      continue
    _set_path(params, rule.flax_path, jnp.asarray(value))
  unused = sorted(set(state_dict) - used)
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing tensor(s): {_summarise(missing)}")
  if unused:
    problems.append(f"{len(unused)} unused tensor(s): {_summarise(unused)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {_summarise(mismatched, 4)}")
  if problems:
    raise CheckpointError(f"{source} does not match a {config.model_type} model of its config "
                          f"({'with' if config.ctc_vocab_size else 'without'} CTC head): "
                          + "; ".join(problems))
  return params


def _read_safetensors(path: str) -> dict[str, Array]:
  # The flax reader keeps bfloat16 tensors intact (numpy has no bfloat16 of its own).
  from safetensors.flax import load_file  # pylint: disable=g-import-not-at-top
  return {name: np.asarray(value.astype(jnp.float32)) for name, value in load_file(path).items()}


def _read_torch_bin(path: str) -> dict[str, Array]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f"{path} is a PyTorch file; install the 'torch' extra to read it, "
                          "or convert it to model.safetensors") from None
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises several unrelated types for unsafe or bad files.
    raise CheckpointError(
        f"{path}: cannot read as a weights-only PyTorch state dict ({error})") from None
  return {name: tensor.detach().float().numpy() for name, tensor in state_dict.items()}


def read_state_dict(folder: str) -> dict[str, Array]:
  """Reads all weight tensors of a Hugging Face checkpoint folder as float32 numpy arrays."""
  readers = (
      ("model.safetensors", _read_safetensors),
      ("model.safetensors.index.json", _read_safetensors),
      ("pytorch_model.bin", _read_torch_bin),
      ("pytorch_model.bin.index.json", _read_torch_bin),
  )
  for file_name, reader in readers:
    path = os.path.join(folder, file_name)
    if not os.path.exists(path):
      continue
    if not file_name.endswith(".index.json"):
      return reader(path)
    with open(path) as index_file:
      shard_names = sorted(set(json.load(index_file)["weight_map"].values()))
    state_dict: dict[str, Array] = {}
    for shard_name in shard_names:
      state_dict.update(reader(os.path.join(folder, shard_name)))
    return state_dict
  raise CheckpointError(
      f"{folder}: no model.safetensors or pytorch_model.bin (or their index) found")


def read_json(folder: str, file_name: str) -> dict | None:
  path = os.path.join(folder, file_name)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as json_file:
      return json.load(json_file)
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def load(folder: str | os.PathLike, *, with_ctc_head: bool | None = None, dtype: Any = jnp.float32,
         remat: bool = False, group_norm_valid_frames_only: bool = True,
         precision: str = "highest") -> SpeechCheckpoint:
  """Loads a HuBERT / wav2vec2 checkpoint folder into a Flax model and parameters.

  Args:
    folder: a Hugging Face checkpoint folder (config.json + weights).
    with_ctc_head: None keeps the CTC head exactly when the checkpoint has one. False on a
      CTC checkpoint is refused (its lm_head tensors would go unused); True on a bare
      encoder is refused (the head would be missing).
    dtype, remat, group_norm_valid_frames_only, precision: see `wav2vec2.Model`.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: not a checkpoint folder")
  hf_config = read_json(folder, "config.json")
  if hf_config is None:
    raise CheckpointError(f"{folder}: config.json not found")
  state_dict = read_state_dict(folder)
  if with_ctc_head is None:
    with_ctc_head = "lm_head.weight" in state_dict
  try:
    config = wav2vec2.Config.from_hf_dict(hf_config, with_ctc_head=with_ctc_head)
  except ValueError as error:
    raise CheckpointError(f"{folder}/config.json: {error}") from None
  # SpecAugment's embedding is saved whenever training used it, even where an inference
  # config later set mask_time_prob to 0: the file, not the flag, says whether it exists.
  config = dataclasses.replace(config, has_masked_spec_embed=any(
      name.endswith("masked_spec_embed") for name in state_dict))
  params = convert_state_dict(state_dict, config, source=folder)
  preprocessing = Preprocessing.from_hf_dict(read_json(folder, "preprocessor_config.json") or {})
  model = wav2vec2.Model(config, dtype=dtype, remat=remat,
                         group_norm_valid_frames_only=group_norm_valid_frames_only,
                         precision=precision)
  return SpeechCheckpoint(model=model, params=params, config=config, preprocessing=preprocessing,
                          path=folder)
