"""A trained workdir to and from a PyTorch hand-off folder (`python -m clasp_jax.convert`).

The folder (`export_workdir`) holds every trained part under the names its PyTorch home uses:

  clasp.json                     settings that rebuild the model (and the whole training config)
  fusion.safetensors, fusion.pt  the fusion encoder under the authors' names (`audio_seq.N.*`,
                                 `mix_seq.N.*`; gated `text_seq.*`, `input_gate_text.0.*`, ...)
  ssl_encoder/                   audio mode: a Hugging Face HubertModel / Wav2Vec2Model folder
  spectrogram_encoder.safetensors  audio mode: the CNN, our Flax layer names in PyTorch layout
  text_encoder/                  a text tower: a sentence-transformers folder
  README.md                      the lines that load and run it (`clasp_jax.torch.load`)

`import_folder` reads such a folder back into a workdir (config.json and the weights as its
`best` checkpoint) that every command reads; JAX -> PyTorch -> JAX gives identical parameters.
Every direction is strict: each tensor is mapped by an explicit rule, and a tensor with no
rule, or a parameter with no tensor, is an error. Writing and reading need no PyTorch, except
`fusion.pt` (written only when torch is installed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clasp_jax.models import hf_checkpoint
from clasp_jax.models import torch_pickle

FORMAT_VERSION = 1
FUSION_FILE = "fusion.safetensors"
FUSION_PT_FILE = "fusion.pt"
SPECTROGRAM_FILE = "spectrogram_encoder.safetensors"
SSL_DIR = "ssl_encoder"
TEXT_DIR = "text_encoder"
SETTINGS_FILE = "clasp.json"
IMPORTED_STEP = 0


class ConversionError(ValueError):
  """A folder or workdir that cannot be converted faithfully; the message says why."""


# ------------------------------------------------------------------ Flax <-> PyTorch layouts.


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


@dataclasses.dataclass(frozen=True)
class _LayoutRule:
  torch_name: str
  collection: str
  path: tuple[str, ...]
  to_torch: Callable[[np.ndarray], np.ndarray]
  to_flax: Callable[[np.ndarray], np.ndarray]


_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def cnn_layout_rules(shapes: dict[str, Any]) -> list[_LayoutRule]:
  """Rules for a Flax CNN's variables ({'params', 'batch_stats'} shape tree) under PyTorch's
  module names and layouts: Conv (H, W, in, out) <-> (out, in, H, W), Dense (in, out) <->
  (out, in), norm scale/mean/var <-> weight/running_mean/running_var, module path '.'-joined."""
  rules = []
  for collection in ("params", "batch_stats"):
    for path, leaf in _flatten(shapes.get(collection, {})).items():
      name = _LEAF_NAMES.get((collection, path[-1]))
      if name is None:
        raise AssertionError(f"no PyTorch name for {collection}/{'/'.join(path)}")
      rank = len(leaf.shape)
      if path[-1] == "kernel" and rank == 4:
        to_torch, to_flax = (lambda x: np.transpose(x, (3, 2, 0, 1)),
                             lambda x: np.transpose(x, (2, 3, 1, 0)))
      elif path[-1] == "kernel" and rank == 2:
        to_torch, to_flax = np.transpose, np.transpose
      else:
        to_torch = to_flax = lambda x: x
      rules.append(_LayoutRule(".".join(path[:-1] + (name,)), collection, path, to_torch,
                               to_flax))
  return rules


def _to_torch(rules: list[_LayoutRule], variables: dict[str, Any]) -> dict[str, np.ndarray]:
  tensors = {}
  for rule in rules:
    value = np.asarray(_flatten(variables.get(rule.collection, {}))[rule.path], np.float32)
    tensors[rule.torch_name] = np.ascontiguousarray(rule.to_torch(value))
    if rule.torch_name.endswith(".running_var"):
      tensors[rule.torch_name[:-len("running_var")] + "num_batches_tracked"] = np.asarray(
          0, np.int64)
  return tensors


def _from_torch(rules: list[_LayoutRule], tensors: dict[str, np.ndarray], shapes: dict,
                source: str) -> dict[str, Any]:
  flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
  expected = {collection: _flatten(shapes.get(collection, {})) for collection in flat}
  missing, mismatched = [], []
  for rule in rules:
    if rule.torch_name not in tensors:
      missing.append(rule.torch_name)
      continue
    value = np.ascontiguousarray(rule.to_flax(np.asarray(tensors[rule.torch_name], np.float32)))
    if value.shape != tuple(expected[rule.collection][rule.path].shape):
      mismatched.append(f"{rule.torch_name} {value.shape}")
    flat[rule.collection][rule.path] = value
  names = {rule.torch_name for rule in rules}
  unused = sorted(name for name in tensors
                  if name not in names and not name.endswith(".num_batches_tracked"))
  if missing or unused or mismatched:
    raise ConversionError(f"{source} does not match the model of its clasp.json: missing "
                          f"{missing[:6]}, unused {unused[:6]}, mis-shaped {mismatched[:6]}")
  return {collection: _unflatten(values) for collection, values in flat.items() if values}


# Inverses of the converters the Hugging Face tensor tables use.
def _inverse(convert: Callable, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
  if convert is hf_checkpoint.identity:
    return lambda x: x
  if convert in (hf_checkpoint.linear_kernel, hf_checkpoint.conv1d_kernel):
    return lambda x: np.ascontiguousarray(convert(x))  # Both are their own inverse.
  name = getattr(convert, "__name__", "")
  if name == "_weight_norm_magnitude":
    return lambda x: x.reshape(1, 1, -1)  # (kernel,) -> PyTorch's (1, 1, kernel) for dim=2.
  raise AssertionError(f"no inverse for the tensor converter {name or convert!r}")


def _hf_tensors(rules: list[hf_checkpoint.TensorRule], params: dict, *, spelling: int = 0
                ) -> dict[str, np.ndarray]:
  """The Flax `params` under the table's checkpoint names (`spelling` picks among a rule's
  accepted names, clipped to the ones it has), checked by mapping them back."""
  flat = _flatten(params)
  tensors = {}
  for rule in rules:
    name = rule.names[min(spelling, len(rule.names) - 1)]
    value = np.asarray(flat[rule.flax_path], np.float32)
    tensors[name] = np.ascontiguousarray(_inverse(rule.convert, rule.shape)(value))
  back = hf_checkpoint.params_from_tensors(tensors, rules, source="export", model="itself")
  if any(not np.array_equal(back_value, np.asarray(flat[path], np.float32))
         for path, back_value in _flatten(back).items()):
    raise AssertionError("the tensor table does not map the exported tensors back")
  return tensors


def _save_safetensors(tensors: dict[str, np.ndarray], path: str,
                      metadata: dict[str, str] | None = None) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()}, path,
            metadata=metadata)


# ------------------------------------------------------------------ Towers.


def ssl_hf_config(config, normalize_audio: bool) -> tuple[dict, dict]:
  """(config.json, preprocessor_config.json) of a bare HubertModel / Wav2Vec2Model."""
  from clasp_jax.models import wav2vec2  # pylint: disable=g-import-not-at-top
  hf = {}
  for field in dataclasses.fields(wav2vec2.Config):
    if field.name in ("has_masked_spec_embed", "ctc_vocab_size"):
      continue
    value = getattr(config, field.name)
    hf[field.name] = list(value) if isinstance(value, tuple) else value
  hf["architectures"] = ["HubertModel" if config.model_type == "hubert" else "Wav2Vec2Model"]
  # SpecAugment's embedding exists exactly when a masking probability is positive.
  hf["mask_time_prob"] = 0.05 if config.has_masked_spec_embed else 0.0
  hf["mask_feature_prob"] = 0.0
  hf["apply_spec_augment"] = bool(config.has_masked_spec_embed)
  preprocessor = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                  "sampling_rate": 16_000, "padding_value": 0.0, "padding_side": "right",
                  "do_normalize": bool(normalize_audio), "return_attention_mask":
                  config.feat_extract_norm == "layer"}
  return hf, preprocessor


def ssl_tensors(config, params: dict) -> dict[str, np.ndarray]:
  from clasp_jax.models import wav2vec2, wav2vec2_checkpoint  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: wav2vec2.init_params(config))
  rules = hf_checkpoint.with_shapes(wav2vec2_checkpoint.tensor_mapping(config, ""), shapes)
  # Spelling 1 of the positional convolution: PyTorch's parametrised weight norm, what
  # transformers' own HubertModel saves.
  return _hf_tensors(rules, params, spelling=1)


def _write_ssl_encoder(settings, params: dict, folder: str) -> None:
  os.makedirs(folder, exist_ok=True)
  hf, preprocessor = ssl_hf_config(settings.ssl, settings.normalize_audio)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump(preprocessor, f, indent=2)
  _save_safetensors(ssl_tensors(settings.ssl, params), os.path.join(folder, "model.safetensors"),
                    {"format": "pt"})


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _write_max_length(transformer_dir: str, max_length: int) -> None:
  """The model truncated sentences at `config.model.text.max_length` tokens, which may be
  shorter than the source folder's own limit: sentence-transformers must truncate alike."""
  names = ("sentence_bert_config.json", "sentence_roberta_config.json",
           "sentence_xlm-roberta_config.json")
  path = next((os.path.join(transformer_dir, name) for name in names
               if os.path.isfile(os.path.join(transformer_dir, name))),
              os.path.join(transformer_dir, names[0]))
  settings = hf_checkpoint.read_config(transformer_dir, os.path.basename(path),
                                       required=False) or {}
  settings["max_seq_length"] = int(max_length)
  with open(path, "w") as f:
    json.dump(settings, f, indent=2)


