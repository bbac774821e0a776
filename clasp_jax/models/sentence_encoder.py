"""sentence-transformers heads (Pooling, Dense, Normalize) read from a model folder.

A sentence-transformers folder lists its modules in `modules.json`: the transformer first,
then the steps that turn token embeddings into one vector. LaBSE is CLS -> Dense(tanh) ->
Normalize; all-MiniLM-L6-v2 is mean -> Normalize. The steps are kept in file order and
implemented as sentence-transformers defines them, so the Flax tower reproduces its vectors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.models import activations
from clasp_jax.models import bert
from clasp_jax.models.bert_checkpoint import CheckpointError, read_folder_tensors

# Concatenation order of the legacy boolean pooling keys (sentence-transformers keeps it).
_LEGACY_POOLING_KEYS = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_max_tokens", "max"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
    ("pooling_mode_weightedmean_tokens", "weightedmean"),
    ("pooling_mode_lasttoken", "lasttoken"),
)
POOLING_MODES = tuple(mode for _, mode in _LEGACY_POOLING_KEYS)

# torch.nn activation class names (as Dense configs store them) -> JAX functions. Each is
# built with torch's default arguments, as sentence-transformers instantiates them.
DENSE_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "Identity": lambda x: x,
    "Tanh": jnp.tanh,
    "ReLU": nn.relu,
    "GELU": activations.gelu_exact,
    "Sigmoid": nn.sigmoid,
    "SiLU": nn.silu,
    "LeakyReLU": lambda x: nn.leaky_relu(x, negative_slope=0.01),
}

# sentence-transformers names its modules by class; older and newer releases differ only in the
# package path (sentence_transformers.models.Pooling vs ...sentence_transformer.modules.pooling).
_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")
_TRANSFORMER_CONFIG_FILES = ("sentence_bert_config.json", "sentence_roberta_config.json",
                             "sentence_xlm-roberta_config.json")


@dataclasses.dataclass(frozen=True)
class PoolingSpec:
  modes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  name: str  # parameter scope, "dense_<module index>"
  in_features: int
  out_features: int
  bias: bool
  activation: str
  use_residual: bool = False


@dataclasses.dataclass(frozen=True)
class NormalizeSpec:
  pass


HeadStep = Union[PoolingSpec, DenseSpec, NormalizeSpec]


@dataclasses.dataclass(frozen=True)
class SentenceTransformerFolder:
  """What a sentence-transformers folder says about its tower."""

  transformer_dir: str
  max_seq_length: int | None
  do_lower_case: bool
  head: tuple[HeadStep, ...]
  head_params: dict[str, Any]


def pool_tokens(tokens: jax.Array, attention_mask: jax.Array,
                modes: tuple[str, ...]) -> jax.Array:
  """(b, l, d) token embeddings -> (b, len(modes) * d), modes concatenated in order.

  Inputs are right-padded, so the first token is CLS and the last real one sits at
  sum(mask) - 1.
  """
  mask = attention_mask.astype(tokens.dtype)[..., None]  # (b, l, 1)
  token_count = mask.sum(axis=1)  # (b, 1)
  pooled = []
  for mode in modes:
    if mode == "cls":
      pooled.append(tokens[:, 0])
    elif mode == "max":
      pooled.append(jnp.where(mask > 0, tokens, -jnp.inf).max(axis=1))
    elif mode == "mean":
      pooled.append((tokens * mask).sum(axis=1) / jnp.maximum(token_count, 1e-9))
    elif mode == "mean_sqrt_len_tokens":
      pooled.append((tokens * mask).sum(axis=1) / jnp.sqrt(jnp.maximum(token_count, 1e-9)))
    elif mode == "weightedmean":
      position_weights = jnp.arange(1, tokens.shape[1] + 1, dtype=tokens.dtype)[None, :, None]
      weighted_mask = mask * position_weights  # (b, l, 1)
      pooled.append((tokens * weighted_mask).sum(axis=1)
                    / jnp.maximum(weighted_mask.sum(axis=1), 1e-9))
    elif mode == "lasttoken":
      last_index = jnp.maximum(attention_mask.sum(axis=1).astype(jnp.int32) - 1, 0)  # (b,)
      pooled.append(jnp.take_along_axis(tokens * mask, last_index[:, None, None], axis=1)[:, 0])
    else:
      raise ValueError(f"unknown pooling mode {mode!r}; supported: {POOLING_MODES}")
  return jnp.concatenate(pooled, axis=-1)


def l2_normalize(vectors: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps), so a zero vector stays zero."""
  norms = jnp.sqrt(jnp.sum(vectors * vectors, axis=-1, keepdims=True))
  return vectors / jnp.maximum(norms, eps)


