"""A Flax CNN over a spectrogram image: EfficientNet-style MBConv blocks with squeeze-excitation.

CLASP drew each spectrogram with matplotlib and fed the PNG to an ImageNet EfficientNet-B7,
taking its 1000 class logits as the feature. This encoder reads the dB spectrogram itself
(one channel, frequency x time) and is trained with the rest of the model; it keeps the
1000-d output so the fusion encoder's spectrogram branch is unchanged.

Padded batches: only the time axis is padded. After every layer the padded time steps are
zeroed, convolutions pad with ((k - 1) // 2) zeros on both sides, and every pooling and
batch statistic counts valid steps only, so a padded row gives the same output as the clip
alone (in inference mode).

Data parallelism: with `axis_name` set (the 'data' axis of a shard_map or pmap), every
BatchNorm takes its training statistics over the valid positions of the global batch, so
each device normalises as one large batch would and all devices keep identical running
statistics. Flax's `nn.BatchNorm(axis_name=..., mask=...)` would average the per-device
masked means instead, which weighs a device of short clips as much as one of long clips.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clasp_jax.models import precision


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of MBConv blocks (EfficientNet-B0 naming)."""

  expand_ratio: int
  channels: int
  repeats: int
  stride: int
  kernel_size: int


# EfficientNet-B0's stages; width and depth multipliers scale them as in the paper.
EFFICIENTNET_B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 16, 1, 1, 3),
    StageSpec(6, 24, 2, 2, 3),
    StageSpec(6, 40, 2, 2, 5),
    StageSpec(6, 80, 3, 2, 3),
    StageSpec(6, 112, 3, 1, 5),
    StageSpec(6, 192, 4, 2, 5),
    StageSpec(6, 320, 1, 1, 3),
)


@dataclasses.dataclass(frozen=True)
class Config:
  """Width/depth-scaled EfficientNet. The small default (0.5 x 0.5 of B0, ~1.3M parameters)
  trains from scratch on a few hundred hours of speech; B0 is width=depth=1."""

  width_multiplier: float = 0.5
  depth_multiplier: float = 0.5
  stem_channels: int = 32
  head_channels: int = 1280
  output_dim: int = 1000
  squeeze_excitation_ratio: float = 0.25
  dropout_rate: float = 0.2
  stages: tuple[StageSpec, ...] = EFFICIENTNET_B0_STAGES
  batch_norm_momentum: float = 0.99
  batch_norm_epsilon: float = 1e-3

  def scaled_channels(self, channels: int, divisor: int = 8) -> int:
    """EfficientNet's round_filters: scale, round to a multiple of 8, never drop below 90%."""
    scaled = channels * self.width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
      rounded += divisor
    return int(rounded)

  def scaled_repeats(self, repeats: int) -> int:
    return int(math.ceil(self.depth_multiplier * repeats))


def downsampled_lengths(lengths: jax.Array, stride: int) -> jax.Array:
  """Valid steps after a stride-`stride` conv with (k - 1) // 2 zero padding (odd k)."""
  return (lengths + stride - 1) // stride


def _time_mask(lengths: jax.Array, width: int) -> jax.Array:
  """(batch,) -> (batch, 1, width, 1) float mask for NHWC images with time as W."""
  return (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.float32)[:, None, :, None]


class MaskedBatchNorm(nn.Module):
  """Flax BatchNorm semantics (names, momentum, biased running variance) over valid positions.

  `mask` marks the positions that count towards the statistics; the normalisation itself is
  applied everywhere (callers zero the padding afterwards). Statistics are sums and counts,
  combined with `psum` over `axis_name`, so they are those of the global batch whatever the
  share of padding on each device. The variance takes two passes (no E[x^2] - E[x]^2
  cancellation on dB inputs near -40).
  """

  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    features = inputs.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    values = inputs.astype(jnp.float32)
    if train:
      weights = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
      axes = tuple(range(values.ndim - 1))
      # Collectives need a bound axis; `init` runs outside shard_map and updates nothing.
      synchronise = self.axis_name is not None and not self.is_initializing()
      total_and_count = (jnp.sum(values * weights, axes), jnp.sum(weights, axes))
      if synchronise:
        total_and_count = jax.lax.psum(total_and_count, self.axis_name)
      total, count = total_and_count
      count = jnp.maximum(count, 1.0)
      mean = total / count
      squares = jnp.sum(jnp.square(values - mean) * weights, axes)
      if synchronise:
        squares = jax.lax.psum(squares, self.axis_name)
      var = squares / count
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    else:
      mean, var = running_mean.value, running_var.value
    normalized = (values - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return normalized.astype(self.dtype)


class ConvBnAct(nn.Module):
  """Conv -> BatchNorm (valid steps only) -> optional swish, padded steps zeroed."""

  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  activate: bool = True
  config: Config = Config()
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, lengths: jax.Array, train: bool):
    pad = (self.kernel_size - 1) // 2
    images = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                     strides=(self.stride, self.stride), padding=((pad, pad), (pad, pad)),
                     feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                     name="conv")(images)
    lengths = downsampled_lengths(lengths, self.stride)
    mask = _time_mask(lengths, images.shape[2])
    images = MaskedBatchNorm(self.config.batch_norm_momentum, self.config.batch_norm_epsilon,
                             self.axis_name, self.dtype, name="bn")(images, mask > 0, train=train)
    if self.activate:
      images = nn.swish(images)
    return images * mask.astype(images.dtype), lengths


