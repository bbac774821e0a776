"""The CLASP fusion encoder: speech SSL features + spectrogram features -> one embedding.

Layer widths, dropout rates, BatchNorm and LeakyReLU follow the authors' PyTorch module (see
CLASP_REFERENCE.md, Pipeline 4); widths are configurable with the paper's as defaults, per
branch (the authors' wav2vec2 ablation widens its speech branch to 700 -> 576).

`normalize_inputs` L2-normalises each SSL and spectrogram vector before its branch, as the
authors did (`F.normalize`; their released weights expect it). It is off by default: a
workdir trained before the setting existed was trained on raw features and must embed the
same way when it is loaded again, and the raw norm of a mean-pooled SSL vector is information
the project's own runs may learn to use; the paper config turns it on.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clasp_jax.models import precision
from clasp_jax.models.layers import BatchNorm, Linear, leaky_relu

FUSIONS = ("concat", "gated")
MODES = ("joint", "speech", "spectrogram")
BRANCHES = ("mlp", "linear")


class Branch(nn.Module):
  """Linear BN ReLU Dropout Linear BN LeakyReLU Dropout Linear (one per input modality)."""

  hidden: Sequence[int] = (768, 576)
  out_dim: int = 768
  dropout: Sequence[float] = (0.15, 0.1)
  axis_name: str | None = None

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    x = Linear(self.hidden[0], name="linear_0")(features)
    x = BatchNorm(axis_name=self.axis_name, name="norm_0")(x, train=train)
    x = nn.relu(x)
    x = nn.Dropout(self.dropout[0], deterministic=not train)(x)
    x = Linear(self.hidden[1], name="linear_1")(x)
    x = BatchNorm(axis_name=self.axis_name, name="norm_1")(x, train=train)
    x = leaky_relu(x)
    x = nn.Dropout(self.dropout[1], deterministic=not train)(x)
    return Linear(self.out_dim, name="linear_2")(x)


class LinearBranch(nn.Module):
  """One linear map of the input vector to the embedding."""

  out_dim: int = 768

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    del train
    return Linear(self.out_dim, name="linear")(features)


class NoisyStandardisation(nn.Module):
  """Optionally standardises a vector by running statistics, then, while training, adds
  Gaussian noise of standard deviation `noise` (from the 'dropout' random stream)."""

  standardise: bool = False
  noise: float = 0.0
  axis_name: str | None = None

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    if self.standardise:
      features = BatchNorm(axis_name=self.axis_name, affine=False, name="norm")(
          features, train=train)
    if train and self.noise > 0:
      features = features + self.noise * jax.random.normal(
          self.make_rng("dropout"), features.shape, features.dtype)
    return features


class ConcatFusion(nn.Module):
  """cat(speech, spectrogram) -> Linear BN LeakyReLU Linear LeakyReLU Linear."""

  hidden: Sequence[int] = (1024, 800)
  out_dim: int = 768
  axis_name: str | None = None

  @nn.compact
  def __call__(self, speech: jax.Array, spectrogram: jax.Array, *, train: bool) -> jax.Array:
    x = jnp.concatenate([speech, spectrogram], axis=-1)
    x = Linear(self.hidden[0], name="linear_0")(x)
    x = BatchNorm(axis_name=self.axis_name, name="norm_0")(x, train=train)
    x = leaky_relu(x)
    x = Linear(self.hidden[1], name="linear_1")(x)
    x = leaky_relu(x)
    return Linear(self.out_dim, name="linear_2")(x)


class Gate(nn.Module):
  """LSTM-like gating of one branch: x' = input_gate * candidate + forget_gate * x."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    input_gate = nn.sigmoid(Linear(width, name="input_gate")(x))
    forget_gate = nn.sigmoid(Linear(width, name="forget_gate")(x))
    candidate = jnp.tanh(Linear(width, name="candidate")(x))
    return input_gate * candidate + forget_gate * x


