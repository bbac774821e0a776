"""The building blocks shared by the text and speech transformers (models/attention.py,
models/activations.py) and the XLA options of their inference jits (compilation.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax.models import compilation
from clasp_jax.models import activations
from clasp_jax.models import attention


def test_exact_gelu_equals_the_erf_definition():
  x = np.linspace(-8.0, 8.0, 10_001)
  truth = 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  # torch.nn.GELU() computes the same float32 formula; absolute error is what parity needs.
  np.testing.assert_allclose(activations.gelu_exact(jnp.asarray(x, jnp.float32)), truth,
                             atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="unsupported activation 'mish'"):
    activations.hf_activation("mish")


class _ThreeDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return [nn.Dense(5, name=name)(x) for name in ("a", "b", "c")]


class _FusedThree(nn.Module):
  @nn.compact
  def __call__(self, x):
    return attention.fused_dense(
        x, [attention.DenseParams(5, name=name) for name in ("a", "b", "c")],
        dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def test_fused_projections_have_dense_parameters_and_outputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  separate = _ThreeDense().init(jax.random.PRNGKey(1), x)
  fused = _FusedThree().init(jax.random.PRNGKey(1), x)
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  assert shapes(fused) == shapes(separate)
  for got, want in zip(_FusedThree().apply(separate, x), _ThreeDense().apply(separate, x)):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def _reference_attention(query, key, value, key_mask, num_heads):
  batch, length, width = query.shape
  heads = lambda x: np.asarray(x, np.float64).reshape(batch, length, num_heads, -1)
  q, k, v = heads(query), heads(key), heads(value)
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)


def test_attention_ignores_padded_keys_and_matches_the_definition():
  rng = np.random.default_rng(0)
  query, key, value = (rng.standard_normal((3, 6, 8)).astype(np.float32) for _ in range(3))
  key_mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], bool)
  got = attention.multi_head_attention(query, key, value, key_mask, num_heads=2,
                                       precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(got, _reference_attention(query, key, value, key_mask, 2),
                             atol=1e-5, rtol=0)
  # Changing what sits in padded key positions changes nothing.
  noisy_key, noisy_value = key.copy(), value.copy()
  noisy_key[1, 4:], noisy_value[1, 4:] = 100.0, -100.0
  again = attention.multi_head_attention(query, noisy_key, noisy_value, key_mask, num_heads=2,
                                         precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(again, got, atol=1e-6, rtol=0)


def test_fully_masked_rows_stay_finite():
  ones = jnp.ones((1, 4, 4))
  out = attention.multi_head_attention(ones, ones, ones, jnp.zeros((1, 4), bool), num_heads=1)
  assert np.isfinite(np.asarray(out)).all()


def test_inference_jit_options_compile_on_this_backend():
  options = compilation.transformer_inference_options()
  if jax.default_backend() == "cpu":
    assert options  # This jaxlib knows the option; a future one may not (then it is empty).
  doubled = compilation.jit_transformer_inference(lambda x: 2 * x)(jnp.arange(3.0))
  np.testing.assert_array_equal(doubled, [0.0, 2.0, 4.0])
