"""Gradient accumulation (GradCache over micro-batches) and the chunked SigLIP loss in the
train step, against the plain computation on 8 fake devices, float32, within 1e-5."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.common.config_args import ConfigError
from clasp_jax.data import pipeline
from clasp_jax.models import clasp
from clasp_jax.trainer import losses, optim, state as state_lib, steps, trainer
from configs import base

pytestmark = pytest.mark.usefixtures("fast_compiles")
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
NUM_DEVICES = 8


def _config(loss_kind):
  config = base.get_config("tiny")
  config.model.branch_dropout = (0.0, 0.0)  # Dropout masks depend on the device and micro-batch.
  config.loss.kind = loss_kind
  return config


def _setup(config):
  """Model, initial state on 8 devices, SGD (Adam would magnify rounding noise), one batch."""
  mesh = Mesh(np.asarray(jax.devices()[:NUM_DEVICES]), ("data",))
  batch = pipeline.for_split(config, "train", mesh=None, train=True).local_batch(0)[0]
  built = clasp.build(config, axis_name="data")
  state, tx, frozen = state_lib.create_train_state(
      built.model, batch, seed=0, mesh=mesh, pretrained=built.pretrained,
      frozen_pattern=functools.partial(optim.frozen_pattern, config),
      make_optimizer=lambda p: optax.sgd(0.1))
  return mesh, built, state, tx, frozen, batch


def _run_step(step_fn, mesh, state, batch):
  global_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  new_state, metrics = steps.shard_over_mesh(step_fn, mesh)(state, global_batch)
  return jax.device_get(new_state), jax.device_get(metrics)


def _micro_batches(batch, accumulation_steps):
  """The global micro-batches the accumulated step forms: micro-batch k holds the k-th
  consecutive slice of every device's rows."""
  def split(x):
    per_device = x.reshape((NUM_DEVICES, accumulation_steps, -1) + x.shape[1:])
    return [per_device[:, k].reshape((-1,) + x.shape[1:]) for k in range(accumulation_steps)]
  return [dict(zip(batch, rows)) for rows in zip(*(split(np.asarray(v)) for v in batch.values()))]


def _plain_backprop_over_micro_batches(config, variables, batch, accumulation_steps):
  """One device, no GradCache: embed every micro-batch (BatchNorm over its rows) while
  keeping all activations, score all rows with one dense loss, differentiate end to end."""
  model = clasp.build(config, axis_name=None).model
  micro_batches = _micro_batches(batch, accumulation_steps)

  def loss_fn(params):
    zspeech, ztext, stats = [], [], []
    for micro_batch in micro_batches:
      (zs, zt, out), updates = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, micro_batch, train=True,
          rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
      zspeech.append(zs)
      ztext.append(zt)
      stats.append(updates["batch_stats"])
    loss = losses.contrastive_loss(config.loss.kind, jnp.concatenate(zspeech),
                                   jnp.concatenate(ztext), out)
    return loss, jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), axis=0), *stats)

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
  return float(loss), jax.device_get(params), jax.device_get(batch_stats)


@pytest.mark.parametrize("loss_kind", ["softmax", "sigmoid"])
def test_accumulated_step_equals_plain_backprop(loss_kind):
  accumulation_steps = 2
  config = _config(loss_kind)
  mesh, built, state, tx, frozen, batch = _setup(config)
  initial = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  step_fn = functools.partial(steps.accumulated_train_step, model=built.model, tx=tx,
                              loss_kind=loss_kind, accumulation_steps=accumulation_steps,
                              frozen=frozen)
  new_state, metrics = _run_step(step_fn, mesh, state, batch)

  loss, params, batch_stats = _plain_backprop_over_micro_batches(config, initial, batch,
                                                                 accumulation_steps)
  np.testing.assert_allclose(metrics["train/loss"], loss, **TOLERANCE)
  chex.assert_trees_all_close(new_state.params, params, **TOLERANCE)
  chex.assert_trees_all_close(new_state.batch_stats, batch_stats, **TOLERANCE)
  # The step moved the parameters: the comparison is not of two copies of the start.
  assert not np.allclose(new_state.params["speech_encoder"]["mix"]["linear_2"]["kernel"],
                         initial["params"]["speech_encoder"]["mix"]["linear_2"]["kernel"])


def test_accumulation_differs_from_one_batch_only_by_batch_norm():
  """What the docs say differs: BatchNorm over B/K rows. The loss of K micro-batches is not
  the plain step's loss, yet a 1-micro-batch plain back-propagation reproduces the plain step."""
  config = _config("softmax")
  mesh, built, state, tx, frozen, batch = _setup(config)
  initial = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  plain_fn = functools.partial(steps.train_step, model=built.model, tx=tx, loss_kind="softmax",
                               frozen=frozen)
  plain_state, plain_metrics = _run_step(plain_fn, mesh, state, batch)
  loss_1, params_1, _ = _plain_backprop_over_micro_batches(config, initial, batch, 1)
  loss_2, _, _ = _plain_backprop_over_micro_batches(config, initial, batch, 2)
  np.testing.assert_allclose(plain_metrics["train/loss"], loss_1, **TOLERANCE)
  chex.assert_trees_all_close(plain_state.params, params_1, **TOLERANCE)
  assert abs(loss_2 - loss_1) > 1e-4


def test_chunked_sigmoid_train_step_equals_gathered():
  results = {}
  for kind in ("sigmoid", "sigmoid_chunked"):
    config = _config(kind)
    mesh, built, state, tx, frozen, batch = _setup(config)
    step_fn = functools.partial(steps.train_step, model=built.model, tx=tx, loss_kind=kind,
                                frozen=frozen)
    results[kind] = _run_step(step_fn, mesh, state, batch)
  (gathered, gathered_metrics), (chunked, chunked_metrics) = results.values()
  assert "logit_bias" in chunked.params  # The chunked loss learns SigLIP's bias too.
  np.testing.assert_allclose(chunked_metrics["train/loss"], gathered_metrics["train/loss"],
                             **TOLERANCE)
  np.testing.assert_allclose(chunked_metrics["train/grad_norm"],
                             gathered_metrics["train/grad_norm"], **TOLERANCE)
  chex.assert_trees_all_close(chunked.params, gathered.params, **TOLERANCE)


def test_accumulation_that_does_not_divide_is_refused():
  config = base.get_config("tiny")
  config.accumulation_steps = 3
  with pytest.raises(ConfigError, match="accumulation_steps=3 micro-batches"):
    trainer.validate_config(config, NUM_DEVICES)
  config.accumulation_steps = 0
  with pytest.raises(ConfigError, match="at least 1"):
    trainer.validate_config(config, NUM_DEVICES)