class GatedFusion(nn.Module):
  """Gates each branch, then mixes them with per-feature softmax weights over both."""

  @nn.compact
  def __call__(self, speech: jax.Array, spectrogram: jax.Array, *, train: bool) -> jax.Array:
    del train  # No BatchNorm or dropout in the gated mix.
    speech = Gate(name="speech_gate")(speech)
    spectrogram = Gate(name="spectrogram_gate")(spectrogram)
    both = jnp.concatenate([speech, spectrogram], axis=-1)  # (n, 2d)
    weights = nn.softmax(Linear(both.shape[-1], name="mix_weights")(both), axis=-1)
    width = speech.shape[-1]
    return weights[:, :width] * speech + weights[:, width:] * spectrogram


def l2_normalize_inputs(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) over the last axis: PyTorch's F.normalize, the authors' input step."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


class FusionEncoder(nn.Module):
  """Maps (speech features, spectrogram features) to an un-normalised speech embedding.

  `mode` selects the ablation: both branches fused ('joint'), or one branch alone.
  `branch_hidden` gives both branches' hidden widths; `speech_branch_hidden` /
  `spectrogram_branch_hidden` override it per branch (empty: `branch_hidden`).
  `normalize_inputs` L2-normalises both input vectors first (see the module docstring).
  `branch` ('mlp': the paper's; 'linear'), `input_norm` and `input_noise`: see the module
  docstring.
  `precision` names the matmul precision (`clasp_jax.models.precision`): "highest" computes
  as PyTorch's float32 does on every backend.
  """

  fusion: str = "concat"
  mode: str = "joint"
  embed_dim: int = 768
  branch_hidden: Sequence[int] = (768, 576)
  branch_dropout: Sequence[float] = (0.15, 0.1)
  fusion_hidden: Sequence[int] = (1024, 800)
  axis_name: str | None = None
  precision: str = "highest"
  speech_branch_hidden: Sequence[int] = ()
  spectrogram_branch_hidden: Sequence[int] = ()
  normalize_inputs: bool = False
  branch: str = "mlp"
  input_norm: bool = False
  input_noise: float = 0.0

  def setup(self):
    if self.fusion not in FUSIONS:
      raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.branch not in BRANCHES:
      raise ValueError(f"branch must be one of {BRANCHES}, got {self.branch!r}")
    if not self.input_noise >= 0:
      raise ValueError(f"input_noise must be at least 0, got {self.input_noise}")
    widths = {"speech": tuple(self.speech_branch_hidden or self.branch_hidden),
              "spectrogram": tuple(self.spectrogram_branch_hidden or self.branch_hidden)}
    for name, hidden in widths.items():
      if len(hidden) != 2 or min(hidden) < 1:
        raise ValueError(f"the {name} branch needs two positive hidden widths, got {hidden}")
    def make_branch(name):
      if self.branch == "linear":
        return LinearBranch(out_dim=self.embed_dim)
      return Branch(hidden=widths[name], out_dim=self.embed_dim,
                    dropout=tuple(self.branch_dropout), axis_name=self.axis_name)
    def make_input():
      return NoisyStandardisation(standardise=self.input_norm, noise=self.input_noise,
                                  axis_name=self.axis_name)
    if self.mode in ("joint", "speech"):
      self.speech_branch = make_branch("speech")
      self.speech_input = make_input()
    if self.mode in ("joint", "spectrogram"):
      self.spectrogram_branch = make_branch("spectrogram")
      self.spectrogram_input = make_input()
    if self.mode == "joint":
      if self.fusion == "concat":
        self.mix = ConcatFusion(hidden=tuple(self.fusion_hidden), out_dim=self.embed_dim,
                                axis_name=self.axis_name)
      else:
        self.mix = GatedFusion()

  def __call__(self, speech: jax.Array | None, spectrogram: jax.Array | None, *,
               train: bool) -> jax.Array:
    with precision.scope(self.precision):
      if self.normalize_inputs:
        speech = None if speech is None else l2_normalize_inputs(speech)
        spectrogram = None if spectrogram is None else l2_normalize_inputs(spectrogram)
      if self.mode in ("joint", "speech"):
        speech = self.speech_input(speech, train=train)
      if self.mode in ("joint", "spectrogram"):
        spectrogram = self.spectrogram_input(spectrogram, train=train)
      if self.mode == "speech":
        return self.speech_branch(speech, train=train)
      if self.mode == "spectrogram":
        return self.spectrogram_branch(spectrogram, train=train)
      return self.mix(self.speech_branch(speech, train=train),
                      self.spectrogram_branch(spectrogram, train=train), train=train)
