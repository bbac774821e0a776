"""The ring SigLIP loss equals the gathered one, and GradCache accumulation equals one step
over the whole batch, in value and gradient (8 fake CPU devices, float32, within 1e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clasp_jax.trainer import losses
from clasp_jax.trainer import chunked_losses

NUM_DEVICES = 8
ROWS_PER_DEVICE, EMBED_DIM = 4, 5
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def embeddings():
  rng = np.random.default_rng(0)
  batch = NUM_DEVICES * ROWS_PER_DEVICE
  draw = lambda: _normalize(jnp.asarray(rng.standard_normal((batch, EMBED_DIM)), jnp.float32))
  # A scale and bias like SigLIP's initial ones, so positives and negatives both matter.
  return draw(), draw(), jnp.float32(10.0), jnp.float32(-10.0)


def _gathered(zspeech, ztext, scale, bias):
  return losses.sigmoid_contrastive_loss(zspeech, ztext, scale, bias, axis_name="data")


def _chunked(zspeech, ztext, scale, bias):
  return chunked_losses.chunked_sigmoid_loss(zspeech, ztext, scale, bias, axis_name="data")


def _per_device_value_and_grads(loss_fn, zspeech, ztext, scale, bias):
  """Per device: the loss and its gradient for every input (pmap semantics, before pmean);
  the scalar ones gain a device axis so they come out per device too."""
  value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3))(zspeech, ztext, scale, bias)
  dzspeech, dztext, dscale, dbias = grads
  return value[None], dzspeech, dztext, dscale[None], dbias[None]


def _assert_all_close(actual, expected):
  for name, a, e in zip(("loss", "zspeech", "ztext", "scale", "bias"), actual, expected):
    np.testing.assert_allclose(a, e, err_msg=name, **TOLERANCE)


def test_eight_fake_devices_are_visible():
  assert jax.device_count() == NUM_DEVICES


def test_shard_map_ring_matches_gathered_loss_per_device(embeddings):
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  mapped = lambda fn: jax.jit(jax.shard_map(
      functools.partial(_per_device_value_and_grads, fn), mesh=mesh,
      in_specs=(P("data"), P("data"), P(), P()), out_specs=P("data"), check_vma=False))
  # The point of the ring: neither the loss nor its gradient gathers the batch.
  program = str(jax.make_jaxpr(mapped(_chunked))(*embeddings))
  assert "ppermute" in program and "all_gather" not in program
  chunked, gathered = mapped(_chunked)(*embeddings), mapped(_gathered)(*embeddings)
  _assert_all_close(chunked, gathered)
  # And the mean of the per-device losses is the dense loss of the whole batch.
  np.testing.assert_allclose(np.mean(chunked[0]), losses.dense_sigmoid_loss(*embeddings),
                             **TOLERANCE)


def test_pmap_ring_matches_gathered_loss_per_device(embeddings):
  zspeech, ztext, scale, bias = embeddings
  per_device = lambda z: z.reshape(NUM_DEVICES, ROWS_PER_DEVICE, EMBED_DIM)
  run = lambda fn: jax.pmap(functools.partial(_per_device_value_and_grads, fn),
                            axis_name="data", in_axes=(0, 0, None, None))(
                                per_device(zspeech), per_device(ztext), scale, bias)
  _assert_all_close(run(_chunked), run(_gathered))


def test_pmeaned_gradients_are_the_dense_gradients(embeddings):
  """What the trainer uses: pmean of per-device gradients of parameters shared by all devices
  (here the scale and bias, and a map applied to every device's embeddings)."""
  zspeech, ztext, scale, bias = embeddings
  mix = jnp.eye(EMBED_DIM, dtype=jnp.float32) + 0.1

  def per_device(params, zspeech, ztext):
    grads = jax.grad(lambda p: _chunked(zspeech @ p["mix"], ztext, p["scale"], p["bias"]))(params)
    return jax.lax.pmean(grads, "data")

  params = {"mix": mix, "scale": scale, "bias": bias}
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  grads = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                out_specs=P(), check_vma=False))(params, zspeech, ztext)
  expected = jax.grad(lambda p: losses.dense_sigmoid_loss(zspeech @ p["mix"], ztext, p["scale"],
                                                          p["bias"]))(params)
  for name in expected:
    np.testing.assert_allclose(grads[name], expected[name], err_msg=name, **TOLERANCE)


