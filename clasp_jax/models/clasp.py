"""The two-tower CLASP model, assembled from towers chosen by name.

Speech tower (`speech_kind`):
  - 'features': the fusion encoder (`speech_encoder`) reads precomputed speech SSL and
    spectrogram vectors from the batch ('speech', 'spectrogram'), as the paper trained it.
  - 'audio': `speech_tower.AudioSpeechTower` computes those two vectors from 16 kHz audio
    ('audio', 'audio_mask') with an SSL encoder (`ssl_encoder`) and an on-device spectrogram
    CNN (`spectrogram_encoder`), and feeds them to the same fusion encoder. Its parameters
    sit at the top level beside `speech_encoder`, so the fusion weights of a feature-mode
    model and of an audio-mode model are interchangeable.
Text tower (`text_kind`):
  - 'precomputed': sentence embeddings from the batch ('text'), frozen as in the paper.
  - 'encoder': a `SentenceEncoder` (`text_encoder`) on 'input_ids' / 'attention_mask', so its
    top layers can be fine-tuned.

Like big_vision's two-tower models, `__call__` returns `(zspeech, ztext, out)` with
L2-normalised embeddings and slash-named diagnostics in `out`; `embed_speech` and
`embed_text` embed one side alone (inference on audio without text, or text without audio).

`model_from_config` builds the model from the config alone (no weights are read);
`pretrained_params` reads the pretrained towers' weights, once, keyed by top-level name;
`build` does both and adds what the input pipeline needs (the text tower's tokenizer): it is
what the trainer, inference and the tests call.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clasp_jax.common.config_args import ConfigError
from clasp_jax.common.workdir import upgrade_config
from clasp_jax.models import speech_tower as speech_tower_lib
from clasp_jax.models import text_tower
from clasp_jax.models import fusion as fusion_lib
from clasp_jax.models.fusion import FusionEncoder
from clasp_jax.models import precision as precision_lib
from clasp_jax.models.layers import IdentityInitLinear, l2_normalize

SPEECH_KINDS = ("features", "audio")
TEXT_KINDS = ("precomputed", "encoder")


def _require(batch: Mapping[str, Any], keys: tuple[str, ...], why: str) -> None:
  missing = [key for key in keys if key not in batch]
  if missing:
    raise ValueError(f"the batch lacks {missing} ({why}); it holds {sorted(batch)}")


class ClaspModel(nn.Module):
  """Speech tower + fusion encoder, text tower, and the loss's logit scale and bias.

  `logit_scale` holds log(scale) as in CLIP; it is a parameter only when `learn_scale`.
  `max_scale` caps exp(logit_scale) (CLIP caps at 100). `logit_bias` exists for the sigmoid loss.
  `speech_tower` holds the audio tower's settings (`speech_kind='audio'`; None: the defaults).
  `text_kind` None means 'encoder' when `text_encoder` is set, else 'precomputed'.
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
  speech_kind: str = "features"
  speech_tower: speech_tower_lib.Settings | None = None
  text_kind: str | None = None
  speech_branch_hidden: tuple[int, ...] = ()
  spectrogram_branch_hidden: tuple[int, ...] = ()
  normalize_inputs: bool = False
  fusion_branch: str = "mlp"
  input_norm: bool = False
  input_noise: float = 0.0
  # A learned square map of the text embedding, starting at the identity ('text_projection').
  project_text: bool = False
  # Activation dtype of the speech and text towers; their parameters stay float32, and the
  # fusion encoder, its BatchNorm and the loss compute in float32.
  dtype: Any = jnp.float32
  # Dropout inside the text tower while training: only where it is fine-tuned. A frozen
  # tower gives the same embedding of a sentence every step, as the paper's precomputed ones.
  text_dropout: bool = False

  @property
  def resolved_text_kind(self) -> str:
    if self.text_kind is not None:
      return self.text_kind
    return "precomputed" if self.text_encoder is None else "encoder"

  def setup(self):
    if self.speech_kind not in SPEECH_KINDS:
      raise ValueError(f"speech_kind must be one of {SPEECH_KINDS}, got {self.speech_kind!r}")
    text_kind = self.resolved_text_kind
    if text_kind not in TEXT_KINDS:
      raise ValueError(f"text_kind must be one of {TEXT_KINDS}, got {text_kind!r}")
    if (text_kind == "encoder") != (self.text_encoder is not None):
      raise ValueError(f"text_kind={text_kind!r} " + (
          "needs a text_encoder module" if text_kind == "encoder"
          else "takes no text_encoder module"))
    self.speech_encoder = FusionEncoder(
        fusion=self.fusion, mode=self.mode, embed_dim=self.embed_dim,
        branch_hidden=self.branch_hidden, branch_dropout=self.branch_dropout,
        fusion_hidden=self.fusion_hidden, axis_name=self.axis_name, precision=self.precision,
        speech_branch_hidden=self.speech_branch_hidden,
        spectrogram_branch_hidden=self.spectrogram_branch_hidden,
        normalize_inputs=self.normalize_inputs, branch=self.fusion_branch,
        input_norm=self.input_norm, input_noise=self.input_noise)
    if self.speech_kind == "audio":
      self.audio_tower = speech_tower_lib.AudioSpeechTower(
          self.speech_tower or speech_tower_lib.Settings(), mode=self.mode,
          axis_name=self.axis_name, precision=self.precision, dtype=self.dtype)
      # The tower's encoders become top-level parameters ('ssl_encoder', ...), beside
      # 'speech_encoder': one name per pretrained tower for loading and freezing.
      nn.share_scope(self, self.audio_tower)
    if self.project_text:
      self.text_projection = IdentityInitLinear()
    if self.learn_scale:
      self.logit_scale = self.param("logit_scale",
                                    nn.initializers.constant(math.log(self.scale_init)), ())
    if self.use_bias:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(self.bias_init), ())

  def _speech_embedding(self, batch: Mapping[str, jax.Array], train: bool):
    """The un-normalised speech embedding and the speech tower's diagnostics."""
    if self.speech_kind == "features":
      needs = {"joint": ("speech", "spectrogram"), "speech": ("speech",),
               "spectrogram": ("spectrogram",)}.get(self.mode, ())
      _require(batch, needs, f"feature mode, fusion mode {self.mode!r}")
      return self.speech_encoder(batch.get("speech"), batch.get("spectrogram"), train=train), {}
    _require(batch, ("audio", "audio_mask"), "audio mode")
    tower_out = self.audio_tower(batch["audio"], batch["audio_mask"], train=train)
    diagnostics = {name: value for name, value in tower_out.items() if "/" in name}
    if "speech" in tower_out:
      diagnostics["ssl/pooled"] = tower_out["speech"]
    if "spectrogram" in tower_out:
      diagnostics["spectrogram/features"] = tower_out["spectrogram"]
    as_float32 = lambda x: None if x is None else x.astype(jnp.float32)
    embedding = self.speech_encoder(as_float32(tower_out.get("speech")),
                                    as_float32(tower_out.get("spectrogram")), train=train)
    return embedding, diagnostics

  def _text_embedding(self, batch: Mapping[str, jax.Array], train: bool) -> jax.Array:
    if self.resolved_text_kind == "precomputed":
      _require(batch, ("text",), "precomputed text embeddings")
      embedding = batch["text"].astype(jnp.float32)
    else:
      _require(batch, ("input_ids", "attention_mask"), "the text encoder's tokens")
      embedding = self.text_encoder(batch["input_ids"], batch["attention_mask"],
                                    deterministic=not (train and self.text_dropout)
                                    ).astype(jnp.float32)
    if self.project_text:
      with precision_lib.scope(self.precision):
        embedding = self.text_projection(embedding)
    return embedding

  def embed_speech(self, batch: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    """L2-normalised speech embeddings (batch, embed_dim) from the speech side of `batch`."""
    return l2_normalize(self._speech_embedding(batch, train)[0])

  def embed_text(self, batch: Mapping[str, jax.Array], train: bool = False) -> jax.Array:
    """L2-normalised text embeddings (batch, embed_dim) from the text side of `batch`."""
    return l2_normalize(self._text_embedding(batch, train))

  def scale_and_bias(self) -> tuple[jax.Array, jax.Array]:
    """The loss's logit scale and bias (a loss over cached embeddings reads them here)."""
    if self.learn_scale:
      scale = jnp.minimum(jnp.exp(self.logit_scale), self.max_scale)
    else:
      scale = jnp.asarray(self.scale_init, jnp.float32)
    bias = self.logit_bias if self.use_bias else jnp.zeros((), jnp.float32)
    return scale, bias

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False):
    speech_embedding, diagnostics = self._speech_embedding(batch, train)
    zspeech = l2_normalize(speech_embedding)
    ztext = l2_normalize(self._text_embedding(batch, train))
    scale, bias = self.scale_and_bias()

    out = {
        "scale": scale,
        "bias": bias,
        "speech/norm": jnp.mean(jnp.linalg.norm(speech_embedding, axis=-1)),
        **diagnostics,
    }
    return zspeech, ztext, out


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_config: ml_collections.ConfigDict) -> Any:
  """`config.model.dtype` as a dtype (configs written before the field: float32)."""
  name = model_config.get("dtype", "float32")
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f"config.model.dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                      f"got {name!r}")
  return COMPUTE_DTYPES[name]


