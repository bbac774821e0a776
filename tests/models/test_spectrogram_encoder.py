"""The MBConv spectrogram encoder: output size, padding invariance, scaling rules, training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
