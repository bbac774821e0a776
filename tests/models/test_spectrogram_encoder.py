"""The MBConv spectrogram encoder: output size, padding invariance, scaling rules, training."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from clasp_jax.models import spectrogram
from clasp_jax.models import spectrogram_encoder

# Two stages instead of seven keep compile time small; the blocks are the real ones: three
# MBConv blocks (with and without expansion, strided, two with residuals) and SE in each.
TINY = spectrogram_encoder.Config(
    width_multiplier=0.25, depth_multiplier=1.0, head_channels=32, output_dim=24,
    stages=(spectrogram_encoder.StageSpec(1, 16, 1, 1, 3),
            spectrogram_encoder.StageSpec(6, 24, 2, 2, 5)))


# XLA's optimisation passes cost more than they save on these tiny graphs (conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _spectrograms(batch=3, bins=20, frames=30, seed=0):
  return (np.random.RandomState(seed).randn(batch, bins, frames) * 15 - 40).astype(np.float32)


@pytest.fixture(scope="module")
def trained_variables():
  """Variables after a few training steps, so batch statistics and gates are not at init."""
  model = spectrogram_encoder.Model(TINY)
  variables = spectrogram_encoder.init_variables(TINY, bins=20, frames=30)
  optimizer = optax.adam(1e-2)
  state = optimizer.init(variables["params"])
  images = _spectrograms(batch=4)
  frame_mask = np.arange(30)[None] < np.array([30, 25, 17, 9])[:, None]
  targets = np.random.RandomState(1).randn(4, TINY.output_dim).astype(np.float32)

  @jax.jit
  def step(params, batch_stats, state, rng):
    def loss_fn(params):
      outputs, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                     frame_mask, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": rng})
      return jnp.mean((outputs - targets) ** 2), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), batch_stats, state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  losses = []
  for index in range(6):
    params, batch_stats, state, loss = step(params, batch_stats, state, jax.random.PRNGKey(index))
    losses.append(float(loss))
  return {"params": params, "batch_stats": batch_stats}, losses, variables


def test_training_steps_reduce_loss_and_update_batch_stats(trained_variables):
  variables, losses, initial = trained_variables
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0]
  before = jax.tree_util.tree_leaves(initial["batch_stats"])
  after = jax.tree_util.tree_leaves(variables["batch_stats"])
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4 for a, b in zip(after, before))


@functools.lru_cache(maxsize=None)
def _apply(config):
  return jax.jit(spectrogram_encoder.Model(config).apply)


def test_padded_rows_equal_clips_alone(trained_variables):
  variables, _, _ = trained_variables
  images = _spectrograms()
  lengths = np.array([30, 23, 7])
  frame_mask = np.arange(30)[None] < lengths[:, None]
  together = np.asarray(_apply(TINY)(variables, images, frame_mask))
  assert together.shape == (3, TINY.output_dim)
  # Odd lengths: every stride-2 layer rounds the valid length up, as for the clip alone.
  for row in (1, 2):
    length = lengths[row]
    alone = np.asarray(_apply(TINY)(variables, images[row:row + 1, :, :length],
                                    np.ones((1, length), bool)))
    np.testing.assert_allclose(together[row], alone[0], rtol=1e-4, atol=1e-4 * np.abs(alone).max())
  # Changing what sits in the padding changes nothing.
  scrambled = images.copy()
  scrambled[~np.broadcast_to(frame_mask[:, None, :], images.shape)] = 123.0
  np.testing.assert_allclose(np.asarray(_apply(TINY)(variables, scrambled, frame_mask)), together,
                             rtol=1e-5, atol=1e-6)


def test_default_output_is_1000_d_for_a_clasp_spectrogram():
  """The default encoder on the front-end's CLASP spectrogram: a (batch, 1000) feature."""
  front_end = spectrogram.FrontEnd(n_fft=256, hop_length=64)  # small image, same code path
  waveform = np.random.RandomState(0).randn(2, 4000).astype(np.float32)
  images, frame_mask = front_end(waveform, np.array([4000, 2500]))
  config = spectrogram_encoder.Config()
  variables = jax.eval_shape(
      lambda: spectrogram_encoder.init_variables(config, bins=129, frames=63))
  output = jax.eval_shape(spectrogram_encoder.Model(config).apply, variables, images, frame_mask)
  assert output.shape == (2, 1000)


