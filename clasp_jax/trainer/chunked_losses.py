"""Contrastive losses for batches larger than one device holds or one step computes.

`chunked_sigmoid_loss` is the SigLIP loss of `losses.sigmoid_contrastive_loss` without the
all-gather: each device keeps its (n, d) speech rows, and the text chunks travel around the
ring of devices on axis 'data' (`jax.lax.ppermute`), so no device ever holds more than two
chunks of text or an (n, n) block of logits; the gathered loss holds (N, d) and (n, N). The
backward pass runs the ring again instead of keeping every chunk for autodiff.

`grad_cache_value_and_grad` is gradient accumulation that keeps the contrastive loss over the
whole accumulated batch (GradCache, Gao et al. 2021): every in-batch negative of all K
micro-batches counts, as in one step over K times the batch, while activations are held for
one micro-batch at a time.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


def _axis_size(axis_name: str | None) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _pass_on(tree: Any, axis_name: str, devices: int) -> Any:
  """Every device sends to its left neighbour, so after k passes device i holds what device
  i + k started with."""
  shift = [(source, (source - 1) % devices) for source in range(devices)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, shift), tree)


def _signs(count: int, own_chunk: bool, dtype) -> jax.Array:
  """+1 for the matching pairs, which only a device's own chunk contains; -1 elsewhere."""
  if own_chunk:
    return 2.0 * jnp.eye(count, dtype=dtype) - 1.0
  return -jnp.ones((count, count), dtype)


def _block_log_likelihood(zspeech, text_chunk, scale, bias, signs):
  logits = scale * zspeech @ text_chunk.T + bias  # (n, d) @ (d, m) -> (n, m)
  return jnp.sum(jax.nn.log_sigmoid(signs * logits))


def _block_cotangents(zspeech, text_chunk, scale, bias, signs, weight):
  """Gradients of -weight * sum log sigmoid(signs * logits) for one (speech, text chunk) block."""
  similarities = zspeech @ text_chunk.T  # (n, d) @ (d, m) -> (n, m)
  logits = scale * similarities + bias
  # d/dx -log sigmoid(s x) = -s sigmoid(-s x)
  dlogits = -weight * signs * jax.nn.sigmoid(-signs * logits)
  dzspeech = scale * dlogits @ text_chunk  # (n, m) @ (m, d) -> (n, d)
  dchunk = scale * dlogits.T @ zspeech  # (m, n) @ (n, d) -> (m, d)
  return dzspeech, dchunk, jnp.sum(dlogits * similarities), jnp.sum(dlogits)


def _ring_loss(zspeech, ztext, scale, bias, axis_name):
  count, dtype = zspeech.shape[0], zspeech.dtype
  total = _block_log_likelihood(zspeech, ztext, scale, bias, _signs(count, True, dtype))
  devices = _axis_size(axis_name)
  if devices > 1:
    negatives = _signs(ztext.shape[0], False, dtype)

    def visit(carry, _):
      chunk, total = carry
      chunk = _pass_on(chunk, axis_name, devices)
      return (chunk, total + _block_log_likelihood(zspeech, chunk, scale, bias, negatives)), None

    (_, total), _ = jax.lax.scan(visit, (ztext, total), None, length=devices - 1)
  return -total / count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring_sigmoid_loss(zspeech, ztext, scale, bias, axis_name):
  return _ring_loss(zspeech, ztext, scale, bias, axis_name)


def _ring_sigmoid_loss_forward(zspeech, ztext, scale, bias, axis_name):
  # Only the inputs are kept: autodiff through the forward ring would keep every chunk that
  # passed by, (N, d) on every device, the memory the ring exists to avoid.
  return _ring_loss(zspeech, ztext, scale, bias, axis_name), (zspeech, ztext, scale, bias)


def _ring_sigmoid_loss_backward(axis_name, residuals, cotangent):
  zspeech, ztext, scale, bias = residuals
  count, dtype = zspeech.shape[0], zspeech.dtype
  weight = cotangent / count
  dzspeech, dchunk, dscale, dbias = _block_cotangents(
      zspeech, ztext, scale, bias, _signs(count, True, dtype), weight)
  devices = _axis_size(axis_name)
  if devices > 1:
    negatives = _signs(ztext.shape[0], False, dtype)

    def visit(carry, _):
      # A chunk's gradient travels with it, each device adding its rows' share.
      chunk, dchunk, dzspeech, dscale, dbias = carry
      chunk, dchunk = _pass_on((chunk, dchunk), axis_name, devices)
      step = _block_cotangents(zspeech, chunk, scale, bias, negatives, weight)
      return (chunk, dchunk + step[1], dzspeech + step[0], dscale + step[2],
              dbias + step[3]), None

    (_, dchunk, dzspeech, dscale, dbias), _ = jax.lax.scan(
        visit, (ztext, dchunk, dzspeech, dscale, dbias), None, length=devices - 1)
    # After devices - 1 passes device i holds the gradient of device i - 1's chunk, complete;
    # one more pass brings it home.
    dchunk = _pass_on(dchunk, axis_name, devices)
  return (dzspeech, dchunk, jnp.reshape(dscale, jnp.shape(scale)).astype(scale.dtype),
          jnp.reshape(dbias, jnp.shape(bias)).astype(bias.dtype))


