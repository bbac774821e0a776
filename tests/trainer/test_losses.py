"""The per-device losses equal the dense global-batch loss, in value and gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clasp_jax.trainer import losses

NUM_DEVICES = 8
BATCH, IN_DIM, EMBED_DIM = 32, 6, 5

LOSS_CASES = {
    # name: (kind, log scale, bias)
    "softmax_paper_fixed_scale": ("softmax", np.log(0.07), 0.0),
    "softmax_learnable_scale": ("softmax", np.log(1 / 0.07), 0.0),
    "sigmoid": ("sigmoid", np.log(10.0), -10.0),
}


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _embed(params, speech, text):
  # (n, in) @ (in, d) -> (n, d): a linear tower each, so gradients reach shared parameters.
  return _normalize(speech @ params["speech"]), _normalize(text @ params["text"])


def _per_device_loss(params, speech, text, *, kind, axis_name):
  zspeech, ztext = _embed(params, speech, text)
  out = {"scale": jnp.exp(params["log_scale"]), "bias": params["bias"]}
  return losses.contrastive_loss(kind, zspeech, ztext, out, axis_name=axis_name)


def _dense_loss(params, speech, text, *, kind):
  zspeech, ztext = _embed(params, speech, text)
  scale = jnp.exp(params["log_scale"])
  if kind == "softmax":
    return losses.dense_softmax_loss(zspeech, ztext, scale)
  return losses.dense_sigmoid_loss(zspeech, ztext, scale, params["bias"])


def _value_and_grad_per_device(params, speech, text, *, kind):
  loss, grads = jax.value_and_grad(_per_device_loss)(params, speech, text, kind=kind,
                                                     axis_name="data")
  return jax.lax.pmean(loss, "data"), jax.lax.pmean(grads, "data")


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  speech = jnp.asarray(rng.standard_normal((BATCH, IN_DIM)), jnp.float32)
  text = jnp.asarray(rng.standard_normal((BATCH, IN_DIM)), jnp.float32)
  params = {"speech": jnp.asarray(rng.standard_normal((IN_DIM, EMBED_DIM)), jnp.float32),
            "text": jnp.asarray(rng.standard_normal((IN_DIM, EMBED_DIM)), jnp.float32)}
  return params, speech, text


def _params_for(problem, case):
  params, speech, text = problem
  kind, log_scale, bias = LOSS_CASES[case]
  params = dict(params, log_scale=jnp.float32(log_scale), bias=jnp.float32(bias))
  return kind, params, speech, text


def test_eight_fake_devices_are_visible():
  assert jax.device_count() == NUM_DEVICES


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_shard_map_matches_dense_reference(problem, case):
  kind, params, speech, text = _params_for(problem, case)
  expected_loss, expected_grads = jax.value_and_grad(_dense_loss)(params, speech, text, kind=kind)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(
      functools.partial(_value_and_grad_per_device, kind=kind), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=P(), check_vma=False))
  loss, grads = sharded(params, speech, text)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  for name in expected_grads:
    np.testing.assert_allclose(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_pmap_matches_dense_reference(problem, case):
  kind, params, speech, text = _params_for(problem, case)
  expected_loss, expected_grads = jax.value_and_grad(_dense_loss)(params, speech, text, kind=kind)
  per_device = lambda x: x.reshape(NUM_DEVICES, BATCH // NUM_DEVICES, -1)
  mapped = jax.pmap(functools.partial(_value_and_grad_per_device, kind=kind), axis_name="data",
                    in_axes=(None, 0, 0))
  loss, grads = mapped(params, per_device(speech), per_device(text))
  np.testing.assert_allclose(loss, np.full(NUM_DEVICES, expected_loss), rtol=1e-5, atol=1e-6)
  for name in expected_grads:
    np.testing.assert_allclose(grads[name][0], expected_grads[name], rtol=1e-4, atol=1e-6,
                               err_msg=name)


def test_dense_softmax_loss_matches_cross_entropy_formula():
  rng = np.random.default_rng(1)
  zspeech = _normalize(jnp.asarray(rng.standard_normal((7, 4)), jnp.float32))
  ztext = _normalize(jnp.asarray(rng.standard_normal((7, 4)), jnp.float32))
  logits = np.asarray(3.0 * zspeech @ ztext.T, np.float64)
  log_softmax_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  log_softmax_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
  expected = -0.5 * (np.mean(np.diag(log_softmax_rows)) + np.mean(np.diag(log_softmax_cols)))
  np.testing.assert_allclose(losses.dense_softmax_loss(zspeech, ztext, 3.0), expected, rtol=1e-5)


def test_paper_fixed_scale_keeps_loss_near_log_batch():
  """The reference's flaw: a scale of 0.07 leaves the loss within ~0.15 of ln(batch)."""
  rng = np.random.default_rng(2)
  z = _normalize(jnp.asarray(rng.standard_normal((32, 16)), jnp.float32))
  perfect = losses.softmax_contrastive_loss(z, z, jnp.float32(0.07))
  assert abs(float(perfect) - np.log(32)) < 0.15
  assert float(losses.softmax_contrastive_loss(z, z, jnp.float32(1 / 0.07))) < 0.5 * np.log(32)


def test_unknown_loss_kind_is_a_clear_error():
  z = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="loss kind must be one of"):
    losses.contrastive_loss("triplet", z, z, {"scale": 1.0, "bias": 0.0})
