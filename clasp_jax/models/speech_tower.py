"""The audio-mode speech tower: a 16 kHz waveform batch -> the fusion encoder's two input vectors.

CLASP computed its two speech features offline, per file: HuBERT-large's last hidden state
mean-pooled over time (1024-d), and an ImageNet EfficientNet's logits on a matplotlib picture
of the dB spectrogram (1000-d). This tower computes both on the device, for a padded batch,
inside the model, so the fusion encoder can train end to end from audio (or over frozen
encoders, as in the paper, by freezing their parameters in the trainer's config):

  - `ssl_encoder`: HuBERT / wav2vec2 (`wav2vec2.Model`) on the waveform, standardised per clip
    when its checkpoint's preprocessor asks for it; the hidden states of `layer` (None or -1:
    the last hidden state, as the paper; k: `hidden_states[k]` as transformers counts them,
    0 being the transformer's input) are averaged over the valid frames -> (batch, ssl_dim).
  - `spectrogram_encoder`: the on-device front-end (`spectrogram.FrontEnd`, no parameters)
    makes a dB image of the raw waveform, which `spectrogram_encoder.Model` (an EfficientNet-
    style CNN, trained here instead of frozen ImageNet weights) maps to (batch, output_dim).

Front-end default: the paper used librosa's defaults at 22,050 Hz (n_fft 2048 = 93 ms, hop
512 = 23 ms, linear-frequency dB of the magnitude). Our audio is 16 kHz, and the defaults here
are the speech-recognition standard instead: an 80-bin log-mel spectrogram with 25 ms windows
(n_fft 400) every 10 ms (hop 160), as Whisper and Kaldi filterbanks use. It is 13x smaller
than a 1025-bin STFT image for the same second of speech, and resolves the 100 Hz-scale
formant structure where the linear axis spends most of its bins above 4 kHz. `kind="stft_db"`
with n_fft 2048 / hop 512 brings back the paper's picture. All of it is configurable.

Batches are right-padded: `audio_mask` marks each clip's valid samples, which must come first
in its row. Both branches see only the valid samples (the SSL encoder masks frames whose
receptive field reaches the padding; the spectrogram's padded frames are masked out of every
statistic), so a padded clip embeds as the clip alone (in inference mode).

`Model` returns a dict: 'speech' and 'spectrogram' (the vectors of the branches that run,
by `mode`), 'ssl/hidden' (batch, frames, ssl_dim) and 'ssl/frame_mask' (batch, frames) for
per-frame heads, and 'ctc/logits' (batch, frames, ctc_vocab_size) from the optional
auxiliary CTC head (`ctc_head`), trained with `clasp_jax.trainer.losses.ctc_loss`.

`load(config)` reads the pretrained SSL encoder named by `config.model.speech.checkpoint`;
its parameters go under `ssl_encoder`. The spectrogram encoder always starts at random.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from clasp_jax.common.config_args import ConfigError
from clasp_jax.models import precision as precision_lib
from clasp_jax.models import spectrogram
from clasp_jax.models import spectrogram_encoder
from clasp_jax.models import wav2vec2
from clasp_jax.models import wav2vec2_checkpoint

SAMPLE_RATE = 16_000
MODES = ("joint", "speech", "spectrogram")
SSL_INPUTS = ("waveform", "log_mel")
POOLINGS = ("mean", "mean_std")

# 80-bin log-mel, 25 ms windows every 10 ms at 16 kHz (see the module docstring).
DEFAULT_FRONT_END = spectrogram.FrontEnd(kind="log_mel", sample_rate=SAMPLE_RATE, n_fft=400,
                                         hop_length=160, n_mels=80, top_db=80.0)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that shapes the audio tower (hashable, so it can be a Flax module field).

  Attributes:
    ssl: the SSL encoder's architecture (without a CTC head of its own).
    layer: None or -1 pools the last hidden state; k in [0, num_hidden_layers] pools
      `hidden_states[k]` (0: the transformer's input, k: layer k's output).
    normalize_audio: standardise each clip (zero mean, unit variance over its valid samples)
      before the SSL encoder, as the checkpoint's feature extractor does with `do_normalize`.
    ssl_dropout: apply the SSL encoder's dropout and LayerDrop when training. False keeps it
      deterministic, as a frozen feature extractor should be (the paper's setting).
    remat: recompute each SSL transformer layer in the backward pass (fine-tuning memory).
    front_end: the spectrogram front-end.
    spectrogram: the spectrogram encoder's architecture.
    ctc_vocab_size: > 0 adds a Dense CTC head on the pooled layer's frames.
    ssl_input: what the SSL encoder's strided convolutions read: "waveform" (HuBERT and
      wav2vec2 as published: 1-D convolutions over the samples) or "log_mel" (the frames of
      `ssl_front_end`, standardised per clip over valid frames and bins, with the mel bins
      as the first convolution's channels: a speech-recognition front-end that a small
      encoder trained from scratch learns from far faster; such an encoder is not a Hugging
      Face HubertModel and does not convert to one).
    ssl_front_end: the SSL encoder's front-end when ssl_input is "log_mel" (computed once
      when it equals `front_end`).
    pooling: how the SSL frames become the 'speech' vector: "mean" over valid frames (the
      paper), or "mean_std" (their mean and standard deviation, concatenated: twice as wide;
      with a small encoder the spread says much of which sounds the clip holds, and a
      fusion encoder on these vectors retrieved 1.6x as often in a probe).
  """

  ssl: wav2vec2.Config = wav2vec2.Config(has_masked_spec_embed=False)
  layer: int | None = None
  normalize_audio: bool = True
  ssl_dropout: bool = False
  remat: bool = False
  front_end: spectrogram.FrontEnd = DEFAULT_FRONT_END
  spectrogram: spectrogram_encoder.Config = spectrogram_encoder.Config()
  ctc_vocab_size: int = 0
  ssl_input: str = "waveform"
  ssl_front_end: spectrogram.FrontEnd = DEFAULT_FRONT_END
  pooling: str = "mean"

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    if self.ssl_input not in SSL_INPUTS:
      raise ValueError(f"ssl_input must be one of {SSL_INPUTS}, got {self.ssl_input!r}")
    if self.ssl.ctc_vocab_size is not None:
      raise ValueError("the SSL encoder of the speech tower has no CTC head of its own "
                       "(ssl.ctc_vocab_size must be None); use ctc_vocab_size")
    if self.layer is not None and self.layer != -1 and not (
        0 <= self.layer <= self.ssl.num_hidden_layers):
      raise ValueError(f"layer must be -1 (last hidden state) or in [0, "
                       f"{self.ssl.num_hidden_layers}], got {self.layer}")
    if self.ctc_vocab_size < 0:
      raise ValueError(f"ctc_vocab_size must be >= 0, got {self.ctc_vocab_size}")
    if self.front_end.sample_rate != SAMPLE_RATE:
      raise ValueError(f"the front-end reads {SAMPLE_RATE} Hz audio, got sample_rate="
                       f"{self.front_end.sample_rate}")

  @property
  def pools_last_state(self) -> bool:
    return self.layer is None or self.layer == -1


