"""The fusion encoder's options beyond the paper: linear branches, standardised and noisy
inputs; and the model's learned text projection."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clasp_jax.common.config_args import ConfigError
from clasp_jax.models import clasp
from clasp_jax.models.fusion import FusionEncoder

SPEECH_DIM, SPECTROGRAM_DIM, EMBED = 12, 8, 6


def _inputs(seed, batch=16):
  rng = np.random.default_rng(seed)
  speech = (3 + 5 * rng.standard_normal((batch, SPEECH_DIM))).astype(np.float32)
  spectrogram = (-2 + 0.1 * rng.standard_normal((batch, SPECTROGRAM_DIM))).astype(np.float32)
  return speech, spectrogram


def _init(**fields):
  model = FusionEncoder(embed_dim=EMBED, **fields)
  variables = model.init(jax.random.key(0), *_inputs(0), train=False)
  return model, variables


def test_a_linear_branch_is_one_map_to_the_embedding():
  model, variables = _init(mode="speech", branch="linear")
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      "speech_branch": {"linear": {"kernel": (SPEECH_DIM, EMBED), "bias": (EMBED,)}}}
  speech, spectrogram = _inputs(1)
  linear = variables["params"]["speech_branch"]["linear"]
  np.testing.assert_allclose(model.apply(variables, speech, spectrogram, train=False),
                             speech @ linear["kernel"] + linear["bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["speech", "spectrogram"])  # (joint adds the mix's BatchNorm)
def test_standardised_inputs_use_batch_statistics_then_running_ones(mode):
  model, variables = _init(mode=mode, branch="linear", input_norm=True)
  plain = FusionEncoder(embed_dim=EMBED, mode=mode, branch="linear")
  params = {"params": variables["params"]}
  speech, spectrogram = _inputs(2)
  standardise = lambda x, mean, var: (x - mean) / np.sqrt(var + 1e-5)
  # Training: each input standardised by its batch (biased variance), no learned scale.
  out, updates = model.apply(variables, speech, spectrogram, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(0)})
  expected = plain.apply(params, standardise(speech, speech.mean(0), speech.var(0)),
                         standardise(spectrogram, spectrogram.mean(0), spectrogram.var(0)),
                         train=False)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  # Evaluation: the running statistics (PyTorch's momentum 0.1, unbiased variance).
  stats = updates["batch_stats"]
  for name, x in (("speech", speech), ("spectrogram", spectrogram)):
    if mode in ("joint", name):
      np.testing.assert_allclose(stats[f"{name}_input"]["norm"]["mean"], 0.1 * x.mean(0),
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(stats[f"{name}_input"]["norm"]["var"],
                                 0.9 + 0.1 * x.var(0, ddof=1), rtol=1e-5)
  evaluated = model.apply({**params, **updates}, speech, spectrogram, train=False)
  moved = lambda name, x: standardise(x, stats[f"{name}_input"]["norm"]["mean"],
                                      stats[f"{name}_input"]["norm"]["var"])
  np.testing.assert_allclose(
      evaluated, plain.apply(params, moved("speech", speech) if mode != "spectrogram" else speech,
                             moved("spectrogram", spectrogram) if mode != "speech" else spectrogram,
                             train=False), rtol=1e-4, atol=1e-4)
  assert f"{mode}_input" not in variables["params"]  # No learned scale or bias.


def test_joint_mode_standardises_both_inputs():
  _, variables = _init(mode="joint", branch="linear", input_norm=True, input_noise=0.1)
  stats = jax.tree.map(jnp.shape, variables["batch_stats"])
  assert stats["speech_input"] == {"norm": {"mean": (SPEECH_DIM,), "var": (SPEECH_DIM,)}}
  assert stats["spectrogram_input"] == {"norm": {"mean": (SPECTROGRAM_DIM,),
                                                 "var": (SPECTROGRAM_DIM,)}}
  assert set(variables["params"]) == {"speech_branch", "spectrogram_branch", "mix"}


def test_input_noise_acts_in_training_only_with_its_spread():
  model, variables = _init(mode="speech", branch="linear", input_noise=0.5)
  speech = np.zeros((4096, SPEECH_DIM), np.float32)
  run = lambda seed: model.apply(variables, speech, None, train=True,
                                 rngs={"dropout": jax.random.key(seed)})
  linear = variables["params"]["speech_branch"]["linear"]
  # The noise passes the linear map: its spread on each output is 0.5 * |column|.
  spread = np.asarray(run(1) - linear["bias"]).std(0)
  np.testing.assert_allclose(spread, 0.5 * np.linalg.norm(linear["kernel"], axis=0), rtol=0.05)
  assert not np.allclose(run(1), run(2))
  evaluated = model.apply(variables, speech, None, train=False)
  np.testing.assert_array_equal(evaluated, np.broadcast_to(linear["bias"], evaluated.shape))


def test_bad_branch_settings_are_clear_errors():
  with pytest.raises(ValueError, match="branch must be one of"):
    _init(branch="transformer")
  with pytest.raises(ValueError, match="input_noise must be at least 0"):
    _init(input_noise=-1.0)
  config = _feature_config(branch="transformer")
  with pytest.raises(ConfigError, match="config.model.branch must be one of"):
    clasp.model_from_config(config.model, config.loss)
  config = _feature_config(input_noise=-0.1)
  with pytest.raises(ConfigError, match="config.model.input_noise must be at least 0"):
    clasp.model_from_config(config.model, config.loss)


def _feature_config(**model_fields):
  from configs import base  # pylint: disable=import-outside-toplevel
  config = base.get_config("tiny")
  with config.unlocked():
    config.model.update(model_fields)
  return config


def test_the_text_projection_starts_at_the_identity_and_maps_the_text_side():
  config = _feature_config(text_projection=True)
  model = clasp.model_from_config(config.model, config.loss)
  plain = clasp.model_from_config(_feature_config().model, config.loss)
  dims = {"speech": 7, "spectrogram": 5, "text": 9}
  batch = clasp.example_batch(dims, batch_size=3)
  batch["text"] = np.random.default_rng(0).standard_normal((3, 9)).astype(np.float32)
  variables = model.init(jax.random.key(0), batch, train=False)
  kernel = variables["params"]["text_projection"]["kernel"]
  np.testing.assert_array_equal(kernel, np.eye(9))
  plain_variables = {k: {n: v for n, v in tree.items() if n != "text_projection"}
                     for k, tree in variables.items()}
  np.testing.assert_allclose(model.apply(variables, batch, method="embed_text"),
                             plain.apply(plain_variables, batch, method="embed_text"), atol=1e-6)
  turned = np.random.default_rng(1).standard_normal((9, 9)).astype(np.float32)
  variables["params"]["text_projection"]["kernel"] = turned
  expected = batch["text"] @ turned
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(model.apply(variables, batch, method="embed_text"), expected,
                             rtol=1e-5, atol=1e-5)
  _, ztext, _ = model.apply(variables, batch, train=False)
  np.testing.assert_allclose(ztext, expected, rtol=1e-5, atol=1e-5)