def _write_text_encoder(tower, params: dict, folder: str) -> None:
  """The source sentence-transformers folder with the trained weights in place of its own."""
  from clasp_jax.models import bert_checkpoint, sentence_encoder  # pylint: disable=g-import-not-at-top
  source = tower.source
  if not source or not os.path.isdir(source):
    raise ConversionError(f"the text tower's folder {source!r} (config.model.text.encoder) is "
                          "gone; its tokenizer and module files are part of the export")
  ignore = shutil.ignore_patterns(*_WEIGHT_FILES, "*.safetensors", "model-*-of-*", "onnx",
                                  "openvino")
  shutil.copytree(source, folder, ignore=ignore, dirs_exist_ok=True)
  layout = sentence_encoder.read_sentence_transformers_folder(source)
  transformer_dir = os.path.join(folder, os.path.relpath(layout.transformer_dir, source))
  _write_max_length(transformer_dir, tower.max_length)
  rules = bert_checkpoint.expected_tensors(tower.model.transformer, "")
  _save_safetensors(_hf_tensors(rules, params["transformer"]),
                    os.path.join(transformer_dir, "model.safetensors"), {"format": "pt"})
  modules = hf_checkpoint.read_config(source, "modules.json", required=False) or []
  dense_dirs = {f"dense_{module.get('idx', position)}": module.get("path", "")
                for position, module in enumerate(modules)
                if str(module.get("type", "")).endswith("Dense")}
  for step in tower.model.head:
    if isinstance(step, sentence_encoder.DenseSpec):
      table = hf_checkpoint.RuleTable()
      table.linear("linear", "linear", step.in_features, step.out_features, bias=step.bias)
      if step.use_residual and step.in_features != step.out_features:
        table.linear("residual", "residual", step.in_features, step.out_features, bias=False)
      _save_safetensors(_hf_tensors(table.rules, params[step.name]),
                        os.path.join(folder, dense_dirs[step.name], "model.safetensors"))