def _text_kind_and_encoder(model_config: ml_collections.ConfigDict, precision: str,
                           text_encoder: nn.Module | None) -> tuple[str, nn.Module | None]:
  """Which text tower `model_config.text` names, and its module (built from the folder's
  config files; its weights come from `pretrained_params`)."""
  text = model_config.get("text")
  if text_encoder is not None:
    # The caller built the module (the layout before model.text existed passed it in).
    return "encoder", text_encoder
  if text is None:
    return "precomputed", None
  if text.kind not in TEXT_KINDS:
    raise ConfigError(f"config.model.text.kind must be one of {TEXT_KINDS}, got {text.kind!r}")
  if text.get("precompute", False):
    # The frozen encoder's embeddings come with the batch (`PrecomputedText`).
    if text.get("trainable_top_layers", 0):
      raise ConfigError("config.model.text.precompute needs a frozen text tower "
                        "(config.model.text.trainable_top_layers=0)")
    return "precomputed", None
  if text.kind == "precomputed":
    if text.get("encoder"):
      raise ConfigError("config.model.text.encoder is set but config.model.text.kind is "
                        "'precomputed'; set --config.model.text.kind=encoder to run it")
    return "precomputed", None
  if not text.get("encoder"):
    raise ConfigError("config.model.text.kind='encoder' needs config.model.text.encoder "
                      "(a sentence-transformers folder)")
  try:
    return "encoder", text_tower.module_from_folder(text.encoder, precision=precision,
                                                    dtype=compute_dtype(model_config))
  except (OSError, ValueError) as error:
    raise ConfigError(f"config.model.text.encoder: {error}") from None


