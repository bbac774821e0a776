"""The Python API over a trained workdir: `clasp_jax.load(W)` returns a `Clasp`.

  model = clasp_jax.load("/runs/clasp")
  zspeech = model.embed_speech(["a.wav", "b.flac"])      # or 16 kHz float arrays
  ztext = model.embed_text(["a spoken sentence"])
  scores = model.similarity(ztext, zspeech)               # (1, 2) cosine matrix

Audio files are read as `embed clasp` reads them (any common format, mixed to mono, resampled
to 16 kHz) and prepared as the training pipeline prepared its clips; rows are what the
trainer's evaluators score. Feature-mode models (the paper's) embed precomputed SSL and
spectrogram vectors with `embed_features`.
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np

from clasp_jax.data import audio_io
from clasp_jax.inference import workdir as workdir_lib

SpeechInput = Union[str, os.PathLike, np.ndarray]


class Clasp:
  """A trained CLASP model (wraps `inference.workdir.TrainedModel`, kept as `.trained`)."""

  def __init__(self, trained: workdir_lib.TrainedModel):
    self.trained = trained

  @property
  def config(self):
    return self.trained.config

  @property
  def step(self) -> int:
    return self.trained.step

  @property
  def embed_dim(self) -> int:
    return self.trained.built.embed_dim

  @property
  def speech_kind(self) -> str:
    """'audio' (embeds waveforms) or 'features' (embeds precomputed feature vectors)."""
    return self.trained.speech_kind

  def __repr__(self) -> str:
    return (f"Clasp({self.trained.workdir!r}, step={self.step}, speech={self.speech_kind}, "
            f"dim={self.embed_dim})")

  def embed_speech(self, inputs: Sequence[SpeechInput], *, batch_size: int = 16) -> np.ndarray:
    """(n, embed_dim) unit rows: audio file paths, or 16 kHz mono float waveforms, or a mix."""
    if isinstance(inputs, (str, os.PathLike)) or (isinstance(inputs, np.ndarray) and
                                                   inputs.ndim == 1):
      raise TypeError("embed_speech takes a list of paths or waveforms; wrap one in a list")
    if self.speech_kind != "audio":
      raise ValueError(f"{self.trained.workdir} is a feature-mode model: it embeds precomputed "
                       "SSL and spectrogram vectors with embed_features(speech=, spectrogram=)")
    waveforms = []
    for item in inputs:
      if isinstance(item, (str, os.PathLike)):
        try:
          waveforms.append(audio_io.load_audio(os.fspath(item), audio_io.TARGET_SAMPLE_RATE))
        except audio_io.UnusableInputError as error:
          raise ValueError(str(error)) from None
      else:
        waveform = np.asarray(item, np.float32)
        if waveform.ndim != 1:
          raise ValueError(f"a waveform must be 1-D (mono 16 kHz samples), got shape "
                           f"{waveform.shape}")
        waveforms.append(waveform)
    return self.trained.embed_waveforms(waveforms, batch_size=batch_size)

  def embed_text(self, sentences: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """(n, embed_dim) unit rows from the model's own text tower."""
    if isinstance(sentences, str):
      raise TypeError("embed_text takes a list of sentences; wrap one in a list")
    return self.trained.embed_texts(list(sentences), batch_size=batch_size)

  def embed_features(self, speech: np.ndarray | None = None,
                     spectrogram: np.ndarray | None = None, *,
                     normalize: bool = True) -> np.ndarray:
    """Feature-mode models: (n, embed_dim) from (n, ssl_dim) / (n, spectrogram_dim) vectors.

    `normalize=False` returns the fusion encoder's raw output, the number a PyTorch port
    (clasp_jax.torch, or the authors' classes) must match.
    """
    return self.trained.embed_features(speech=speech, spectrogram=spectrogram,
                                       normalize=normalize)

  @staticmethod
  def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix of the rows of `a` and `b`: (n, d), (m, d) -> (n, m)."""
    a, b = np.atleast_2d(np.asarray(a, np.float32)), np.atleast_2d(np.asarray(b, np.float32))
    if a.shape[-1] != b.shape[-1]:
      raise ValueError(f"embeddings of different widths: {a.shape} and {b.shape}")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit(a) @ unit(b).T  # (n, d) @ (d, m) -> (n, m)


def load(workdir: str | os.PathLike, *, checkpoint: int | str = "best") -> Clasp:
  """The model of a training workdir at `checkpoint` ('best', 'latest' or a step)."""
  return Clasp(workdir_lib.load_trained(os.fspath(workdir), checkpoint=checkpoint))