_ring_sigmoid_loss.defvjp(_ring_sigmoid_loss_forward, _ring_sigmoid_loss_backward)


def chunked_sigmoid_loss(zspeech: jax.Array, ztext: jax.Array, scale: jax.Array,
                         bias: jax.Array, *, axis_name: str | None = None) -> jax.Array:
  """`losses.sigmoid_contrastive_loss` without gathering the text of every device.

  A per-device function over `axis_name`, like the gathered loss and interchangeable with it:
  the sum over every text of the global batch for each of this device's speech rows,
  averaged over those rows; the trainer `pmean`s it. Value and gradients (with pmap's
  per-device semantics: each device's embedding gradient sums every device's loss) equal the
  gathered loss's. With `axis_name=None` it is the single-device loss.
  """
  scale = jnp.asarray(scale, zspeech.dtype)
  bias = jnp.asarray(bias, zspeech.dtype)
  return _ring_sigmoid_loss(zspeech, ztext, scale, bias, axis_name)


def grad_cache_value_and_grad(
    embed: Callable[[Any, Any], tuple[jax.Array, jax.Array]],
    loss: Callable[[Any, jax.Array, jax.Array], jax.Array],
    params: Any, micro_batches: Any, *, has_aux: bool = False) -> tuple[Any, Any]:
  """The loss over K accumulated micro-batches as one batch, and its gradient, one
  micro-batch of activations at a time.

  `embed(params, micro_batch) -> (zspeech, ztext)`, each (n, d). `loss(params, zspeech,
  ztext)` scores all K * n rows at once (e.g. `losses.contrastive_loss`, with the scale and
  bias read from `params`; under shard_map or pmap it may gather over its axis as usual).
  `micro_batches` is a pytree whose leaves have a leading axis of K; rows are ordered
  micro-batch by micro-batch.

  1. Embed every micro-batch without keeping activations (no gradient is taken here).
  2. The loss over all K * n embeddings, and its gradient with respect to them and to
     `params` (the scale and bias).
  3. For each micro-batch, embed again under `jax.vjp` and pull the cached embedding
     gradients back to the parameters; the sum over micro-batches is the full gradient.
  The cost is one extra forward pass per micro-batch.

  State that the forward pass changes, and randomness, do not accumulate like one big batch:
  - BatchNorm in training mode normalises each micro-batch with its own n-row statistics, so
    the embeddings (and the loss) differ from one K * n batch, whose statistics span every
    row; and the running averages take K momentum updates per step instead of one. Both
    passes see the same micro-batch, so they agree with each other; take the updated
    statistics from one pass only, or they advance twice.
  - Dropout must draw the same mask in both passes, or the cached gradients belong to a
    different network than the one differentiated in step 3: put micro-batch k's key in the
    micro-batch (e.g. `jax.random.fold_in(rng, k)`), never draw it inside `embed`.
  Without either, the result equals `jax.value_and_grad` of the loss over the whole batch.

  With `has_aux`, `embed` returns `(zspeech, ztext, aux)` (e.g. updated BatchNorm
  statistics) and the value is `(loss, aux)`, aux stacked over the K micro-batches of pass 1.
  """
  frozen = jax.lax.stop_gradient(params)
  embedded = jax.lax.map(lambda micro_batch: embed(frozen, micro_batch), micro_batches)
  zspeech, ztext = embedded[:2]
  micro_count, rows = zspeech.shape[:2]
  flatten = lambda z: z.reshape((micro_count * rows,) + z.shape[2:])
  value, (grads, dzspeech, dztext) = jax.value_and_grad(loss, argnums=(0, 1, 2))(
      params, flatten(zspeech), flatten(ztext))

  def backpropagate(total, inputs):
    micro_batch, dzspeech_k, dztext_k = inputs
    _, pullback = jax.vjp(lambda p: tuple(embed(p, micro_batch)[:2]), params)
    (grads_k,) = pullback((dzspeech_k, dztext_k))
    return jax.tree.map(jnp.add, total, grads_k), None

  grads, _ = jax.lax.scan(backpropagate, grads, (micro_batches, dzspeech.reshape(zspeech.shape),
                                                 dztext.reshape(ztext.shape)))
  return ((value, embedded[2]) if has_aux else value), grads