class SqueezeExcitation(nn.Module):
  """Channel gates from the masked global average (valid time steps only)."""

  reduced_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, lengths: jax.Array):
    mask = _time_mask(lengths, images.shape[2])
    count = jnp.maximum(lengths.astype(jnp.float32) * images.shape[1], 1.0)[:, None, None, None]
    pooled = jnp.sum(images.astype(jnp.float32) * mask, axis=(1, 2), keepdims=True) / count
    gates = nn.Conv(self.reduced_channels, (1, 1), dtype=self.dtype, name="reduce")(pooled)
    gates = nn.swish(gates)
    gates = nn.sigmoid(nn.Conv(images.shape[-1], (1, 1), dtype=self.dtype, name="expand")(gates))
    return images * gates


class MBConv(nn.Module):
  """Inverted residual: 1x1 expand, kxk depthwise, squeeze-excitation, 1x1 project."""

  out_channels: int
  expand_ratio: int
  kernel_size: int
  stride: int
  config: Config = Config()
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images: jax.Array, lengths: jax.Array, train: bool):
    in_channels = images.shape[-1]
    inputs, input_lengths = images, lengths
    hidden = in_channels * self.expand_ratio
    conv_bn = functools.partial(ConvBnAct, config=self.config, dtype=self.dtype,
                                axis_name=self.axis_name)
    if self.expand_ratio != 1:
      images, lengths = conv_bn(hidden, 1, name="expand")(images, lengths, train)
    images, lengths = conv_bn(hidden, self.kernel_size, self.stride, groups=hidden,
                              name="depthwise")(images, lengths, train)
    reduced = max(1, int(in_channels * self.config.squeeze_excitation_ratio))
    images = SqueezeExcitation(reduced, self.dtype, name="se")(images, lengths)
    images, lengths = conv_bn(self.out_channels, 1, activate=False, name="project")(
        images, lengths, train)
    if self.stride == 1 and in_channels == self.out_channels:
      images = images + inputs
      lengths = input_lengths
    return images, lengths


class Model(nn.Module):
  """Spectrogram (batch, bins, frames) + frame mask -> (batch, output_dim) feature.

  `precision` names the convolution and matmul precision (`clasp_jax.models.precision`).
  `axis_name` synchronises every BatchNorm's training statistics over that mapped axis
  (see the module docstring); None keeps them per device.
  """

  config: Config = Config()
  dtype: Any = jnp.float32
  precision: str = "highest"
  axis_name: str | None = None

  @nn.compact
  def __call__(self, spectrogram: jax.Array, frame_mask: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    with precision.scope(self.precision):
      return self._encode(spectrogram, frame_mask, train)

  def _encode(self, spectrogram, frame_mask, train):
    config = self.config
    batch, _, frames = spectrogram.shape
    if frame_mask is None:
      frame_mask = jnp.ones((batch, frames), bool)
    lengths = jnp.sum(frame_mask, axis=1).astype(jnp.int32)
    images = spectrogram[..., None].astype(self.dtype)  # (batch, H=bins, W=frames, 1)
    # Decibel scales differ with `ref` (0 dB at the peak or at amplitude 1): a batch-norm on
    # the single input channel learns the offset and spread instead of a hard-coded one.
    input_mask = _time_mask(lengths, frames)
    images = MaskedBatchNorm(config.batch_norm_momentum, config.batch_norm_epsilon,
                             self.axis_name, self.dtype, name="input_norm")(
                                 images, input_mask > 0, train=train)
    images = images * input_mask.astype(images.dtype)

    layer_settings = dict(config=config, dtype=self.dtype, axis_name=self.axis_name)
    images, lengths = ConvBnAct(config.scaled_channels(config.stem_channels), 3, 2,
                                name="stem", **layer_settings)(images, lengths, train)
    for stage_index, stage in enumerate(config.stages):
      for repeat in range(config.scaled_repeats(stage.repeats)):
        images, lengths = MBConv(config.scaled_channels(stage.channels), stage.expand_ratio,
                                 stage.kernel_size, stage.stride if repeat == 0 else 1,
                                 name=f"stage{stage_index}_block{repeat}", **layer_settings)(
                                     images, lengths, train)
    images, lengths = ConvBnAct(config.scaled_channels(config.head_channels), 1,
                                name="head", **layer_settings)(images, lengths, train)
    # Padded steps are already zero: the sum over (bins, frames) divides by valid positions.
    count = jnp.maximum(lengths.astype(jnp.float32) * images.shape[1], 1.0)[:, None]
    pooled = jnp.sum(images.astype(jnp.float32), axis=(1, 2)) / count  # (batch, channels)
    pooled = nn.Dropout(config.dropout_rate)(pooled, deterministic=not train)
    return nn.Dense(config.output_dim, dtype=self.dtype, name="classifier")(pooled)


def init_variables(config: Config, rng: jax.Array | None = None, bins: int = 32,
                   frames: int = 32) -> dict:
  """Random `params` and `batch_stats` for a (bins, frames) input (any size works after).

  Jitted: run op by op, the initialisation compiles every conv shape separately (~3x slower).
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  init = jax.jit(lambda rng: Model(config).init(rng, jnp.zeros((1, bins, frames), jnp.float32)))
  return init(rng)


def stage_channels(config: Config) -> Sequence[int]:
  """Output channels per stage after width scaling (for parameter overviews)."""
  return [config.scaled_channels(stage.channels) for stage in config.stages]