# ------------------------------------------------------------------ Export.


def _front_end_dict(front_end) -> dict:
  return dataclasses.asdict(front_end)


def settings_dict(trained) -> dict:
  """clasp.json: what rebuilds the model, in plain JSON (see the module docstring)."""
  model = trained.built.model
  config = trained.config
  params = trained.variables["params"]
  speech_encoder = params["speech_encoder"]
  settings: dict[str, Any] = {
      "format": FORMAT_VERSION,
      "source": {"workdir": os.path.abspath(trained.workdir), "step": trained.step},
      "speech_kind": model.speech_kind,
      "fusion": {
          "kind": model.fusion, "mode": model.mode, "embed_dim": model.embed_dim,
          "speech_branch_hidden": list(model.speech_branch_hidden or model.branch_hidden),
          "spectrogram_branch_hidden": list(model.spectrogram_branch_hidden or
                                            model.branch_hidden),
          "fusion_hidden": list(model.fusion_hidden),
          "normalize_inputs": bool(model.normalize_inputs),
          "inputs": {name: int(speech_encoder[f"{name}_branch"]["linear_0"]["kernel"].shape[0])
                     for name in ("speech", "spectrogram") if f"{name}_branch" in speech_encoder},
      },
      "embed_dim": model.embed_dim,
      "logit_scale": float(np.asarray(params["logit_scale"])) if "logit_scale" in params else None,
      "logit_bias": float(np.asarray(params["logit_bias"])) if "logit_bias" in params else None,
      "scale_init": float(model.scale_init),
      "text_encoder": TEXT_DIR if trained.built.text_tower is not None else None,
      "config": json.loads(config.to_json_best_effort()),
  }
  if model.speech_kind == "audio":
    from clasp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from clasp_jax.models import speech_tower  # pylint: disable=g-import-not-at-top
    tower = model.speech_tower or speech_tower.Settings()
    options = pipeline.pipeline_config(config, train=False)
    settings["audio"] = {
        "sample_rate": speech_tower.SAMPLE_RATE,
        "max_duration_s": float(options.max_duration_s),
        "peak_normalize": bool(options.peak_normalize),
        "normalize_audio": bool(tower.normalize_audio),
        "ssl_layer": tower.layer,
        "ssl_encoder": SSL_DIR if model.mode in ("joint", "speech") else None,
        "front_end": _front_end_dict(tower.front_end),
        "spectrogram_encoder": dataclasses.asdict(tower.spectrogram),
    }
  return settings