def test_single_device_is_the_dense_loss(embeddings):
  zspeech, ztext, scale, bias = (x[:6] if x.ndim else x for x in embeddings)
  chunked = jax.value_and_grad(chunked_losses.chunked_sigmoid_loss, argnums=(0, 1, 2, 3))(
      zspeech, ztext, scale, bias)
  dense = jax.value_and_grad(losses.dense_sigmoid_loss, argnums=(0, 1, 2, 3))(
      zspeech, ztext, scale, bias)
  _assert_all_close((chunked[0], *chunked[1]), (dense[0], *dense[1]))


# GradCache: K micro-batches of n rows through a small MLP tower per modality.
MICRO_BATCHES, MICRO_ROWS, IN_DIM, HIDDEN = 4, 6, 7, 9
LOSS_CASES = {"softmax": (np.log(1 / 0.07), 0.0), "sigmoid": (np.log(10.0), -10.0)}


def _mlp_params(rng, log_scale, bias):
  layer = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
  tower = lambda: {"hidden": layer(IN_DIM, HIDDEN), "bias": jnp.zeros(HIDDEN, jnp.float32),
                   "out": layer(HIDDEN, EMBED_DIM)}
  return {"speech": tower(), "text": tower(), "log_scale": jnp.float32(log_scale),
          "bias": jnp.float32(bias)}


def _tower(params, x):
  hidden = jnp.tanh(x @ params["hidden"] + params["bias"])  # (n, in) @ (in, h) -> (n, h)
  return _normalize(hidden @ params["out"])  # (n, h) @ (h, d) -> (n, d)


def _embed(params, batch):
  return _tower(params["speech"], batch["speech"]), _tower(params["text"], batch["text"])


def _loss(kind, params, zspeech, ztext, axis_name=None):
  out = {"scale": jnp.exp(params["log_scale"]), "bias": params["bias"]}
  return losses.contrastive_loss(kind, zspeech, ztext, out, axis_name=axis_name)


def _batch(rng, count):
  return {name: jnp.asarray(rng.standard_normal((count, IN_DIM)), jnp.float32)
          for name in ("speech", "text")}


def _micro(batch, micro_batches):
  return jax.tree.map(lambda x: x.reshape((micro_batches, -1) + x.shape[1:]), batch)


def _assert_trees_close(actual, expected):
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, e, err_msg=jax.tree_util.keystr(path), **TOLERANCE)


@pytest.mark.parametrize("kind", sorted(LOSS_CASES))
def test_grad_cache_equals_one_step_over_the_whole_batch(kind):
  rng = np.random.default_rng(1)
  params = _mlp_params(rng, *LOSS_CASES[kind])
  batch = _batch(rng, MICRO_BATCHES * MICRO_ROWS)
  expected_loss, expected_grads = jax.value_and_grad(
      lambda p: _loss(kind, p, *_embed(p, batch)))(params)
  loss, grads = jax.jit(functools.partial(
      chunked_losses.grad_cache_value_and_grad, _embed, functools.partial(_loss, kind)))(
          params, _micro(batch, MICRO_BATCHES))
  np.testing.assert_allclose(loss, expected_loss, **TOLERANCE)
  _assert_trees_close(grads, expected_grads)


def test_grad_cache_across_devices_equals_the_dense_global_batch():
  """Each device accumulates K micro-batches and the loss gathers over devices: the pmeaned
  gradient is that of the dense loss over all devices * K * n rows."""
  kind = "softmax"
  rng = np.random.default_rng(2)
  params = _mlp_params(rng, *LOSS_CASES[kind])
  micro_batches = 2
  batch = _batch(rng, NUM_DEVICES * micro_batches * MICRO_ROWS)

  def dense(p):
    zspeech, ztext = _embed(p, batch)
    return losses.dense_softmax_loss(zspeech, ztext, jnp.exp(p["log_scale"]))

  expected_loss, expected_grads = jax.value_and_grad(dense)(params)

  def per_device(params, local_batch):
    loss, grads = chunked_losses.grad_cache_value_and_grad(
        _embed, functools.partial(_loss, kind, axis_name="data"), params,
        _micro(local_batch, micro_batches))
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grads, "data")

  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  loss, grads = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                                      out_specs=P(), check_vma=False))(params, batch)
  np.testing.assert_allclose(loss, expected_loss, **TOLERANCE)
  _assert_trees_close(grads, expected_grads)
