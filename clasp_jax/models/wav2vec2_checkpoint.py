"""`load()` for HuBERT / wav2vec2 checkpoints saved by Hugging Face transformers.

A checkpoint folder holds `config.json` and weights as `model.safetensors` (or shards with
`model.safetensors.index.json`) or a PyTorch `pytorch_model.bin` (read with
`weights_only=True`, so no pickled code runs), all read by `hf_checkpoint`. Every tensor is
mapped by an explicit rule in `tensor_mapping`; loading fails, naming the tensors, when one
that the model needs is missing, when one in the file has no rule (unused), or when a shape
disagrees. That turns a silently half-random encoder into an error at load time.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.models import hf_checkpoint
from clasp_jax.models import wav2vec2
from clasp_jax.models.hf_checkpoint import CheckpointError  # noqa: F401  (re-exported)

Array = np.ndarray


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


def _weight_norm_magnitude(weight_g: Array) -> Array:
  return weight_g.reshape(-1)  # (1, 1, kernel) -> (kernel,): one magnitude per tap (dim=2)


def tensor_mapping(config: wav2vec2.Config, prefix: str) -> list[hf_checkpoint.TensorRule]:
  """The complete rule table for a model of `config`, checkpoint names under `prefix`.

  Shapes are left to `convert_state_dict`, which takes them from the Flax model itself.
  """
  table = hf_checkpoint.RuleTable(prefix)
  for index in range(len(config.conv_dim)):
    name = f"feature_extractor.conv_layers.{index}"
    path = f"feature_extractor/conv_layers_{index}"
    table.add(f"{path}_conv/kernel", f"{name}.conv.weight", convert=hf_checkpoint.conv1d_kernel)
    if config.conv_bias:
      table.add(f"{path}_conv/bias", f"{name}.conv.bias")
    if config.feat_extract_norm == "layer" or index == 0:
      table.layer_norm(f"{path}_layer_norm", f"{name}.layer_norm")

  if config.feat_proj_layer_norm:
    table.layer_norm("feature_projection_layer_norm", "feature_projection.layer_norm")
  table.linear("feature_projection_projection", "feature_projection.projection")
  if config.has_masked_spec_embed:
    table.add("masked_spec_embed", "masked_spec_embed")

  # The weight-norm tensors were renamed when PyTorch moved weight_norm to parametrizations;
  # both spellings exist on the Hub.
  pos_conv = "encoder.pos_conv_embed.conv"
  table.add("encoder/pos_conv_embed_conv/weight_g",
            (f"{pos_conv}.weight_g", f"{pos_conv}.parametrizations.weight.original0"),
            convert=_weight_norm_magnitude)
  table.add("encoder/pos_conv_embed_conv/weight_v",
            (f"{pos_conv}.weight_v", f"{pos_conv}.parametrizations.weight.original1"),
            convert=hf_checkpoint.conv1d_kernel)
  table.add("encoder/pos_conv_embed_conv/bias", f"{pos_conv}.bias")
  table.layer_norm("encoder/layer_norm", "encoder.layer_norm")

  for index in range(config.num_hidden_layers):
    name, path = f"encoder.layers.{index}", f"encoder/layers_{index}"
    for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
      table.linear(f"{path}/attention/{projection}", f"{name}.attention.{projection}")
    table.layer_norm(f"{path}/layer_norm", f"{name}.layer_norm")
    table.linear(f"{path}/feed_forward/intermediate_dense",
                 f"{name}.feed_forward.intermediate_dense")
    table.linear(f"{path}/feed_forward/output_dense", f"{name}.feed_forward.output_dense")
    table.layer_norm(f"{path}/final_layer_norm", f"{name}.final_layer_norm")

  if config.ctc_vocab_size is not None:
    # The CTC head sits beside the `hubert.` / `wav2vec2.` base model, not under it.
    table.add("lm_head/kernel", "lm_head.weight", convert=hf_checkpoint.linear_kernel,
              prefixed=False)
    table.add("lm_head/bias", "lm_head.bias", prefixed=False)
  return table.rules


def checkpoint_prefix(names: Iterable[str], model_type: str) -> str:
  """'hubert.' for `*ForCTC` / pretraining checkpoints, '' for a bare `HubertModel`."""
  prefix = f"{model_type}."
  return prefix if any(name.startswith(prefix) for name in names) else ""


def convert_state_dict(state_dict: Mapping[str, Array], config: wav2vec2.Config,
                       source: str = "checkpoint") -> dict:
  """Maps a transformers state dict (numpy arrays) to the Flax parameter tree of `config`.

  Raises CheckpointError naming every missing tensor, unused tensor and shape mismatch.
  """
  rules = tensor_mapping(config, checkpoint_prefix(state_dict, config.model_type))
  shapes = jax.eval_shape(lambda: wav2vec2.init_params(config))
  params = hf_checkpoint.params_from_tensors(
      state_dict, hf_checkpoint.with_shapes(rules, shapes), source=source,
      model=f"a {config.model_type} model of its config "
            f"({'with' if config.ctc_vocab_size else 'without'} CTC head)")
  return jax.device_put(params)


def _read_hf_config(folder: str) -> dict:
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: not a checkpoint folder")
  return hf_checkpoint.read_config(folder)


def _config_for(folder: str, hf_config: dict, tensor_names: Iterable[str],
                with_ctc_head: bool | None) -> wav2vec2.Config:
  """The architecture of a checkpoint: its config.json, corrected by the tensors it holds."""
  tensor_names = set(tensor_names)
  if with_ctc_head is None:
    with_ctc_head = "lm_head.weight" in tensor_names
  try:
    config = wav2vec2.Config.from_hf_dict(hf_config, with_ctc_head=with_ctc_head)
  except ValueError as error:
    raise CheckpointError(f"{folder}/config.json: {error}") from None
  # SpecAugment's embedding is saved whenever training used it, even where an inference
  # config later set mask_time_prob to 0: the file, not the flag, says whether it exists.
  return dataclasses.replace(config, has_masked_spec_embed=any(
      name.endswith("masked_spec_embed") for name in tensor_names))


def read_config(folder: str | os.PathLike, *, with_ctc_head: bool | None = None
                ) -> tuple[wav2vec2.Config, Preprocessing]:
  """The architecture and preprocessing `load(folder)` would give, without reading the weights.

  Reads config.json, preprocessor_config.json and the weight file's tensor names only.
  """
  folder = os.fspath(folder)
  hf_config = _read_hf_config(folder)
  names = hf_checkpoint.tensor_names(folder)
  config = _config_for(folder, hf_config, names, with_ctc_head)
  preprocessing = Preprocessing.from_hf_dict(
      hf_checkpoint.read_config(folder, "preprocessor_config.json", required=False) or {})
  return config, preprocessing


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
  hf_config = _read_hf_config(folder)
  state_dict = hf_checkpoint.read_weights(folder)
  config = _config_for(folder, hf_config, state_dict, with_ctc_head)
  params = convert_state_dict(state_dict, config, source=folder)
  preprocessing = Preprocessing.from_hf_dict(
      hf_checkpoint.read_config(folder, "preprocessor_config.json", required=False) or {})
  model = wav2vec2.Model(config, dtype=dtype, remat=remat,
                         group_norm_valid_frames_only=group_norm_valid_frames_only,
                         precision=precision)
  return SpeechCheckpoint(model=model, params=params, config=config, preprocessing=preprocessing,
                          path=folder)