README = """# CLASP model for PyTorch

Exported by `python -m clasp_jax.convert --to=torch` from {workdir} (step {step}).

```python
{code}
```

{parts}
Without clasp_jax: the fusion encoder's state_dict (`fusion.pt`, or `fusion.safetensors`) has
the authors' tensor names and loads into their classes with `strict=True` (joint mode; inputs
L2-normalised first when clasp.json says `normalize_inputs`); `ssl_encoder/` loads with
`transformers.AutoModel.from_pretrained`; `text_encoder/` with
`sentence_transformers.SentenceTransformer`. `clasp.json` holds the settings (fusion kind, mode
and widths, input normalisation, spectrogram front-end, embedding width, logit scale).
"""


def readme_code(folder: str, speech_kind: str, inputs: dict, has_text: bool, dim: int) -> str:
  """The lines that load and run the exported model, for what it holds."""
  lines = ["import numpy as np, clasp_jax.torch as clasp_torch",
           f'model = clasp_torch.load("{folder}")  # needs clasp_jax[torch]']
  if speech_kind == "audio":
    lines.append(f"speech = model.embed_speech([np.zeros(16000, np.float32)])  # 16 kHz clips "
                 f"-> (n, {dim})")
  else:
    arguments = ", ".join(f"{name}=np.ones((1, {width}), np.float32)"
                          for name, width in inputs.items())
    lines.append(f"speech = model.embed_features({arguments})  # (n, {dim})")
  if has_text:
    lines.append('text = model.embed_text(["a spoken sentence"])')
    lines.append("print(speech @ text.T)  # cosine similarities")
  else:
    lines.append("print(speech @ speech.T)  # cosine similarities (text embeddings come from "
                 "the sentence encoder the data used)")
  return "\n".join(lines)