class DenseHead(nn.Module):
  """sentence-transformers Dense: activation(linear(x)) [+ x or residual(x)]."""

  spec: DenseSpec
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, vectors: jax.Array) -> jax.Array:
    spec = self.spec
    projected = nn.Dense(spec.out_features, use_bias=spec.bias, precision=self.precision,
                         name="linear")(vectors)
    projected = DENSE_ACTIVATIONS[spec.activation](projected)
    if spec.use_residual:
      if spec.in_features == spec.out_features:
        projected = projected + vectors
      else:
        projected = projected + nn.Dense(spec.out_features, use_bias=False,
                                         precision=self.precision, name="residual")(vectors)
    return projected


class SentenceEncoder(nn.Module):
  """BERT-family transformer + sentence-transformers head: token ids -> sentence vectors.

  Parameters live under `transformer/...` (see bert.py) and `dense_<i>/...` for Dense heads.
  """

  transformer: bert.BertConfig
  head: tuple[HeadStep, ...]

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, *,
               deterministic: bool = True) -> jax.Array:
    tokens, _ = bert.BertModel(self.transformer, name="transformer")(
        input_ids, attention_mask, deterministic=deterministic)
    vectors = tokens
    for step in self.head:
      if isinstance(step, PoolingSpec):
        vectors = pool_tokens(tokens.astype(jnp.float32), attention_mask, step.modes)
      elif isinstance(step, DenseSpec):
        vectors = DenseHead(step, self.transformer.matmul_precision, name=step.name)(vectors)
      else:
        vectors = l2_normalize(vectors)
    return vectors

  @property
  def embedding_dim(self) -> int:
    dim = self.transformer.hidden_size
    for step in self.head:
      if isinstance(step, PoolingSpec):
        dim = len(step.modes) * self.transformer.hidden_size
      elif isinstance(step, DenseSpec):
        dim = step.out_features
    return dim


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as stream:
    return json.load(stream)


def pooling_modes_from_config(config: Mapping[str, Any]) -> tuple[str, ...]:
  """Both config styles: `pooling_mode` (str or list) or the legacy `pooling_mode_*` flags."""
  if "pooling_mode" in config:
    modes = config["pooling_mode"]
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
  else:
    modes = tuple(mode for key, mode in _LEGACY_POOLING_KEYS if config.get(key, False))
    modes = modes or ("mean",)  # sentence-transformers' default when no flag is set
  unknown = [mode for mode in modes if mode not in POOLING_MODES]
  if unknown:
    raise ValueError(f"unsupported pooling mode(s) {unknown}; supported: {POOLING_MODES}")
  return modes


def _dense_spec(config: Mapping[str, Any], name: str, module_dir: str) -> DenseSpec:
  activation = str(config.get("activation_function", "torch.nn.modules.activation.Tanh"))
  activation_name = activation.rsplit(".", 1)[-1]
  if not activation.startswith("torch.") or activation_name not in DENSE_ACTIVATIONS:
    raise ValueError(f"{module_dir}: unsupported Dense activation {activation!r}; supported: "
                     f"torch.nn {sorted(DENSE_ACTIVATIONS)}")
  for key in ("module_input_name", "module_output_name"):
    if config.get(key, "sentence_embedding") not in ("sentence_embedding", None):
      raise ValueError(f"{module_dir}: Dense on {config[key]!r} is not supported "
                       "(only sentence_embedding)")
  return DenseSpec(name=name, in_features=int(config["in_features"]),
                   out_features=int(config["out_features"]), bias=bool(config.get("bias", True)),
                   activation=activation_name, use_residual=bool(config.get("use_residual", False)))


