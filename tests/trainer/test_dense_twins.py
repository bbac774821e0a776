"""The whole train step on 8 devices equals one device on the global batch: parameters,
BatchNorm statistics (synchronised over the 'data' axis) and optimizer state after 3 steps."""

import functools

import chex
import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from clasp_jax.data import pipeline
from clasp_jax.models import clasp
from clasp_jax.trainer import optim, state as state_lib, steps
from configs import base

pytestmark = pytest.mark.usefixtures("fast_compiles")
NUM_STEPS = 3


def _train(config, devices, batches):
  """NUM_STEPS train steps on a mesh over `devices`, from the same initial state."""
  mesh = Mesh(np.asarray(devices), ("data",))
  built = clasp.build(config, axis_name="data")
  state, tx, frozen = state_lib.create_train_state(
      built.model, batches[0], seed=0, mesh=mesh, pretrained=built.pretrained,
      frozen_pattern=functools.partial(optim.frozen_pattern, config),
      # SGD with momentum: Adam divides by the root of the squared gradient, which turns the
      # float noise of gradients that are zero in exact arithmetic (a bias feeding BatchNorm)
      # into full-size steps, whatever the number of devices.
      make_optimizer=lambda p: optax.sgd(0.1, momentum=0.9))
  train_fn = steps.shard_over_mesh(functools.partial(
      steps.train_step, model=built.model, tx=tx, loss_kind=config.loss.kind, frozen=frozen),
      mesh)
  losses = []
  for batch in batches:
    global_batch = jax.device_put(batch, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    state, metrics = train_fn(state, global_batch)
    losses.append(float(metrics["train/loss"]))
  return jax.device_get(state), losses


def _assert_twins(config, batches, atol=1e-6):
  """`atol`: float32 sums of per-device gradients (pmean) round differently from one sum over
  the batch; deep convolutions accumulate more of that than the fusion encoder's matmuls."""
  eight, losses_eight = _train(config, jax.devices()[:8], batches)
  one, losses_one = _train(config, jax.devices()[:1], batches)
  np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-5)
  chex.assert_trees_all_close(eight.params, one.params, rtol=1e-5, atol=atol)
  chex.assert_trees_all_close(eight.batch_stats, one.batch_stats, rtol=1e-5, atol=atol)
  chex.assert_trees_all_close(eight.opt_state, one.opt_state, rtol=1e-5, atol=atol)
  return eight


def _feature_batches(config):
  train_input = pipeline.for_split(config, "train", mesh=None, train=True)
  return [train_input.local_batch(step)[0] for step in range(NUM_STEPS)]


@pytest.mark.parametrize("loss_kind", ["softmax", "sigmoid"])
def test_feature_mode_train_step_on_8_devices_equals_one_device(loss_kind):
  config = base.get_config("tiny")
  config.model.branch_dropout = (0.0, 0.0)  # Dropout masks are drawn per device.
  config.loss.kind = loss_kind
  state = _assert_twins(config, _feature_batches(config))
  # The statistics moved away from their initial values: BatchNorm saw the batches.
  norm = state.batch_stats["speech_encoder"]["speech_branch"]["norm_0"]
  assert not np.allclose(norm["mean"], 0.0)


def test_unsynchronised_batch_norm_would_differ():
  """The twin test has teeth: per-device BatchNorm statistics differ from the global ones."""
  config = base.get_config("tiny")
  config.model.branch_dropout = (0.0, 0.0)
  batches = _feature_batches(config)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  synced = clasp.build(config, axis_name="data").model
  local = clasp.build(config, axis_name=None).model
  variables = synced.init(jax.random.key(0), batches[0], train=False)

  def stats(model):
    def per_device(variables, batch):
      _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(0)})
      return jax.lax.pmean(updates["batch_stats"], "data")
    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),
                                                            jax.sharding.PartitionSpec("data")),
                           out_specs=jax.sharding.PartitionSpec(), check_vma=False)
    return jax.device_get(jax.jit(mapped)(variables, batches[0]))

  a, b = stats(synced), stats(local)
  var_a = a["speech_encoder"]["speech_branch"]["norm_0"]["var"]
  var_b = b["speech_encoder"]["speech_branch"]["norm_0"]["var"]
  assert not np.allclose(var_a, var_b, rtol=1e-3)


def test_audio_mode_train_step_on_8_devices_equals_one_device(tone_corpus, labse_like_dir):
  """Waveforms through the SSL encoder and the spectrogram CNN (whose BatchNorms synchronise
  over 'data' on the valid positions of the global batch) into the fusion encoder."""
  config = base.get_config("tiny,speech=audio")
  config.data.kind = "audio"
  config.data.datasets = tone_corpus
  config.data.max_duration_s = 0.5
  config.model.text.kind = "encoder"
  config.model.text.encoder = labse_like_dir
  config.model.text.max_length = 16
  config.model.branch_dropout = (0.0, 0.0)  # Dropout masks are drawn per device.
  config.model.speech.spectrogram.dropout_rate = 0.0
  config.batch_size = 16
  built = clasp.build(config)
  train_input = pipeline.for_split(config, "train", mesh=None, train=True,
                                   text_encoder=built.text_encoder)
  batches = [train_input.local_batch(step)[0] for step in range(NUM_STEPS)]
  # Clips of different lengths: devices hold different amounts of padding.
  assert len({int(mask.sum()) for mask in batches[0]["audio_mask"]}) > 1
  state = _assert_twins(config, batches, atol=1e-4)
  stats = state.batch_stats["spectrogram_encoder"]
  assert any(not np.allclose(leaf, 0.0) and not np.allclose(leaf, 1.0)
             for leaf in jax.tree.leaves(stats))