def model_from_config(model_config: ml_collections.ConfigDict,
                      loss_config: ml_collections.ConfigDict, *, axis_name: str | None = None,
                      text_encoder: nn.Module | None = None) -> ClaspModel:
  """Builds the model the config describes, reading no weights.

  The loss decides whether scale and bias are learnt. `model_config.speech` and
  `model_config.text` pick the towers (absent: feature mode and precomputed text, as configs
  written before them). `text_encoder` passes a ready text module instead of building it
  from `model_config.text.encoder` (the trainer already holds one it loaded).
  """
  # Workdirs written before the field existed computed at "highest" on CPU alike.
  precision = model_config.get("precision", "highest")
  speech = model_config.get("speech")
  speech_kind = speech.get("kind", "features") if speech is not None else "features"
  if speech_kind not in SPEECH_KINDS:
    raise ConfigError(f"config.model.speech.kind must be one of {SPEECH_KINDS}, "
                      f"got {speech_kind!r}")
  settings = speech_tower_lib.settings_from_config(speech) if speech_kind == "audio" else None
  fusion_branch = str(model_config.get("branch", "mlp"))
  if fusion_branch not in fusion_lib.BRANCHES:
    raise ConfigError(f"config.model.branch must be one of {fusion_lib.BRANCHES}, "
                      f"got {fusion_branch!r}")
  input_noise = float(model_config.get("input_noise", 0.0))
  if not input_noise >= 0:
    raise ConfigError(f"config.model.input_noise must be at least 0, got {input_noise}")
  text_kind, text_module = _text_kind_and_encoder(model_config, precision, text_encoder)
  return ClaspModel(
      fusion=model_config.fusion,
      mode=model_config.mode,
      embed_dim=model_config.embed_dim,
      branch_hidden=tuple(model_config.branch_hidden),
      branch_dropout=tuple(model_config.branch_dropout),
      fusion_hidden=tuple(model_config.fusion_hidden),
      precision=precision,
      # Workdirs written before these fields existed had one width for both branches and
      # raw inputs.
      speech_branch_hidden=tuple(model_config.get("speech_branch_hidden", ())),
      spectrogram_branch_hidden=tuple(model_config.get("spectrogram_branch_hidden", ())),
      normalize_inputs=bool(model_config.get("normalize_inputs", False)),
      fusion_branch=fusion_branch,
      input_norm=bool(model_config.get("input_norm", False)),
      input_noise=input_noise,
      project_text=bool(model_config.get("text_projection", False)),
      learn_scale=loss_config.learn_scale,
      scale_init=loss_config.scale_init,
      max_scale=loss_config.max_scale,
      use_bias=loss_config.kind in ("sigmoid", "sigmoid_chunked"),
      bias_init=loss_config.bias_init,
      axis_name=axis_name,
      text_encoder=text_module,
      speech_kind=speech_kind,
      speech_tower=settings,
      text_kind=text_kind,
      dtype=compute_dtype(model_config),
      text_dropout=text_module is not None and int(
          model_config.get("text", {}).get("trainable_top_layers", 0)) > 0,
  )