def test_channel_and_depth_scaling_follow_efficientnet():
  b0 = spectrogram_encoder.Config(width_multiplier=1.0, depth_multiplier=1.0)
  assert list(spectrogram_encoder.stage_channels(b0)) == [16, 24, 40, 80, 112, 192, 320]
  assert b0.scaled_channels(b0.stem_channels) == 32 and b0.scaled_channels(1280) == 1280
  # EfficientNet-B7 (width 2.0, depth 3.1): 64-channel stem, 2560-channel head, 4 -> 13 blocks.
  b7 = spectrogram_encoder.Config(width_multiplier=2.0, depth_multiplier=3.1)
  assert (b7.scaled_channels(32), b7.scaled_channels(1280), b7.scaled_repeats(4)) == (64, 2560, 13)
  narrow = spectrogram_encoder.Config(width_multiplier=0.1)
  assert min(spectrogram_encoder.stage_channels(narrow)) == 8


def test_parameter_count_grows_with_width_and_depth():
  def count(config):
    shapes = jax.eval_shape(lambda: spectrogram_encoder.init_variables(config))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes["params"]))

  small = count(spectrogram_encoder.Config())
  assert count(spectrogram_encoder.Config(width_multiplier=1.0)) > small
  assert count(spectrogram_encoder.Config(depth_multiplier=1.0)) > small
  assert 1e6 < small < 2e6  # the "small default" of the docstring


def test_masked_batch_norm_without_axis_is_flax_batch_norm():
  """axis_name=None keeps what nn.BatchNorm(mask=...) computed: outputs and running stats."""
  values = _spectrograms(batch=4, bins=6, frames=10)[..., None] * np.arange(1, 4)  # 3 channels
  mask = np.broadcast_to((np.arange(10)[None] < np.array([10, 7, 3, 1])[:, None])[:, None, :, None],
                         values.shape)
  ours = spectrogram_encoder.MaskedBatchNorm(momentum=0.9, epsilon=1e-3)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  variables = ours.init(jax.random.PRNGKey(0), values, mask, train=False)
  variables = jax.tree.map(lambda x: x + np.linspace(0.5, 1.5, x.size).reshape(x.shape),
                           variables)  # scale, bias and running stats away from (1, 0)
  for train in (True, False):
    flax_bn = flax_bn.copy(use_running_average=not train)
    got, got_stats = ours.apply(variables, values, mask, train=train, mutable=["batch_stats"])
    want, want_stats = flax_bn.apply(variables, values, mask=mask, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_axis_name_synchronises_batch_statistics_over_devices():
  """Under shard_map on 8 devices, train-mode outputs and updated statistics equal one device's
  run on the global batch, although each device holds a different share of padding."""
  config = dataclasses.replace(TINY, dropout_rate=0.0)  # dropout masks differ per device
  devices = jax.devices()
  assert len(devices) == 8
  batch, frames = 16, 30
  images = _spectrograms(batch=batch, frames=frames, seed=3)
  lengths = np.random.RandomState(4).randint(1, frames + 1, size=batch)
  lengths[:2] = frames  # device 0 holds only full clips, others mostly padding
  frame_mask = np.arange(frames)[None] < lengths[:, None]
  variables = spectrogram_encoder.init_variables(config, bins=20, frames=frames)

  def run(model, variables, images, frame_mask):
    outputs, updates = model.apply(variables, images, frame_mask, train=True,
                                   mutable=["batch_stats"])
    return outputs, updates["batch_stats"]

  dense_outputs, dense_stats = jax.jit(functools.partial(run, spectrogram_encoder.Model(config)))(
      variables, images, frame_mask)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  sharded = jax.jit(jax.shard_map(
      functools.partial(run, spectrogram_encoder.Model(config, axis_name="data")), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P()), check_vma=False))
  outputs, stats = sharded(variables, images, frame_mask)
  np.testing.assert_allclose(outputs, dense_outputs, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(dense_stats)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Every BatchNorm took part. (Means after a normalised layer stay near 0; variances move.)
  variances = [(want["var"], before["var"]) for want, before in zip(
      jax.tree.leaves(dense_stats, is_leaf=lambda x: "var" in x),
      jax.tree.leaves(variables["batch_stats"], is_leaf=lambda x: "var" in x))]
  assert len(variances) == 11 and all(not np.allclose(a, b) for a, b in variances)
  # Without axis_name each device would normalise with its own statistics: visibly different.
  unsynchronised = jax.jit(jax.shard_map(
      functools.partial(run, spectrogram_encoder.Model(config)), mesh=mesh,
      in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P()), check_vma=False))
  assert np.abs(np.asarray(unsynchronised(variables, images, frame_mask)[0])
                - dense_outputs).max() > 1e-3