def standardize_frames(images: jax.Array, frame_mask: jax.Array) -> jax.Array:
  """(batch, bins, frames) dB images -> (batch, frames, bins), each clip at zero mean and unit
  variance over its valid frames and all bins; padded frames 0."""
  frames = jnp.swapaxes(images, 1, 2).astype(jnp.float32)
  weights = frame_mask.astype(jnp.float32)[..., None]
  count = jnp.maximum(jnp.sum(weights, axis=(1, 2), keepdims=True) * frames.shape[-1], 1.0)
  mean = jnp.sum(frames * weights, axis=(1, 2), keepdims=True) / count
  variance = jnp.sum(jnp.square(frames - mean) * weights, axis=(1, 2), keepdims=True) / count
  return jnp.where(frame_mask[..., None], (frames - mean) * jax.lax.rsqrt(variance + 1e-5), 0.0)


def pool(hidden: jax.Array, frame_mask: jax.Array, pooling: str) -> jax.Array:
  """(batch, frames, dim) -> (batch, dim) mean over valid frames, or (batch, 2 dim) with their
  standard deviation after it ("mean_std"; rows without a valid frame give zeros)."""
  mean = wav2vec2.masked_mean(hidden, frame_mask)
  if pooling == "mean":
    return mean
  spread = wav2vec2.masked_mean(jnp.square(hidden.astype(jnp.float32) - mean[:, None]),
                                frame_mask)
  return jnp.concatenate([mean, jnp.sqrt(spread + 1e-6)], axis=-1)