def export_workdir(workdir: str, output: str, *, checkpoint: int | str = "best",
                   overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
  """Writes the PyTorch folder of `workdir`'s `checkpoint` into `output`; returns clasp.json."""
  from clasp_jax.inference import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(output, SETTINGS_FILE)) and not overwrite:
    raise ConversionError(f"{output} already holds an export (clasp.json); choose another "
                          "folder or pass --overwrite")
  trained = workdir_lib.load_trained(workdir, checkpoint=checkpoint)
  variables = jax.device_get(trained.variables)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  model = trained.built.model
  if model.fusion_branch != "mlp" or model.input_norm:
    raise ConversionError(
        f"{workdir}: its fusion encoder has {model.fusion_branch} branches"
        + (" with standardised inputs" if model.input_norm else "")
        + " (config.model.branch, config.model.input_norm); the PyTorch module has the "
        "paper's branches only")
  os.makedirs(output, exist_ok=True)
  for stale in (SSL_DIR, TEXT_DIR):
    shutil.rmtree(os.path.join(output, stale), ignore_errors=True)

  fusion = torch_pickle.fusion_state_dict(params["speech_encoder"],
                                          batch_stats.get("speech_encoder", {}), model.fusion)
  _save_safetensors(fusion, os.path.join(output, FUSION_FILE), {"format": "pt"})
  parts = [f"- `{FUSION_FILE}`: {model.fusion} fusion encoder, {model.mode} mode"]
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
    log(f"note: torch is not installed, so {FUSION_PT_FILE} is not written "
        f"({FUSION_FILE} holds the same tensors)")
  if torch is not None:
    torch.save({name: torch.from_numpy(np.array(value)) for name, value in fusion.items()},
               os.path.join(output, FUSION_PT_FILE))
    parts.append(f"- `{FUSION_PT_FILE}`: the same, as a weights-only state_dict")

  if model.speech_kind == "audio":
    from clasp_jax.models import speech_tower  # pylint: disable=g-import-not-at-top
    tower = model.speech_tower or speech_tower.Settings()
    if "ssl_encoder" in params and tower.ssl_input != "waveform":
      raise ConversionError(
          f"{workdir}: its SSL encoder reads {tower.ssl_input} frames "
          "(config.model.speech.ssl_input), which no Hugging Face HubertModel does; only "
          "models whose SSL encoder reads waveforms convert to PyTorch")
    if "ssl_encoder" in params:
      _write_ssl_encoder(tower, params["ssl_encoder"], os.path.join(output, SSL_DIR))
      parts.append(f"- `{SSL_DIR}/`: {tower.ssl.model_type} SSL encoder (Hugging Face folder)")
    if "spectrogram_encoder" in params:
      cnn = {"params": params["spectrogram_encoder"],
             "batch_stats": batch_stats["spectrogram_encoder"]}
      _save_safetensors(_to_torch(cnn_layout_rules(cnn), cnn),
                        os.path.join(output, SPECTROGRAM_FILE), {"format": "pt"})
      parts.append(f"- `{SPECTROGRAM_FILE}`: spectrogram encoder (clasp_jax.torch layer names)")
  if trained.built.text_tower is not None:
    _write_text_encoder(trained.built.text_tower, params["text_encoder"],
                        os.path.join(output, TEXT_DIR))
    parts.append(f"- `{TEXT_DIR}/`: text tower (sentence-transformers folder)")

  settings = settings_dict(trained)
  with open(os.path.join(output, SETTINGS_FILE), "w") as f:
    json.dump(settings, f, indent=2)
  with open(os.path.join(output, "README.md"), "w") as f:
    code = readme_code(os.path.abspath(output), model.speech_kind, settings["fusion"]["inputs"],
                       trained.built.text_tower is not None, model.embed_dim)
    f.write(README.format(workdir=os.path.abspath(workdir), step=trained.step, code=code,
                          parts="\n".join(parts) + "\n"))
  return settings


# ------------------------------------------------------------------ Import.


def read_settings(folder: str) -> dict:
  path = os.path.join(folder, SETTINGS_FILE)
  if not os.path.isfile(path):
    raise ConversionError(f"{folder}: no {SETTINGS_FILE} (not a folder written by "
                          "clasp_jax.convert --to=torch)")
  try:
    with open(path) as f:
      settings = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ConversionError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(settings, dict) or settings.get("format") != FORMAT_VERSION:
    raise ConversionError(f"{path}: format {settings.get('format') if isinstance(settings, dict) else '?'}"
                          f" is not {FORMAT_VERSION}")
  return settings


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise ConversionError(f"{path} is missing")
  return hf_checkpoint.read_safetensors(path)


class _State:
  """What Checkpointer.save_best reads of a train state."""

  def __init__(self, params, batch_stats):
    self.step = np.asarray(IMPORTED_STEP, np.int32)
    self.params = params
    self.batch_stats = batch_stats


