"""Layers with PyTorch semantics, so trained weights and statistics convert one to one."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)
  return init


class Linear(nn.Module):
  """nn.Linear with PyTorch's default initialisation: U(+-1/sqrt(fan_in)) for kernel and bias.

  The kernel is stored (in, out), the transpose of PyTorch's `weight`.
  """

  features: int

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    fan_in = inputs.shape[-1]
    bound = 1.0 / math.sqrt(fan_in)
    kernel = self.param("kernel", _uniform(bound), (fan_in, self.features))
    bias = self.param("bias", _uniform(bound), (self.features,))
    return inputs @ kernel + bias  # (n, in) @ (in, out) -> (n, out)


class IdentityInitLinear(nn.Module):
  """A square linear map without bias that starts as the identity: a learned turn of an
  embedding space that, untrained, leaves it as it was."""

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    width = inputs.shape[-1]
    kernel = self.param("kernel", lambda key, shape: jnp.eye(shape[0], dtype=jnp.float32),
                        (width, width))
    return inputs @ kernel


class BatchNorm(nn.Module):
  """BatchNorm1d as PyTorch defines it, synchronised across `axis_name` when given.

  Training normalises with the biased batch variance and moves the running variance towards
  the unbiased one; `momentum` is PyTorch's (weight of the new batch), not Flax's. With
  `axis_name`, statistics are those of the global batch, so every device keeps identical
  running statistics. `affine=False` leaves out the learned scale and bias: the output is the
  standardised input.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: str | None = None
  affine: bool = True

  @nn.compact
  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    features = inputs.shape[-1]
    if self.affine:
      scale = self.param("scale", nn.initializers.ones, (features,))
      bias = self.param("bias", nn.initializers.zeros, (features,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if train:
      synchronise = (self.axis_name is not None and not self.is_initializing() and
                     jax.lax.axis_size(self.axis_name) > 1)
      count = inputs.shape[0]
      mean = jnp.mean(inputs, axis=0)
      if synchronise:
        mean = jax.lax.pmean(mean, self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      var = jnp.mean(jnp.square(inputs - mean), axis=0)  # Two passes: no cancellation.
      if synchronise:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        unbiased_var = var * count / jnp.maximum(count - 1, 1)
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased_var
    else:
      mean, var = running_mean.value, running_var.value
    standardised = (inputs - mean) * jax.lax.rsqrt(var + self.epsilon)
    return standardised * scale + bias if self.affine else standardised


def leaky_relu(inputs: jax.Array) -> jax.Array:
  return nn.leaky_relu(inputs, negative_slope=0.01)  # PyTorch's default slope.


def l2_normalize(vectors: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps), so a zero vector stays zero.

  Written as x * rsqrt(max(||x||^2, eps^2)): the same value, but the gradient of a zero vector
  is finite (sqrt's derivative at 0 is infinite), so a padded or dead row cannot turn a
  training step's gradients into NaN.
  """
  squared_norms = jnp.sum(jnp.square(vectors), axis=-1, keepdims=True)
  return vectors * jax.lax.rsqrt(jnp.maximum(squared_norms, eps * eps))