def pretrained_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The pretrained towers' parameters, keyed by their top-level parameter name.

  {'ssl_encoder': ...} when `config.model.speech.checkpoint` names an SSL checkpoint in audio
  mode, {'text_encoder': ...} when the text tower is an encoder; nothing else (the fusion
  encoder, the spectrogram encoder and the logit scale start at random, in the train state's
  own initialisation). Reads each checkpoint once; initialises nothing. Accepts old configs.
  """
  config = upgrade_config(config)
  params = {}
  ssl_params = speech_tower_lib.load(config)
  if ssl_params is not None:
    params["ssl_encoder"] = ssl_params
  text_params = text_tower.load_params(config)
  if text_params is not None:
    params["text_encoder"] = text_params
  return params


TextEncoder = Callable[[Sequence[str]], dict[str, np.ndarray]]


def tokenizer_for(tower: text_tower.TextTower) -> TextEncoder:
  """Sentences -> fixed-length `input_ids` and `attention_mask` (one compiled shape)."""

  def encode(texts: Sequence[str]) -> dict[str, np.ndarray]:
    input_ids, attention_mask = tower.pad_batch(tower.tokenize(list(texts)),
                                                length=tower.max_length)
    return {"input_ids": np.asarray(input_ids, np.int32),
            "attention_mask": np.asarray(attention_mask, np.int32)}

  return encode


class PrecomputedText:
  """Sentences -> {'text': (n, dim) embeddings of a frozen text tower}, each sentence embedded
  once: a frozen tower maps a sentence to the same vector at every step, so running it per
  batch would only repeat work. `cache_file` (an .npz of `sentences` and `embeddings`, e.g.
  all of a corpus embedded in one pass) seeds the table, so every process that reads it sees
  the very same vectors. Thread-safe: the input pipeline calls it from its workers.
  """

  def __init__(self, tower: text_tower.TextTower, cache_file: str = ""):
    self.tower = tower
    self.table: dict[str, np.ndarray] = {}
    self._lock = threading.Lock()
    if cache_file:
      try:
        with np.load(cache_file, allow_pickle=False) as cached:
          sentences, embeddings = cached["sentences"], cached["embeddings"]
      except (OSError, KeyError, ValueError) as error:
        raise ConfigError(f"config.model.text.cache: cannot read {cache_file}: {error}") from None
      if embeddings.shape[1:] != (tower.embedding_dim,):
        raise ConfigError(f"config.model.text.cache: {cache_file} holds {embeddings.shape[1:]} "
                          f"embeddings; the text tower makes {tower.embedding_dim}-d ones")
      self.table = dict(zip(sentences.tolist(), embeddings.astype(np.float32)))

  def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    texts = list(texts)
    with self._lock:
      missing = sorted(set(texts) - set(self.table))
      if missing:
        self.table.update(zip(missing, self.tower.embed(missing)))
      rows = [self.table[text] for text in texts]
    return {"text": np.stack(rows) if rows else
            np.zeros((0, self.tower.embedding_dim), np.float32)}


def ctc_tokens(vocabulary: str) -> tuple[str, ...]:
  """The CTC head's outputs for a character vocabulary: 0 is the blank, then one per character."""
  return ("<pad>",) + tuple(vocabulary)