def normalize_waveform(audio: jax.Array, audio_mask: jax.Array) -> jax.Array:
  """Per-clip zero mean and unit variance over valid samples; padding stays 0.

  Wav2Vec2FeatureExtractor's `do_normalize` on each clip alone: (x - mean) / sqrt(var + 1e-7),
  so silence stays finite (0) instead of dividing by zero.
  """
  weights = audio_mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
  mean = jnp.sum(audio * weights, axis=1, keepdims=True) / count
  variance = jnp.sum(jnp.square(audio - mean) * weights, axis=1, keepdims=True) / count
  return jnp.where(audio_mask, (audio - mean) * jax.lax.rsqrt(variance + 1e-7), 0.0)


class AudioSpeechTower(nn.Module):
  """(audio (batch, samples) float32 at 16 kHz, audio_mask (batch, samples) bool) -> dict.

  `mode` picks the branches as the fusion encoder's ablation modes do: 'speech' builds only
  the SSL encoder, 'spectrogram' only the spectrogram branch, 'joint' both. `axis_name`
  synchronises the spectrogram encoder's BatchNorm statistics in data-parallel training.
  """

  settings: Settings = Settings()
  mode: str = "joint"
  axis_name: str | None = None
  precision: str = "highest"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, audio: jax.Array, audio_mask: jax.Array, *, train: bool = False
               ) -> dict[str, jax.Array]:
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    precision_lib.validate(self.precision)
    if audio.ndim != 2 or audio_mask.shape != audio.shape:
      raise ValueError(f"audio and audio_mask must both be (batch, samples), got {audio.shape} "
                       f"and {audio_mask.shape}")
    settings = self.settings
    audio_mask = audio_mask.astype(bool)
    audio = jnp.where(audio_mask, audio.astype(jnp.float32), 0.0)
    lengths = jnp.sum(audio_mask, axis=1).astype(jnp.int32)
    out = {}
    front_ends = {}  # Each front-end's (images (batch, bins, frames), frame_mask), once.

    def spectrogram_of(front_end):
      if front_end not in front_ends:
        front_ends[front_end] = front_end(audio, lengths)
      return front_ends[front_end]

    if self.mode in ("joint", "speech"):
      if settings.ssl_input == "log_mel":
        images, image_mask = spectrogram_of(settings.ssl_front_end)
        ssl_input = standardize_frames(images, image_mask)  # (batch, frames, bins)
        ssl_lengths = jnp.sum(image_mask, axis=1).astype(jnp.int32)
      else:
        ssl_input = normalize_waveform(audio, audio_mask) if settings.normalize_audio else audio
        ssl_lengths = lengths
      ssl_encoder = wav2vec2.Model(settings.ssl, dtype=self.dtype, remat=settings.remat,
                                   precision=self.precision, name="ssl_encoder")
      outputs = ssl_encoder(ssl_input, ssl_lengths,
                            deterministic=not (train and settings.ssl_dropout),
                            output_hidden_states=not settings.pools_last_state)
      hidden = (outputs["last_hidden_state"] if settings.pools_last_state
                else outputs["hidden_states"][settings.layer])
      frame_mask = outputs["frame_mask"]
      out["speech"] = pool(hidden, frame_mask, settings.pooling)  # (batch, ssl_dim [x 2])
      out["ssl/hidden"] = hidden
      out["ssl/frame_mask"] = frame_mask
      if settings.ctc_vocab_size:
        with precision_lib.scope(self.precision):
          out["ctc/logits"] = nn.Dense(settings.ctc_vocab_size, dtype=self.dtype,
                                       name="ctc_head")(hidden)
    if self.mode in ("joint", "spectrogram"):
      images, frame_mask = spectrogram_of(settings.front_end)
      out["spectrogram"] = spectrogram_encoder.Model(
          settings.spectrogram, dtype=self.dtype, precision=self.precision,
          axis_name=self.axis_name, name="spectrogram_encoder")(images, frame_mask, train=train)
    return out


Model = AudioSpeechTower


