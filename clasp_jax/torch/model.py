"""The whole CLASP forward in PyTorch, from a 16 kHz waveform to the speech embedding.

Each part restates its Flax counterpart for inference (eval mode), reading the folder that
`clasp_jax.convert --to=torch` writes:

  - waveform: cropped to the training clip length, at 16-bit precision, peak-normalised when
    the model was trained so (`TrainedModel.prepare_waveform`);
  - `ssl_encoder`: transformers' HubertModel / Wav2Vec2Model on the standardised waveform, its
    `ssl_layer` mean-pooled over time (models/speech_tower.py);
  - `FrontEnd`: the dB spectrogram with `torch.stft` (models/spectrogram.py: librosa's
    centring, periodic window, mel filters and per-clip `top_db` floor);
  - `SpectrogramEncoder`: the EfficientNet-style CNN with our Flax layer names
    (models/spectrogram_encoder.py);
  - `FusionEncoder`: the fusion encoder with the authors' layer names (`audio_seq.N`, ...);
  - the L2-normalised embedding.

Clips are embedded one at a time: the Flax model's padded batches are built to equal each
clip alone, so a clip alone is the reference, and no padding logic is restated here.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clasp_jax.models import spectrogram as spectrogram_lib
from clasp_jax.models import spectrogram_encoder as encoder_lib

INT16_SCALE = 32768.0


# ------------------------------------------------------------------ Front-end.


class FrontEnd(nn.Module):
  """(samples,) float waveform -> (bins, frames) dB image, as `spectrogram.FrontEnd`."""

  def __init__(self, settings: dict):
    super().__init__()
    self.settings = dict(settings)
    s = self.settings
    window = spectrogram_lib.stft_window(s["window"], s["n_fft"], s.get("win_length"))
    self.register_buffer("window", torch.from_numpy(window), persistent=False)
    if s["kind"] == "log_mel":
      filters = spectrogram_lib.mel_filterbank(s["sample_rate"], s["n_fft"], s["n_mels"],
                                               s["fmin"], s["fmax"], s["htk"], s["mel_norm"])
      self.register_buffer("mel_filters", torch.from_numpy(filters), persistent=False)
    elif s["kind"] != "stft_db":
      raise ValueError(f"unknown front-end kind {s['kind']!r}")

  def forward(self, waveform: torch.Tensor) -> torch.Tensor:
    s = self.settings
    spectrum = torch.stft(waveform, s["n_fft"], s["hop_length"], win_length=s["n_fft"],
                          window=self.window, center=s["center"], pad_mode="constant",
                          return_complex=True)  # (freq, frames)
    power = spectrum.real.square() + spectrum.imag.square()
    if s["kind"] == "stft_db":
      amin = (1e-5 if s["amin"] is None else s["amin"]) ** 2
      ref = s["ref"] if s["ref"] == "max" else float(s["ref"]) ** 2
    else:
      if s["power"] != 2.0:
        power = power.sqrt() ** s["power"]
      power = self.mel_filters @ power  # (mels, freq) @ (freq, frames) -> (mels, frames)
      amin = 1e-10 if s["amin"] is None else s["amin"]
      ref = s["ref"]
    to_db = lambda x: 10.0 * torch.log10(torch.clamp(x, min=amin))
    largest = power.max()
    ref_db = to_db(largest) if ref == "max" else to_db(torch.tensor(abs(float(ref))))
    decibels = to_db(power) - ref_db
    if s["top_db"] is not None:
      decibels = torch.maximum(decibels, to_db(largest) - ref_db - s["top_db"])
    return decibels


# ------------------------------------------------------------------ Spectrogram encoder.


def encoder_config(settings: dict) -> encoder_lib.Config:
  settings = dict(settings)
  settings["stages"] = tuple(encoder_lib.StageSpec(**stage) for stage in settings["stages"])
  return encoder_lib.Config(**settings)


class ConvBnAct(nn.Module):
  def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1,
               activate=True, eps=1e-3):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                          padding=(kernel_size - 1) // 2, groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(out_channels, eps=eps)
    self.activate = activate

  def forward(self, x):
    x = self.bn(self.conv(x))
    return F.silu(x) if self.activate else x


class SqueezeExcitation(nn.Module):
  def __init__(self, channels, reduced):
    super().__init__()
    self.reduce = nn.Conv2d(channels, reduced, 1)
    self.expand = nn.Conv2d(reduced, channels, 1)

  def forward(self, x):
    gates = torch.sigmoid(self.expand(F.silu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))
    return x * gates


class MBConv(nn.Module):
  def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride, config):
    super().__init__()
    hidden = in_channels * expand_ratio
    eps = config.batch_norm_epsilon
    self.expand = (ConvBnAct(in_channels, hidden, 1, eps=eps) if expand_ratio != 1 else None)
    self.depthwise = ConvBnAct(hidden, hidden, kernel_size, stride, groups=hidden, eps=eps)
    self.se = SqueezeExcitation(hidden, max(1, int(in_channels *
                                                   config.squeeze_excitation_ratio)))
    self.project = ConvBnAct(hidden, out_channels, 1, activate=False, eps=eps)
    self.residual = stride == 1 and in_channels == out_channels

  def forward(self, x):
    y = self.expand(x) if self.expand is not None else x
    y = self.project(self.se(self.depthwise(y)))
    return y + x if self.residual else y


class SpectrogramEncoder(nn.Module):
  """(batch, bins, frames) dB images -> (batch, output_dim): `spectrogram_encoder.Model`."""

  def __init__(self, config: encoder_lib.Config):
    super().__init__()
    eps = config.batch_norm_epsilon
    self.input_norm = nn.BatchNorm2d(1, eps=eps)
    channels = config.scaled_channels(config.stem_channels)
    self.stem = ConvBnAct(1, channels, 3, 2, eps=eps)
    self.block_names = []
    for stage_index, stage in enumerate(config.stages):
      for repeat in range(config.scaled_repeats(stage.repeats)):
        out_channels = config.scaled_channels(stage.channels)
        name = f"stage{stage_index}_block{repeat}"
        self.add_module(name, MBConv(channels, out_channels, stage.expand_ratio,
                                     stage.kernel_size, stage.stride if repeat == 0 else 1,
                                     config))
        self.block_names.append(name)
        channels = out_channels
    head = config.scaled_channels(config.head_channels)
    self.head = ConvBnAct(channels, head, 1, eps=eps)
    self.classifier = nn.Linear(head, config.output_dim)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.input_norm(images[:, None])  # (batch, 1, bins, frames)
    x = self.stem(x)
    for name in self.block_names:
      x = getattr(self, name)(x)
    x = self.head(x)
    return self.classifier(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------ Fusion encoder.


def _branch(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
  return nn.Sequential(
      nn.Linear(in_dim, hidden[0]), nn.BatchNorm1d(hidden[0]), nn.ReLU(), nn.Dropout(0.15),
      nn.Linear(hidden[0], hidden[1]), nn.BatchNorm1d(hidden[1]), nn.LeakyReLU(),
      nn.Dropout(0.1), nn.Linear(hidden[1], out_dim))


class FusionEncoder(nn.Module):
  """The fusion encoder under the authors' layer names, at any widths and in any mode.

  concat: `audio_seq`, `image_seq`, `mix_seq`; gated: `text_seq`, `image_seq`,
  `input_gate_text`, `forget_gate_image`, `tanh_text`, ..., `weight`. A single-branch mode
  builds its one branch only.
  """

  def __init__(self, fusion: dict):
    super().__init__()
    self.kind, self.mode = fusion["kind"], fusion["mode"]
    self.normalize_inputs = bool(fusion["normalize_inputs"])
    dim, inputs = fusion["embed_dim"], fusion["inputs"]
    speech_name = "audio_seq" if self.kind == "concat" else "text_seq"
    self.speech_name = speech_name
    if self.mode in ("joint", "speech"):
      self.add_module(speech_name, _branch(inputs["speech"], fusion["speech_branch_hidden"], dim))
    if self.mode in ("joint", "spectrogram"):
      self.image_seq = _branch(inputs["spectrogram"], fusion["spectrogram_branch_hidden"], dim)
    if self.mode == "joint" and self.kind == "concat":
      hidden = fusion["fusion_hidden"]
      self.mix_seq = nn.Sequential(
          nn.Linear(2 * dim, hidden[0]), nn.BatchNorm1d(hidden[0]), nn.LeakyReLU(),
          nn.Linear(hidden[0], hidden[1]), nn.LeakyReLU(), nn.Linear(hidden[1], dim))
    elif self.mode == "joint":
      gate = lambda activation: nn.Sequential(nn.Linear(dim, dim), activation)
      self.input_gate_text, self.input_gate_image = gate(nn.Sigmoid()), gate(nn.Sigmoid())
      self.forget_gate_text, self.forget_gate_image = gate(nn.Sigmoid()), gate(nn.Sigmoid())
      self.tanh_text, self.tanh_image = gate(nn.Tanh()), gate(nn.Tanh())
      self.weight = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.Softmax(dim=1))

  def forward(self, speech: torch.Tensor | None, spectrogram: torch.Tensor | None):
    """The un-normalised speech embedding (the Flax FusionEncoder's output)."""
    if self.normalize_inputs:
      speech = None if speech is None else F.normalize(speech, dim=-1)
      spectrogram = None if spectrogram is None else F.normalize(spectrogram, dim=-1)
    if self.mode == "speech":
      return getattr(self, self.speech_name)(speech)
    if self.mode == "spectrogram":
      return self.image_seq(spectrogram)
    x1 = getattr(self, self.speech_name)(speech)
    x2 = self.image_seq(spectrogram)
    if self.kind == "concat":
      return self.mix_seq(torch.cat([x1, x2], dim=1))
    x1 = self.input_gate_text(x1) * self.tanh_text(x1) + self.forget_gate_text(x1) * x1
    x2 = self.input_gate_image(x2) * self.tanh_image(x2) + self.forget_gate_image(x2) * x2
    weights = self.weight(torch.cat([x1, x2], dim=1))
    width = x1.shape[1]
    return weights[:, :width] * x1 + weights[:, width:] * x2


# ------------------------------------------------------------------ The whole model.


class ClaspTorch(nn.Module):
  """A converted CLASP model; build it with `load(folder)`."""

  def __init__(self, settings: dict, folder: str):
    super().__init__()
    self.settings = settings
    self.speech_kind = settings["speech_kind"]
    self.fusion = FusionEncoder(settings["fusion"])
    self.audio = settings.get("audio")
    self.ssl_encoder = None
    self.front_end = self.spectrogram_encoder = None
    if self.speech_kind == "audio":
      if self.audio.get("ssl_encoder"):
        import transformers  # pylint: disable=g-import-not-at-top
        self.ssl_encoder = transformers.AutoModel.from_pretrained(
            os.path.join(folder, self.audio["ssl_encoder"]))
      if self.fusion.mode in ("joint", "spectrogram"):
        self.front_end = FrontEnd(self.audio["front_end"])
        self.spectrogram_encoder = SpectrogramEncoder(
            encoder_config(self.audio["spectrogram_encoder"]))
    self.text_encoder = None
    if settings.get("text_encoder"):
      import sentence_transformers  # pylint: disable=g-import-not-at-top
      self.text_encoder = sentence_transformers.SentenceTransformer(
          os.path.join(folder, settings["text_encoder"]), device="cpu")
    self.eval()

  def prepare_waveform(self, waveform: np.ndarray) -> torch.Tensor:
    """The clip as the training pipeline fed it: 16-bit precision, cropped, peak-normalised."""
    clip = np.asarray(waveform, np.float32)
    clip = np.clip(np.round(clip * INT16_SCALE), -32768, 32767) / INT16_SCALE
    clip = clip[:int(round(self.audio["max_duration_s"] * self.audio["sample_rate"]))]
    if self.audio["peak_normalize"]:
      clip = clip / max(float(np.max(np.abs(clip))) if clip.size else 0.0, 1e-6)
    return torch.from_numpy(clip.astype(np.float32))

  def speech_features(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
    """One prepared clip (samples,) -> the fusion encoder's inputs, each (1, dim)."""
    features = {}
    if self.ssl_encoder is not None:
      x = waveform
      if self.audio["normalize_audio"]:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
      layer = self.audio["ssl_layer"]
      outputs = self.ssl_encoder(x[None], output_hidden_states=layer not in (None, -1))
      hidden = (outputs.last_hidden_state if layer in (None, -1)
                else outputs.hidden_states[layer])
      features["speech"] = hidden.mean(dim=1)
    if self.spectrogram_encoder is not None:
      features["spectrogram"] = self.spectrogram_encoder(self.front_end(waveform)[None])
    return features

  def forward(self, waveform: torch.Tensor) -> torch.Tensor:
    """One prepared clip (samples,) -> its (1, embed_dim) unit-norm speech embedding."""
    features = self.speech_features(waveform)
    embedding = self.fusion(features.get("speech"), features.get("spectrogram"))
    return F.normalize(embedding, dim=-1)

  @torch.no_grad()
  def embed_speech(self, waveforms: Sequence[np.ndarray]) -> np.ndarray:
    """(n, embed_dim) unit rows of 16 kHz mono clips (audio-mode models)."""
    if self.speech_kind != "audio":
      raise ValueError("a feature-mode model embeds feature vectors: use embed_features")
    rows = [self(self.prepare_waveform(waveform))[0].numpy() for waveform in waveforms]
    return np.stack(rows) if rows else np.zeros((0, self.settings["embed_dim"]), np.float32)

  @torch.no_grad()
  def embed_features(self, speech=None, spectrogram=None, normalize: bool = True) -> np.ndarray:
    """The fusion encoder on feature vectors; `normalize=False` gives its raw output."""
    as_tensor = lambda x: None if x is None else torch.as_tensor(np.asarray(x, np.float32))
    embedding = self.fusion(as_tensor(speech), as_tensor(spectrogram))
    return (F.normalize(embedding, dim=-1) if normalize else embedding).numpy()

  @torch.no_grad()
  def embed_text(self, sentences: Sequence[str]) -> np.ndarray:
    if self.text_encoder is None:
      raise ValueError("this model has no text tower: its text embeddings were precomputed")
    return self.text_encoder.encode(list(sentences), convert_to_numpy=True,
                                    normalize_embeddings=True)


def _load_state(module: nn.Module, path: str) -> None:
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  module.load_state_dict(load_file(path), strict=True)


def load(folder: str | os.PathLike) -> ClaspTorch:
  """The model of a `clasp_jax.convert --to=torch` folder, in eval mode."""
  folder = os.fspath(folder)
  path = os.path.join(folder, "clasp.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder}: no clasp.json (not a clasp_jax.convert --to=torch folder)")
  with open(path) as f:
    settings = json.load(f)
  model = ClaspTorch(settings, folder)
  _load_state(model.fusion, os.path.join(folder, "fusion.safetensors"))
  if model.spectrogram_encoder is not None:
    _load_state(model.spectrogram_encoder, os.path.join(folder,
                                                        "spectrogram_encoder.safetensors"))
  return model.eval()