def ctc_text(text: str) -> str:
  """How a sentence is spelt for the CTC head: lower case, whitespace runs as one space."""
  return " ".join(text.lower().split())


def with_ctc_labels(encoder: TextEncoder | None, vocabulary: str, max_labels: int) -> TextEncoder:
  """`encoder`'s outputs plus `ctc_labels` (n, max_labels) int32 and `ctc_label_mask`: each
  sentence's characters (ctc_text) as ids of `ctc_tokens(vocabulary)`, characters outside the
  vocabulary left out, cut at max_labels."""
  index = {character: i + 1 for i, character in enumerate(vocabulary)}

  def encode(texts: Sequence[str]) -> dict[str, np.ndarray]:
    outputs = dict(encoder(texts)) if encoder is not None else {}
    labels = np.zeros((len(texts), max_labels), np.int32)
    mask = np.zeros((len(texts), max_labels), bool)
    for row, text in enumerate(texts):
      ids = [index[c] for c in ctc_text(text) if c in index][:max_labels]
      labels[row, :len(ids)], mask[row, :len(ids)] = ids, True
    outputs.update(ctc_labels=labels, ctc_label_mask=mask)
    return outputs

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
  text_tower: text_tower.TextTower | None
  speech_description: str
  text_description: str
  embed_dim: int

  def check_batch(self, arrays: Mapping[str, np.ndarray], host: Mapping[str, np.ndarray]):
    """Clear errors for data that cannot feed this model (before anything is compiled)."""
    speech_inputs = (("audio",) if self.model.speech_kind == "audio" else
                     {"joint": ("speech", "spectrogram"), "speech": ("speech",),
                      "spectrogram": ("spectrogram",)}[self.model.mode])
    missing = [name for name in speech_inputs if name not in arrays]
    if missing:
      raise ConfigError(f"config.model.speech.kind={self.model.speech_kind!r} reads {missing}, "
                        f"which this data does not hold (it holds {sorted(arrays)}): audio "
                        "mode needs built audio datasets (config.data.kind='audio'), feature "
                        "mode feature splits")
    empty = [name for name in speech_inputs if np.shape(arrays[name])[-1] == 0]
    if empty:
      # `extract` without --spectrogram_encoder writes (N, 0) spectrogram features.
      raise ConfigError(f"the data's {empty} features are empty (0 wide), but "
                        f"config.model.mode={self.model.mode!r} reads them: train on these "
                        "features with config.model.mode='speech'")
    if self.text_tower is not None:
      if not all(str(text) for text in host["text"]):
        raise ConfigError("config.model.text.encoder needs the sentences of each split, but "
                          "this data has none (feature splits need sentences.json; "
                          "synthetic_features has none)")
    elif "text" not in arrays:
      raise ConfigError("the data holds no precomputed text embeddings ('text'): set "
                        "config.model.text.kind='encoder' and config.model.text.encoder=DIR")
    elif arrays["text"].shape[-1] != self.embed_dim:
      raise ConfigError(f"config.model.embed_dim={self.embed_dim} must equal the text "
                        f"embedding width ({arrays['text'].shape[-1]})")