def dense_params_from_folder(spec: DenseSpec, module_dir: str) -> dict[str, Any]:
  """Maps the Dense module's `linear.*` / `residual.*` tensors; refuses missing or extra ones."""
  tensors = read_folder_tensors(module_dir)
  rules = [("linear.weight", ("linear", "kernel"), (spec.in_features, spec.out_features))]
  if spec.bias:
    rules.append(("linear.bias", ("linear", "bias"), (spec.out_features,)))
  if spec.use_residual and spec.in_features != spec.out_features:
    rules.append(("residual.weight", ("residual", "kernel"), (spec.in_features, spec.out_features)))
  params: dict[str, Any] = {}
  missing = [name for name, _, _ in rules if name not in tensors]
  unused = sorted(set(tensors) - {name for name, _, _ in rules})
  if missing or unused:
    raise CheckpointError(f"{module_dir}: Dense weights do not match its config "
                          f"(missing: {missing or 'none'}; unused: {unused or 'none'})")
  for name, (scope, leaf), shape in rules:
    array = np.asarray(tensors[name])
    array = array.T if leaf == "kernel" else array  # torch Linear stores (out, in)
    if array.shape != shape:
      raise CheckpointError(f"{module_dir}: {name} has shape {array.shape}, expected {shape}")
    params.setdefault(scope, {})[leaf] = np.ascontiguousarray(array, dtype=np.float32)
  return params


def read_sentence_transformers_folder(folder: str | os.PathLike) -> SentenceTransformerFolder:
  """Parses modules.json and each head module's config and weights.

  A plain Hugging Face folder (no modules.json) gets mean pooling, as sentence-transformers
  gives it, with a warning: a sentence encoder trained with another head would be wrong.
  """
  folder = os.fspath(folder)
  modules_path = os.path.join(folder, "modules.json")
  if not os.path.isfile(modules_path):
    logging.warning("%s has no modules.json: using mean pooling over the transformer output, "
                    "as sentence-transformers does for a plain Hugging Face model", folder)
    settings = _transformer_settings(folder)
    return SentenceTransformerFolder(folder, settings.get("max_seq_length"),
                                     bool(settings.get("do_lower_case", False)),
                                     (PoolingSpec(("mean",)),), {})
  with open(modules_path) as stream:
    modules = json.load(stream)
  transformer_dir, settings = None, {}
  head: list[HeadStep] = []
  head_params: dict[str, Any] = {}
  for position, module in enumerate(modules):
    kind = str(module.get("type", "")).rsplit(".", 1)[-1]
    module_dir = os.path.join(folder, module.get("path", ""))
    if kind not in _MODULE_KINDS:
      raise ValueError(f"{modules_path}: unsupported module type {module.get('type')!r}; "
                       f"supported: {', '.join(_MODULE_KINDS)}")
    if (kind == "Transformer") != (position == 0):
      raise ValueError(f"{modules_path}: the Transformer must be the first and only input module")
    if kind == "Transformer":
      transformer_dir = module_dir
      settings = _transformer_settings(module_dir)
    elif kind == "Pooling":
      head.append(PoolingSpec(pooling_modes_from_config(
          _read_json(os.path.join(module_dir, "config.json")))))
    elif kind == "Dense":
      spec = _dense_spec(_read_json(os.path.join(module_dir, "config.json")),
                         f"dense_{module.get('idx', position)}", module_dir)
      head.append(spec)
      head_params[spec.name] = dense_params_from_folder(spec, module_dir)
    else:
      config_path = os.path.join(module_dir, "config.json")
      config = _read_json(config_path) if os.path.isfile(config_path) else {}
      if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
        raise ValueError(f"{module_dir}: Normalize of {config['module_input_name']!r} is not "
                         "supported (only sentence_embedding)")
      head.append(NormalizeSpec())
  if transformer_dir is None:
    raise ValueError(f"{modules_path}: no Transformer module")
  if not any(isinstance(step, PoolingSpec) for step in head):
    raise ValueError(f"{modules_path}: no Pooling module, so there is no sentence embedding")
  return SentenceTransformerFolder(transformer_dir, settings.get("max_seq_length"),
                                   bool(settings.get("do_lower_case", False)), tuple(head),
                                   head_params)


def _transformer_settings(module_dir: str) -> dict[str, Any]:
  """The Transformer module's sentence_*_config.json (max_seq_length, do_lower_case, task)."""
  settings = {}
  for filename in _TRANSFORMER_CONFIG_FILES:
    path = os.path.join(module_dir, filename)
    if os.path.isfile(path):
      settings = _read_json(path)
      break
  task = settings.get("transformer_task", "feature-extraction")
  if task != "feature-extraction":
    raise ValueError(f"{module_dir}: transformer_task {task!r} is not a sentence encoder "
                     "(only feature-extraction)")
  return settings
