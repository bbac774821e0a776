"""Contrastive losses, written per device over a named axis.

Each device scores its own queries against the embeddings gathered from every device, so the
mean of the per-device losses equals the loss of the whole global batch, and averaging the
per-device gradients (`pmean`) gives the global batch's gradient. With `axis_name=None` the same
functions run on one device. The `dense_*` functions are independent single-device references
over the full batch, used by the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clasp_jax.trainer import chunked_losses

LOSSES = ("softmax", "sigmoid", "sigmoid_chunked")
# Losses with a learnt bias beside the scale.
SIGMOID_LOSSES = ("sigmoid", "sigmoid_chunked")


def _gather(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """All embeddings of the global batch, and the global indices of this device's rows."""
  local_count = x.shape[0]
  if axis_name is None or jax.lax.axis_size(axis_name) == 1:
    return x, jnp.arange(local_count)
  gathered = jax.lax.all_gather(x, axis_name, tiled=True)  # (devices * n, d)
  offset = jax.lax.axis_index(axis_name) * local_count
  return gathered, offset + jnp.arange(local_count)


def softmax_contrastive_loss(zspeech: jax.Array, ztext: jax.Array, scale: jax.Array, *,
                             axis_name: str | None = None) -> jax.Array:
  """Symmetric InfoNCE (CLIP): mean of speech->text and text->speech cross-entropies.

  The paper's fixed scale is exp(log 0.07) = 0.07; the default learns it from 1/0.07.
  """
  all_text, labels = _gather(ztext, axis_name)
  all_speech, _ = _gather(zspeech, axis_name)
  speech_to_text = scale * zspeech @ all_text.T  # (n, d) @ (d, N) -> (n, N)
  text_to_speech = scale * ztext @ all_speech.T  # (n, d) @ (d, N) -> (n, N)
  loss_speech = optax.softmax_cross_entropy_with_integer_labels(speech_to_text, labels)
  loss_text = optax.softmax_cross_entropy_with_integer_labels(text_to_speech, labels)
  return 0.5 * (jnp.mean(loss_speech) + jnp.mean(loss_text))


def sigmoid_contrastive_loss(zspeech: jax.Array, ztext: jax.Array, scale: jax.Array,
                             bias: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """SigLIP: every (speech, text) pair is a binary match / no-match decision.

  Normalised per speech row: the sum over all texts, averaged over this device's rows.
  """
  all_text, labels = _gather(ztext, axis_name)
  logits = scale * zspeech @ all_text.T + bias  # (n, d) @ (d, N) -> (n, N)
  signs = 2.0 * jax.nn.one_hot(labels, all_text.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1))


def contrastive_loss(kind: str, zspeech: jax.Array, ztext: jax.Array, out: dict, *,
                     axis_name: str | None = None) -> jax.Array:
  """Dispatches on the configured loss kind; `out` carries the model's scale and bias."""
  if kind == "softmax":
    return softmax_contrastive_loss(zspeech, ztext, out["scale"], axis_name=axis_name)
  if kind == "sigmoid":
    return sigmoid_contrastive_loss(zspeech, ztext, out["scale"], out["bias"], axis_name=axis_name)
  if kind == "sigmoid_chunked":
    # The same loss without gathering every device's text (chunked_losses.py): memory per
    # device grows with the local batch, not the global one.
    return chunked_losses.chunked_sigmoid_loss(zspeech, ztext, out["scale"], out["bias"],
                                               axis_name=axis_name)
  raise ValueError(f"loss kind must be one of {LOSSES}, got {kind!r}")


def dense_softmax_loss(zspeech: jax.Array, ztext: jax.Array, scale: jax.Array) -> jax.Array:
  """Reference: the full (N, N) similarity matrix, log-softmax over rows and over columns."""
  logits = scale * zspeech @ ztext.T  # (N, d) @ (d, N) -> (N, N)
  diagonal = jnp.diagonal(logits)
  rows = jax.nn.logsumexp(logits, axis=1) - diagonal
  columns = jax.nn.logsumexp(logits, axis=0) - diagonal
  return 0.5 * (jnp.mean(rows) + jnp.mean(columns))


def dense_sigmoid_loss(zspeech: jax.Array, ztext: jax.Array, scale: jax.Array,
                       bias: jax.Array) -> jax.Array:
  """Reference: -sum_ij log sigmoid(+-(scale s_ij + bias)) / N over the full matrix."""
  logits = scale * zspeech @ ztext.T + bias  # (N, d) @ (d, N) -> (N, N)
  count = logits.shape[0]
  signs = 2.0 * jnp.eye(count) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / count


def ctc_loss(logits: jax.Array, frame_mask: jax.Array, labels: jax.Array, label_mask: jax.Array,
             *, blank_id: int = 0) -> jax.Array:
  """Connectionist temporal classification loss of per-frame logits, for an auxiliary head.

  logits (batch, frames, vocab) with frame_mask (batch, frames); labels (batch, max_labels)
  int with label_mask (batch, max_labels), valid entries first. Each clip's negative
  log-likelihood is divided by its label count and the batch is averaged, as PyTorch's
  `ctc_loss(reduction='mean', zero_infinity=True)`: a clip whose labels cannot be aligned
  (fewer frames than labels plus the blanks that separate repeated labels) counts as 0
  rather than as optax's huge finite stand-in for infinity, so one short clip cannot swamp
  the gradient. Per device, like the contrastive losses: the mean of the per-device values
  over equal shares of the batch is the global batch's loss.
  """
  frame_mask = frame_mask.astype(bool)
  label_mask = label_mask.astype(bool)
  per_clip = optax.ctc_loss(logits.astype(jnp.float32), 1.0 - frame_mask.astype(jnp.float32),
                            labels, 1.0 - label_mask.astype(jnp.float32), blank_id=blank_id)
  label_counts = jnp.sum(label_mask, axis=1)
  # A repeated label needs a blank frame between its two copies.
  repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & label_mask[:, 1:], axis=1)
  feasible = jnp.sum(frame_mask, axis=1) >= label_counts + repeats
  per_clip = jnp.where(feasible, per_clip, 0.0) / jnp.maximum(label_counts, 1)
  return jnp.mean(per_clip)
