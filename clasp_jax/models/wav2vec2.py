"""HuBERT and wav2vec2 speech encoders in Flax, with the CTC head of `*ForCTC`.

At inference HuBERT and wav2vec2 share one architecture: a strided convolutional feature
encoder over the raw 16 kHz waveform (about 50 frames per second), a projection to the
transformer width, a grouped convolutional positional embedding with weight norm, and a
transformer in post-LN ("wav2vec2-base") or stable pre-LN ("hubert-large") form. They differ
only in their checkpoint prefix (`hubert.` / `wav2vec2.`) and in HuBERT's optional feature
projection layer norm, so one Flax module serves both.

Parameter names follow the Hugging Face module tree with `.` turned into `/` or `_`
(`feature_extractor/conv_layers_0_conv`, `encoder/layers_3/attention/q_proj`, ...), so that
`wav2vec2_checkpoint.load` maps every tensor by an explicit rule rather than a fuzzy match.

Padded batches: `waveform_lengths` gives the valid samples per row. Frames whose receptive
field reaches into the padding are masked out of attention and of mean pooling. The
group-norm feature extractor (wav2vec2-base) normalises each channel over time; with
`group_norm_valid_frames_only=True` (the default) those statistics cover valid frames only,
so a padded row gives the same result as the clip alone. Transformers' PyTorch code takes
statistics over the padding too; `False` reproduces that exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.models import activations
from clasp_jax.models import attention
from clasp_jax.models import precision

# Checkpoint prefixes of the two model families in Hugging Face `*ForCTC` checkpoints.
MODEL_TYPES = ("hubert", "wav2vec2")


def activation(name: str):
  """Maps a Hugging Face `hidden_act` name to the same function in JAX."""
  return activations.hf_activation(name)


@dataclasses.dataclass(frozen=True)
class Config:
  """Architecture of a HuBERT / wav2vec2 encoder (the fields of its Hugging Face config.json)."""

  model_type: str = "hubert"
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  activation_dropout: float = 0.1
  attention_dropout: float = 0.1
  feat_proj_dropout: float = 0.0
  final_dropout: float = 0.1
  layerdrop: float = 0.1
  layer_norm_eps: float = 1e-5
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"
  conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_bias: bool = False
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False
  # HuBERT may drop the layer norm before the feature projection; wav2vec2 always has it.
  feat_proj_layer_norm: bool = True
  # Present in checkpoints trained with SpecAugment (mask_time_prob or mask_feature_prob > 0).
  has_masked_spec_embed: bool = True
  # CTC head size; None for a bare encoder (`HubertModel` / `Wav2Vec2Model`). The CTC blank
  # is the tokenizer's pad token (see clasp_jax.inference.ctc), not a model setting.
  ctc_vocab_size: int | None = None

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(
          f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
    if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel):
      raise ValueError("conv_dim, conv_stride and conv_kernel must have the same length, got "
                       f"{len(self.conv_dim)}, {len(self.conv_stride)}, {len(self.conv_kernel)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.hidden_size % self.num_conv_pos_embedding_groups:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")
    activation(self.hidden_act)
    activation(self.feat_extract_activation)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], with_ctc_head: bool | None = None) -> "Config":
    """Builds a Config from a Hugging Face config.json dict.

    `with_ctc_head=None` keeps the head when `architectures` names a `*ForCTC` class.
    Options that change the architecture in ways this module does not implement (adapters,
    batch-norm positional convolution) raise ValueError instead of loading silently wrong.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(f"config.json model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    unsupported = []
    if hf.get("add_adapter"):
      unsupported.append("add_adapter=true (convolutional adapter after the encoder)")
    if hf.get("adapter_attn_dim") is not None:
      unsupported.append("adapter_attn_dim (per-language attention adapters)")
    if hf.get("conv_pos_batch_norm"):
      unsupported.append("conv_pos_batch_norm=true (batch-norm positional convolution)")
    if unsupported:
      raise ValueError("unsupported checkpoint options: " + "; ".join(unsupported))
    if with_ctc_head is None:
      with_ctc_head = any(name.endswith("ForCTC") for name in hf.get("architectures") or ())
    defaults = cls()
    field_value = lambda name: hf.get(name, getattr(defaults, name))
    return cls(
        model_type=model_type,
        hidden_size=field_value("hidden_size"),
        num_hidden_layers=field_value("num_hidden_layers"),
        num_attention_heads=field_value("num_attention_heads"),
        intermediate_size=field_value("intermediate_size"),
        hidden_act=field_value("hidden_act"),
        hidden_dropout=field_value("hidden_dropout"),
        activation_dropout=field_value("activation_dropout"),
        attention_dropout=field_value("attention_dropout"),
        feat_proj_dropout=field_value("feat_proj_dropout"),
        final_dropout=field_value("final_dropout"),
        layerdrop=field_value("layerdrop"),
        layer_norm_eps=field_value("layer_norm_eps"),
        feat_extract_norm=field_value("feat_extract_norm"),
        feat_extract_activation=field_value("feat_extract_activation"),
        conv_dim=tuple(field_value("conv_dim")),
        conv_stride=tuple(field_value("conv_stride")),
        conv_kernel=tuple(field_value("conv_kernel")),
        conv_bias=field_value("conv_bias"),
        num_conv_pos_embeddings=field_value("num_conv_pos_embeddings"),
        num_conv_pos_embedding_groups=field_value("num_conv_pos_embedding_groups"),
        do_stable_layer_norm=field_value("do_stable_layer_norm"),
        feat_proj_layer_norm=(model_type == "wav2vec2" or hf.get("feat_proj_layer_norm", True)),
        has_masked_spec_embed=(hf.get("mask_time_prob", 0.05) > 0
                               or hf.get("mask_feature_prob", 0.0) > 0),
        ctc_vocab_size=hf.get("vocab_size", 32) if with_ctc_head else None,
    )

  def frame_lengths(self, waveform_lengths):
    """Valid output frames of the feature encoder for `waveform_lengths` valid samples.

    A frame is valid when its whole receptive field lies inside the clip, which is the same
    count that transformers' `_get_feat_extract_output_lengths` gives. Works on ints,
    numpy and jax integer arrays.
    """
    lengths = waveform_lengths
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      lengths = (lengths - kernel) // stride + 1
    if isinstance(lengths, (int, np.integer)):
      return max(int(lengths), 0)
    if isinstance(lengths, np.ndarray):
      return np.maximum(lengths, 0)
    return jnp.maximum(lengths, 0)


# The Hugging Face config.json fields of the two checkpoints CLASP uses, as stated in the
# project reference (CLASP_REFERENCE.md, Pipeline 1) plus the published defaults they keep.
PRESETS: dict[str, dict[str, Any]] = {
    "facebook/hubert-large-ls960-ft": dict(
        model_type="hubert", architectures=["HubertForCTC"],
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
        conv_dim=[512] * 7, conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, feat_proj_layer_norm=True,
        vocab_size=32, pad_token_id=0, mask_time_prob=0.05, hidden_act="gelu",
        feat_extract_activation="gelu", layer_norm_eps=1e-5),
    "facebook/wav2vec2-base-960h": dict(
        model_type="wav2vec2", architectures=["Wav2Vec2ForCTC"],
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False,
        conv_dim=[512] * 7, conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
        vocab_size=32, pad_token_id=0, mask_time_prob=0.05, hidden_act="gelu",
        feat_extract_activation="gelu", layer_norm_eps=1e-5),
}


def lengths_to_mask(lengths: jax.Array, max_length: int) -> jax.Array:
  """(batch,) valid counts -> (batch, max_length) bool mask of right-padded rows."""
  return jnp.arange(max_length)[None, :] < lengths[:, None]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over axis 1 of (batch, time, dim) `values` counting only frames where `mask` holds.

  Rows without a valid frame give zeros rather than NaN.
  """
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(values.astype(jnp.float32) * weights, axis=1)
  count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  return total / count


class ChannelGroupNorm(nn.Module):
  """GroupNorm with one group per channel over (batch, time, channels), optionally masked.

  This is PyTorch's `GroupNorm(num_groups=C, num_channels=C)` in the first layer of the
  group-norm feature extractor: each channel is standardised over time.
  """

  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, frame_mask: jax.Array | None) -> jax.Array:
    channels = features.shape[-1]
    features32 = features.astype(jnp.float32)
    if frame_mask is None:
      mean = jnp.mean(features32, axis=1, keepdims=True)
      variance = jnp.mean(jnp.square(features32 - mean), axis=1, keepdims=True)
    else:
      weights = frame_mask.astype(jnp.float32)[..., None]
      count = jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
      mean = jnp.sum(features32 * weights, axis=1, keepdims=True) / count
      variance = jnp.sum(jnp.square(features32 - mean) * weights, axis=1, keepdims=True) / count
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    normalized = (features32 - mean) * jax.lax.rsqrt(variance + self.epsilon)
    return (normalized * scale + bias).astype(self.dtype)


def _layer_norm(epsilon: float, dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it: the one-pass E[x^2] - E[x]^2 costs 1e-4 parity.
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name)


class FeatureEncoder(nn.Module):
  """Strided 1-D convolutions from the waveform to ~50 Hz frames (`feature_extractor`)."""

  config: Config
  dtype: Any = jnp.float32
  group_norm_valid_frames_only: bool = True

  @nn.compact
  def __call__(self, waveform: jax.Array, waveform_lengths: jax.Array | None) -> jax.Array:
    """(batch, samples) -> (batch, frames, conv_dim[-1]).

    A (batch, steps, channels) input (e.g. log-mel frames) is convolved over its steps the
    same way, the channels being the first convolution's input features.
    """
    config = self.config
    act = activation(config.feat_extract_activation)
    features = (waveform[..., None] if waveform.ndim == 2 else waveform).astype(self.dtype)
    lengths = waveform_lengths
    for index, (dim, kernel, stride) in enumerate(
        zip(config.conv_dim, config.conv_kernel, config.conv_stride)):
      block = f"conv_layers_{index}"
      conv = nn.Conv(dim, (kernel,), strides=(stride,), padding="VALID",
                     use_bias=config.conv_bias, dtype=self.dtype, name=f"{block}_conv")
      features = conv(features)
      if lengths is not None:
        lengths = (lengths - kernel) // stride + 1
      if config.feat_extract_norm == "layer":
        features = _layer_norm(1e-5, self.dtype, f"{block}_layer_norm")(features)
      elif index == 0:
        frame_mask = None
        if lengths is not None and self.group_norm_valid_frames_only:
          frame_mask = lengths_to_mask(lengths, features.shape[1])
        group_norm = ChannelGroupNorm(dtype=self.dtype, name=f"{block}_layer_norm")
        features = group_norm(features, frame_mask)
      features = act(features)
    return features


class WeightNormGroupedConv(nn.Module):
  """The positional convolution: grouped, "same"-padded, with PyTorch's weight norm (dim=2).

  The kernel is stored as direction `weight_v` (kernel, in/groups, out) and per-tap
  magnitude `weight_g` (kernel,), and rebuilt on every call so that fine-tuning keeps the
  reparameterisation the checkpoint was trained with.
  """

  features: int
  kernel_size: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    in_per_group = inputs.shape[-1] // self.groups
    weight_v = self.param("weight_v", nn.initializers.lecun_normal(),
                          (self.kernel_size, in_per_group, self.features))
    weight_g = self.param("weight_g", nn.initializers.ones, (self.kernel_size,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    norms = jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(1, 2)))  # (kernel,)
    kernel = weight_v * (weight_g / norms)[:, None, None]
    half = self.kernel_size // 2
    outputs = jax.lax.conv_general_dilated(
        inputs.astype(self.dtype), kernel.astype(self.dtype), window_strides=(1,),
        padding=[(half, half)], dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=self.groups)
    outputs = outputs + bias.astype(self.dtype)
    if self.kernel_size % 2 == 0:
      # An even kernel with symmetric padding yields one frame too many (SamePadLayer).
      outputs = outputs[:, :-1]
    return outputs


class SelfAttention(nn.Module):
  """Multi-head self-attention with key padding mask (`attention`)."""

  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool):
    width = hidden.shape[-1]
    dense = functools.partial(nn.Dense, width, dtype=self.dtype)
    projections = [attention.DenseParams(width, name=name)
                   for name in ("q_proj", "k_proj", "v_proj")]
    query, key, value = attention.fused_dense(hidden, projections, dtype=self.dtype)
    context = attention.multi_head_attention(
        query, key, value, frame_mask, self.num_heads,
        dropout=lambda weights: nn.Dropout(self.dropout_rate)(weights,
                                                              deterministic=deterministic))
    return dense(name="out_proj")(context)


class FeedForward(nn.Module):
  """Position-wise MLP (`feed_forward`)."""

  config: Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, deterministic: bool) -> jax.Array:
    config = self.config
    hidden = nn.Dense(config.intermediate_size, dtype=self.dtype, name="intermediate_dense")(hidden)
    hidden = activation(config.hidden_act)(hidden)
    hidden = nn.Dropout(config.activation_dropout)(hidden, deterministic=deterministic)
    hidden = nn.Dense(config.hidden_size, dtype=self.dtype, name="output_dense")(hidden)
    return nn.Dropout(config.hidden_dropout)(hidden, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """One transformer block, post-LN (wav2vec2-base) or stable pre-LN (hubert-large)."""

  config: Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool):
    config = self.config
    attention = SelfAttention(config.num_attention_heads, config.attention_dropout, self.dtype,
                              name="attention")
    layer_norm = _layer_norm(config.layer_norm_eps, self.dtype, "layer_norm")
    final_layer_norm = _layer_norm(config.layer_norm_eps, self.dtype, "final_layer_norm")
    feed_forward = FeedForward(config, self.dtype, name="feed_forward")
    dropout = nn.Dropout(config.hidden_dropout)
    if config.do_stable_layer_norm:
      attended = attention(layer_norm(hidden), frame_mask, deterministic)
      hidden = hidden + dropout(attended, deterministic=deterministic)
      return hidden + feed_forward(final_layer_norm(hidden), deterministic)
    attended = attention(hidden, frame_mask, deterministic)
    hidden = layer_norm(hidden + dropout(attended, deterministic=deterministic))
    return final_layer_norm(hidden + feed_forward(hidden, deterministic))


class Encoder(nn.Module):
  """Positional convolution + transformer layers (`encoder`)."""

  config: Config
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, hidden: jax.Array, frame_mask: jax.Array | None, deterministic: bool,
               output_hidden_states: bool = False):
    """Returns (last_hidden_state, hidden_states or None), hidden_states as transformers gives them:
    the input of layer 0 followed by every layer's output (before the stable-LN final norm)."""
    config = self.config
    if frame_mask is not None:
      # Padded frames must not leak into valid ones through the positional convolution.
      hidden = jnp.where(frame_mask[..., None], hidden, 0)
    positions = WeightNormGroupedConv(
        config.hidden_size, config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups,
        self.dtype, name="pos_conv_embed_conv")(hidden)
    hidden = hidden + activation(config.feat_extract_activation)(positions)
    layer_norm = _layer_norm(config.layer_norm_eps, self.dtype, "layer_norm")
    if not config.do_stable_layer_norm:
      hidden = layer_norm(hidden)
    hidden = nn.Dropout(config.hidden_dropout)(hidden, deterministic=deterministic)

    layer_class = EncoderLayer
    if self.remat:
      # Recompute each layer in the backward pass: activation memory grows with one layer,
      # not all 24, which is what lets end-to-end training of HuBERT-large fit.
      layer_class = nn.remat(EncoderLayer, static_argnums=(3,))
    all_hidden = [hidden] if output_hidden_states else None
    for index in range(config.num_hidden_layers):
      layer_output = layer_class(config, self.dtype, name=f"layers_{index}")(
          hidden, frame_mask, deterministic)
      if config.layerdrop > 0 and not deterministic:
        # LayerDrop: skip the whole layer with probability `layerdrop` during training.
        keep = jax.random.uniform(self.make_rng("dropout")) >= config.layerdrop
        layer_output = jnp.where(keep, layer_output, hidden)
      hidden = layer_output
      if output_hidden_states:
        all_hidden.append(hidden)
    if config.do_stable_layer_norm:
      hidden = layer_norm(hidden)
    return hidden, (tuple(all_hidden) if output_hidden_states else None)


class Model(nn.Module):
  """HuBERT / wav2vec2 encoder with the optional CTC head.

  Attributes:
    config: the architecture.
    dtype: compute dtype (bfloat16 halves memory and runs on the TPU MXU at full rate;
      parameters stay float32 and softmax/normalisation statistics run in float32).
    remat: recompute each transformer layer in the backward pass.
    group_norm_valid_frames_only: see the module docstring.
    precision: matmul and convolution precision (`clasp_jax.models.precision`): "highest"
      matches PyTorch float32 on GPU/TPU, "default" is faster there.
  """

  config: Config
  dtype: Any = jnp.float32
  remat: bool = False
  group_norm_valid_frames_only: bool = True
  precision: str = "highest"

  @nn.compact
  def __call__(self, waveform: jax.Array, waveform_lengths: jax.Array | None = None, *,
               deterministic: bool = True, output_hidden_states: bool = False,
               mask_time_indices: jax.Array | None = None) -> dict[str, Any]:
    """Encodes a batch of right-padded waveforms.

    Args:
      waveform: (batch, samples) float, already preprocessed as the checkpoint expects
        (zero-mean unit-variance when its preprocessor says `do_normalize`); or (batch,
        steps, channels) frames (a log-mel spectrogram), which the convolutions stride over.
      waveform_lengths: (batch,) valid samples (or steps) per row; None means no padding.
      deterministic: False enables dropout and LayerDrop (needs a 'dropout' rng).
      output_hidden_states: also return every layer's hidden state.
      mask_time_indices: optional (batch, frames) bool; masked frames are replaced by the
        learned `masked_spec_embed` before the encoder (SpecAugment-style fine-tuning).

    Returns:
      dict with `last_hidden_state` (batch, frames, hidden), `frame_mask` (batch, frames)
      bool, `pooled` (batch, hidden) mean over valid frames, `logits` (batch, frames,
      vocab) when the CTC head exists, and `hidden_states` when asked.
    """
    with precision.scope(self.precision):
      return self._encode(waveform, waveform_lengths, deterministic, output_hidden_states,
                          mask_time_indices)

  def _encode(self, waveform, waveform_lengths, deterministic, output_hidden_states,
              mask_time_indices):
    config = self.config
    features = FeatureEncoder(config, self.dtype, self.group_norm_valid_frames_only,
                              name="feature_extractor")(waveform, waveform_lengths)
    frames = features.shape[1]
    frame_mask = None
    if waveform_lengths is not None:
      frame_mask = lengths_to_mask(config.frame_lengths(waveform_lengths), frames)

    if config.feat_proj_layer_norm:
      features = _layer_norm(config.layer_norm_eps, self.dtype,
                             "feature_projection_layer_norm")(features)
    hidden = nn.Dense(config.hidden_size, dtype=self.dtype,
                      name="feature_projection_projection")(features)
    hidden = nn.Dropout(config.feat_proj_dropout)(hidden, deterministic=deterministic)

    if config.has_masked_spec_embed:
      masked_spec_embed = self.param("masked_spec_embed", nn.initializers.uniform(1.0),
                                     (config.hidden_size,))
      if mask_time_indices is not None:
        hidden = jnp.where(mask_time_indices[..., None], masked_spec_embed.astype(hidden.dtype),
                           hidden)
    elif mask_time_indices is not None:
      raise ValueError("mask_time_indices needs a checkpoint with masked_spec_embed")

    hidden, hidden_states = Encoder(config, self.dtype, self.remat, name="encoder")(
        hidden, frame_mask, deterministic, output_hidden_states)

    full_mask = frame_mask if frame_mask is not None else jnp.ones(hidden.shape[:2], bool)
    outputs = {
        "last_hidden_state": hidden,
        "frame_mask": full_mask,
        "pooled": masked_mean(hidden, full_mask),
    }
    if output_hidden_states:
      outputs["hidden_states"] = hidden_states
    if config.ctc_vocab_size is not None:
      head_input = nn.Dropout(config.final_dropout)(hidden, deterministic=deterministic)
      lm_head = nn.Dense(config.ctc_vocab_size, dtype=self.dtype, name="lm_head")
      outputs["logits"] = lm_head(head_input)
    return outputs


def init_params(config: Config, rng: jax.Array | None = None) -> dict:
  """Random parameters (for tests, benchmarks and training from scratch)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  waveform = jnp.zeros((1, receptive_field(config)), jnp.float32)  # one frame is enough
  return jax.jit(lambda rng: Model(config).init(rng, waveform))(rng)["params"]


def receptive_field(config: Config) -> int:
  """Samples needed for one output frame of the feature encoder (400 = 25 ms at 16 kHz)."""
  field = 1
  for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
    field = (field - 1) * stride + kernel
  return field