def _ssl_from_config(speech: ml_collections.ConfigDict) -> tuple[wav2vec2.Config, bool]:
  """The SSL architecture and whether to standardise its input: the checkpoint's when one is
  named (read from its config files, not its weights), else `speech.ssl` at random init."""
  if speech.checkpoint:
    try:
      config, preprocessing = wav2vec2_checkpoint.read_config(speech.checkpoint)
    except wav2vec2_checkpoint.CheckpointError as error:
      raise ConfigError(f"config.model.speech.checkpoint: {error}") from None
    if preprocessing.sampling_rate != SAMPLE_RATE:
      raise ConfigError(f"config.model.speech.checkpoint {speech.checkpoint} expects "
                        f"{preprocessing.sampling_rate} Hz audio; the tower reads {SAMPLE_RATE} Hz")
    # A `*ForCTC` checkpoint's head maps to its own characters; `load` leaves it out.
    return dataclasses.replace(config, ctc_vocab_size=None), preprocessing.do_normalize
  hf_config = dict(speech.ssl)
  do_normalize = bool(hf_config.pop("do_normalize", True))
  # No SpecAugment embedding: nothing here masks time steps, so it would be a dead parameter.
  hf_config.setdefault("mask_time_prob", 0.0)
  try:
    return wav2vec2.Config.from_hf_dict(hf_config, with_ctc_head=False), do_normalize
  except (ValueError, TypeError) as error:
    raise ConfigError(f"config.model.speech.ssl: {error}") from None


def settings_from_config(speech: ml_collections.ConfigDict) -> Settings:
  """`Settings` from `config.model.speech` (see configs/base.py for the fields)."""
  ssl, normalize_audio = _ssl_from_config(speech)
  spec = speech.spectrogram
  try:
    front_end = spectrogram.FrontEnd(kind=spec.kind, sample_rate=SAMPLE_RATE, n_fft=spec.n_fft,
                                     hop_length=spec.hop_length, n_mels=spec.n_mels,
                                     top_db=spec.top_db if spec.top_db > 0 else None)
    num_stages = spec.num_stages
    if not 1 <= num_stages <= len(spectrogram_encoder.EFFICIENTNET_B0_STAGES):
      raise ValueError(f"num_stages must be in [1, "
                       f"{len(spectrogram_encoder.EFFICIENTNET_B0_STAGES)}], got {num_stages}")
    encoder = spectrogram_encoder.Config(
        width_multiplier=spec.width_multiplier, depth_multiplier=spec.depth_multiplier,
        stem_channels=spec.stem_channels, head_channels=spec.head_channels,
        output_dim=spec.output_dim,
        dropout_rate=spec.get("dropout_rate", spectrogram_encoder.Config.dropout_rate),
        stages=spectrogram_encoder.EFFICIENTNET_B0_STAGES[:num_stages])
  except ValueError as error:
    raise ConfigError(f"config.model.speech.spectrogram: {error}") from None
  # A character vocabulary (config.model.speech.ctc_vocabulary) sizes the head: blank + chars.
  vocabulary = speech.get("ctc_vocabulary", "")
  ctc_vocab_size = len(vocabulary) + 1 if vocabulary else speech.ctc_vocab_size
  ssl_input = speech.get("ssl_input", "waveform")
  if ssl_input != "waveform" and speech.checkpoint:
    raise ConfigError(f"config.model.speech.ssl_input={ssl_input!r} is for an SSL encoder "
                      f"trained from scratch; the checkpoint {speech.checkpoint} reads waveforms")
  try:
    return Settings(ssl=ssl, layer=speech.layer, normalize_audio=normalize_audio,
                    ssl_dropout=speech.ssl_dropout, remat=speech.remat, front_end=front_end,
                    spectrogram=encoder, ctc_vocab_size=ctc_vocab_size, ssl_input=ssl_input,
                    pooling=speech.get("pooling", "mean"))
  except ValueError as error:
    raise ConfigError(f"config.model.speech: {error}") from None


def load(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """Pretrained `ssl_encoder` parameters of `config.model.speech.checkpoint` (None: random init).

  Loading is strict (every tensor the module needs, no tensor unused), except that the CTC
  head of a `*ForCTC` checkpoint is dropped on purpose: the tower pools hidden states, and
  an auxiliary CTC head (`ctc_vocab_size`) has its own vocabulary.
  """
  speech = config.model.speech
  if speech.kind != "audio" or not speech.checkpoint:
    return None
  try:
    checkpoint = wav2vec2_checkpoint.load(speech.checkpoint)
  except wav2vec2_checkpoint.CheckpointError as error:
    raise ConfigError(f"config.model.speech.checkpoint: {error}") from None
  params = dict(checkpoint.params)
  if params.pop("lm_head", None) is not None:
    logging.info("%s: its CTC head (lm_head) is not part of the speech tower; left out",
                 speech.checkpoint)
  return params
