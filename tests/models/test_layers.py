"""The shared building blocks of models/layers.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax.models import layers


def test_l2_normalize_matches_torch_normalize():
  torch = pytest.importorskip("torch")
  vectors = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  vectors[1] *= 1e-3
  expected = torch.nn.functional.normalize(torch.from_numpy(vectors), dim=-1).numpy()
  np.testing.assert_allclose(np.asarray(layers.l2_normalize(jnp.asarray(vectors))), expected,
                             rtol=1e-6, atol=1e-7)


def test_l2_normalize_keeps_zero_vectors_zero_with_finite_gradients():
  vectors = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(layers.l2_normalize(vectors)), [[0.6, 0.8], [0.0, 0.0]])
  gradient = jax.grad(lambda x: jnp.sum(layers.l2_normalize(x) * jnp.array([1.0, 2.0])))(vectors)
  assert np.isfinite(np.asarray(gradient)).all()
  # Below eps the vector is only scaled by 1/eps, as torch does: d/dx (x / eps) = 1 / eps.
  np.testing.assert_allclose(np.asarray(gradient)[1], [1e12, 2e12], rtol=1e-6)


def test_l2_normalize_gradient_is_the_projection_off_the_vector():
  vector = jnp.array([3.0, 4.0])
  direction = jnp.array([1.0, -2.0])
  gradient = jax.grad(lambda x: jnp.dot(layers.l2_normalize(x), direction))(vector)
  unit = vector / 5.0
  # d(x/|x|)^T v = (v - (u.v) u) / |x|
  np.testing.assert_allclose(np.asarray(gradient),
                             np.asarray((direction - jnp.dot(unit, direction) * unit) / 5.0),
                             rtol=1e-6)