def import_folder(folder: str, workdir: str, *, overwrite: bool = False) -> dict:
  """Writes a workdir from a folder of `export_workdir` (see the module docstring); returns
  its clasp.json. The towers' folders are copied into the workdir, which its config names."""
  from clasp_jax.common.config_args import ConfigError  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import clasp, speech_tower, wav2vec2_checkpoint  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import spectrogram_encoder, text_tower  # pylint: disable=g-import-not-at-top
  from clasp_jax.trainer.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top

  settings = read_settings(folder)
  if os.path.exists(os.path.join(workdir, "config.json")) and not overwrite:
    raise ConfigError(f"{workdir} already holds a run (config.json); choose another workdir")
  config = ml_collections.ConfigDict(settings["config"])
  os.makedirs(workdir, exist_ok=True)
  for stale in ("best", "checkpoints", SSL_DIR, TEXT_DIR):  # No old weights may linger.
    shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
  params: dict[str, Any] = {}
  batch_stats: dict[str, Any] = {}

  fusion_params, fusion_stats = torch_pickle.fusion_from_state_dict(
      _read_tensors(os.path.join(folder, FUSION_FILE)), settings["fusion"]["kind"])
  params["speech_encoder"] = fusion_params
  if fusion_stats:
    batch_stats["speech_encoder"] = fusion_stats

  audio = settings.get("audio")
  if settings["speech_kind"] == "audio":
    if audio is None:
      raise ConversionError(f"{folder}/{SETTINGS_FILE}: an audio-mode model without 'audio'")
    if audio.get("ssl_encoder"):
      ssl_folder = os.path.join(workdir, SSL_DIR)
      shutil.copytree(os.path.join(folder, audio["ssl_encoder"]), ssl_folder)
      config.model.speech.checkpoint = os.path.abspath(ssl_folder)
      try:
        params["ssl_encoder"] = wav2vec2_checkpoint.load(ssl_folder).params
      except wav2vec2_checkpoint.CheckpointError as error:
        raise ConversionError(str(error)) from None
    tower = speech_tower.settings_from_config(config.model.speech)
    if "spectrogram_branch" in fusion_params:
      shapes = jax.eval_shape(lambda: spectrogram_encoder.init_variables(tower.spectrogram))
      cnn = _from_torch(cnn_layout_rules(shapes), _read_tensors(
          os.path.join(folder, SPECTROGRAM_FILE)), shapes, os.path.join(folder, SPECTROGRAM_FILE))
      params["spectrogram_encoder"] = cnn["params"]
      batch_stats["spectrogram_encoder"] = cnn["batch_stats"]
  if settings.get("text_encoder"):
    text_folder = os.path.join(workdir, TEXT_DIR)
    shutil.copytree(os.path.join(folder, settings["text_encoder"]), text_folder)
    config.model.text.encoder = os.path.abspath(text_folder)
  for name in ("logit_scale", "logit_bias"):
    if settings.get(name) is not None:
      params[name] = np.asarray(settings[name], np.float32)

  built = clasp.build(config)
  if built.text_tower is not None:
    params["text_encoder"] = jax.device_get(built.text_tower.params)
  _check_variables(built, config, params, batch_stats, folder)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    checkpointer.save_best(IMPORTED_STEP, _State(params, batch_stats), {
        "step": IMPORTED_STEP, "imported_from": os.path.abspath(folder),
        "exported_from": settings.get("source", {})})
  finally:
    checkpointer.close()
  return settings


def _check_variables(built, config, params, batch_stats, folder) -> None:
  """The imported trees must be exactly the model's (names and shapes)."""
  from clasp_jax.models import clasp  # pylint: disable=g-import-not-at-top
  model = built.model
  if model.speech_kind == "audio":
    dims = {"audio": 16_000}
  else:
    dims = {name: int(dim) for name, dim in config.data.dims.items() if name != "text"}
  if built.text_tower is not None:
    dims["input_ids"] = 8
  else:
    dims["text"] = int(config.model.embed_dim)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), clasp.example_batch(dims),
                                             train=False))
  for collection, tree in (("params", params), ("batch_stats", batch_stats)):
    want = {path: tuple(leaf.shape) for path, leaf in
            _flatten(dict(shapes.get(collection, {}))).items()}
    have = {path: tuple(np.shape(leaf)) for path, leaf in _flatten(tree).items()}
    if want != have:
      differing = sorted({"/".join(path) for path, _ in set(want.items()) ^ set(have.items())})
      raise ConversionError(f"{folder}: its {collection} do not fit the model of its "
                            f"clasp.json (differing: {differing[:6]})")