def build(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> BuiltModel:
  """The model `config` describes, its pretrained tower weights (each read once) and its text
  input. Accepts configs of every layout (upgrade_config)."""
  config = upgrade_config(config)
  text = config.model.text
  tower = None
  if text.kind == "encoder":
    tower = text_tower.load(text.encoder, max_length=text.get("max_length", 0) or None,
                            dtype=compute_dtype(config.model))
    if tower.embedding_dim != config.model.embed_dim:
      raise ConfigError(f"config.model.embed_dim={config.model.embed_dim} must equal the text "
                        f"tower's embedding width ({tower.embedding_dim})")
  precompute = tower is not None and bool(text.get("precompute", False))
  model = model_from_config(
      config.model, config.loss, axis_name=axis_name,
      text_encoder=tower.model if tower is not None and not precompute else None)
  pretrained = {}
  ssl_params = speech_tower_lib.load(config)
  if ssl_params is not None:
    pretrained["ssl_encoder"] = ssl_params
  if tower is not None and not precompute:
    pretrained["text_encoder"] = tower.params
  if precompute:
    text_encoder = PrecomputedText(tower, text.get("cache", ""))
  else:
    text_encoder = tokenizer_for(tower) if tower is not None else None
  speech_config = config.model.speech
  if speech_config.get("ctc_vocabulary", ""):
    text_encoder = with_ctc_labels(text_encoder, speech_config.ctc_vocabulary,
                                   int(speech_config.get("ctc_max_labels", 256)))
  speech = config.model.speech
  if model.speech_kind == "audio":
    speech_description = (f"audio: SSL encoder {speech.checkpoint or 'at random'}, "
                          f"spectrogram encoder, {config.model.fusion} fusion")
  else:
    speech_description = f"{config.model.fusion} fusion over precomputed features"
  text_description = (f"{text.encoder} ({tower.embedding_dim}-d, top "
                      f"{text.get('trainable_top_layers', 0)} layers trainable)"
                      if tower is not None else "precomputed embeddings")
  if precompute:
    text_description += ", frozen: each sentence embedded once"
  return BuiltModel(model=model, pretrained=pretrained, text_encoder=text_encoder,
                    text_tower=tower, speech_description=speech_description,
                    text_description=text_description, embed_dim=config.model.embed_dim)


def example_batch(data_dims: Mapping[str, int], batch_size: int = 2) -> dict[str, Any]:
  """Zeros shaped like one batch, for initialisation and shape inference.

  `data_dims` maps each input to its width: feature vectors ('speech', 'spectrogram',
  'text') are (batch, dim) float32; 'audio' (samples) also gives an all-valid 'audio_mask',
  and 'input_ids' (tokens) an all-valid 'attention_mask'.
  """
  batch = {}
  for name, dim in data_dims.items():
    if name == "audio":
      batch["audio"] = jnp.zeros((batch_size, dim), jnp.float32)
      batch["audio_mask"] = jnp.ones((batch_size, dim), bool)
    elif name == "input_ids":
      batch["input_ids"] = jnp.zeros((batch_size, dim), jnp.int32)
      batch["attention_mask"] = jnp.ones((batch_size, dim), jnp.int32)
    else:
      batch[name] = jnp.zeros((batch_size, dim), jnp.float32)
  return batch
