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

LOSSES = ("softmax", "sigmoid")


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
