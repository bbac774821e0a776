"""create_train_state: pretrained towers are placed, never initialised; freezing and the
gradient norm cover the trainable parameters only."""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clasp_jax.data import pipeline
from clasp_jax.models import towers
from clasp_jax.trainer import losses, optim, state as state_lib, steps
from configs import base

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory):
  from clasp_jax.data import features
  root = tmp_path_factory.mktemp("features")
  dims = {"speech": 24, "spectrogram": 20, "text": 16}
  for name, count in (("train", 64), ("validation", 32)):
    split = features.synthetic_feature_split(name, num_examples=count, dims=dims, noise=0.5,
                                             seed=0)
    split.sentences = [f"sentence number {i} of {name}" for i in range(count)]
    features.write_feature_split(str(root / name), split)
  return root


def _config(feature_dir, encoder):
  config = base.get_config(f"tiny,features={feature_dir}")
  config.text.encoder = encoder
  config.text.max_length = 16
  config.schedule.kind = "constant"  # A warm-up would make the first update zero.
  return config


def _setup(config, mesh, frozen_pattern):
  built = towers.build(config, axis_name="data")
  train_input = pipeline.for_split(config, "train", mesh=mesh, train=True,
                                   text_encoder=built.text_encoder)
  example, _ = train_input.local_batch(0)
  state, tx, frozen = state_lib.create_train_state(
      built.model, example, seed=0, mesh=mesh, pretrained=built.pretrained,
      frozen_pattern=frozen_pattern,
      make_optimizer=lambda p: optim.make_optimizer(config, p, total_steps=10,
                                                    steps_per_epoch=2)[0])
  return built, train_input, example, state, tx, frozen


def test_pretrained_tower_is_placed_not_initialised(feature_dir, labse_like_dir):
  config = _config(feature_dir, labse_like_dir)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  built, _, example, state, _, _ = _setup(config, mesh, "")
  chex.assert_trees_all_equal(jax.device_get(state.params["text_encoder"]),
                              jax.device_get(built.pretrained["text_encoder"]))
  # The word-embedding table's shape appears in the compiled init only when it is initialised.
  table = built.pretrained["text_encoder"]["transformer"]["embeddings"]["word_embeddings"]
  shape = "f32[" + ",".join(map(str, table["embedding"].shape)) + "]"
  rng = jax.random.key(0)
  compiled = lambda pretrained: jax.jit(state_lib.fresh_initializer(
      built.model, example, pretrained, rng)).lower(rng).compile().as_text()
  assert shape in compiled({})
  assert shape not in compiled(built.pretrained)


def test_pretrained_weights_of_the_wrong_shape_are_a_clear_error(feature_dir, labse_like_dir):
  config = _config(feature_dir, labse_like_dir)
  built = towers.build(config)
  bad = jax.tree.map(lambda x: x[..., :1] if x.ndim else x, built.pretrained["text_encoder"])
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  example, _ = pipeline.for_split(config, "train", mesh=mesh, train=True,
                                  text_encoder=built.text_encoder).local_batch(0)
  with pytest.raises(state_lib.ShapeMismatchError, match="does not fit the model"):
    state_lib.init_variables(built.model, example, jax.random.key(0), mesh=mesh,
                             pretrained={"text_encoder": bad})


def test_frozen_parameters_stay_and_the_gradient_norm_covers_the_trainable(feature_dir,
                                                                           labse_like_dir):
  config = _config(feature_dir, labse_like_dir)
  config.text.trainable_top_layers = 1
  pattern = functools.partial(optim.frozen_pattern, config)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  built, train_input, example, state, tx, frozen = _setup(config, mesh, lambda params: (
      pattern(params) + "|^speech_encoder/speech_branch/"))
  flat_frozen = flax.traverse_util.flatten_dict(frozen, sep="/")
  assert flat_frozen["speech_encoder/speech_branch/linear_0/kernel"]
  assert flat_frozen["text_encoder/transformer/encoder/layer_0/attention/query/kernel"]
  assert not flat_frozen["text_encoder/transformer/encoder/layer_1/attention/query/kernel"]
  assert not flat_frozen["speech_encoder/mix/linear_0/kernel"]
  # The optimizer holds state for the trainable parameters alone.
  trainable, _ = optim.split_trainable(state.params, frozen)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
          if hasattr(s, "mu")]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(trainable)

  batch = jax.device_put(example)
  before = jax.device_get(state.params)

  dense_model = towers.build(config).model  # No collectives: one device, the whole batch.

  def dense_loss(params):
    (zspeech, ztext, out), _ = dense_model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch, train=True,
        rngs={"dropout": jax.random.fold_in(jax.random.fold_in(state.rng, 0), 0)},
        mutable=["batch_stats"])
    return losses.dense_softmax_loss(zspeech, ztext, out["scale"])

  grads = flax.traverse_util.flatten_dict(jax.grad(dense_loss)(state.params), sep="/")
  expected_norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for name, g in grads.items()
                              if not flat_frozen[name]))
  train_fn = steps.shard_over_mesh(functools.partial(
      steps.train_step, model=built.model, tx=tx, loss_kind="softmax", frozen=frozen), mesh)
  state, metrics = train_fn(state, batch)
  assert float(metrics["train/grad_norm"]) == pytest.approx(expected_norm, rel=1e-4)
  after = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  flat_before = flax.traverse_util.flatten_dict(before, sep="/")
  for name, value in after.items():
    if flat_frozen[name]:
      np.testing.assert_array_equal(value, flat_before[name], err_msg=name)
  assert not np.array_equal(after["speech_encoder/mix/linear_0/kernel"],
                            flat_before["speech_encoder/mix/linear_0/kernel"])
