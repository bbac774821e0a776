"""config.model.dtype='bfloat16' computes the towers in bfloat16 while parameters, gradients
and the loss stay float32; config.model.speech.remat recomputes HuBERT layers without changing
a number."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax.common.config_args import ConfigError
from clasp_jax.models import clasp
from clasp_jax.trainer import losses
from configs import base

pytestmark = pytest.mark.usefixtures("fast_compiles")
BATCH, SAMPLES = 4, 8000


def _config(dtype="float32", remat=False):
  config = base.get_config("tiny,speech=audio")
  config.model.dtype = dtype
  config.model.speech.remat = remat
  return config


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  audio = rng.standard_normal((BATCH, SAMPLES)).astype(np.float32) * 0.1
  mask = np.ones((BATCH, SAMPLES), bool)
  mask[1, SAMPLES // 2:] = False  # One shorter clip: padding takes part.
  text = rng.standard_normal((BATCH, 16)).astype(np.float32)
  return {"audio": audio, "audio_mask": mask, "text": text}


def _loss_and_grads(config, batch, variables=None):
  model = clasp.build(config).model
  if variables is None:
    variables = model.init(jax.random.key(0), batch, train=False)

  def loss_fn(params):
    (zspeech, ztext, out), _ = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, batch, train=True,
        rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    return losses.contrastive_loss("softmax", zspeech, ztext, out), (zspeech, out)

  (loss, (zspeech, out)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"])
  return variables, loss, grads, zspeech, out


def test_bfloat16_towers_keep_float32_parameters_gradients_and_loss(batch):
  variables, loss_32, grads_32, zspeech_32, out_32 = _loss_and_grads(_config("float32"), batch)
  variables_16, loss_16, grads_16, zspeech_16, out_16 = _loss_and_grads(
      _config("bfloat16"), batch)
  # The same float32 parameters either way: only activations change type.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables_16))
  chex.assert_trees_all_equal(variables_16, variables)
  assert out_32["ssl/hidden"].dtype == jnp.float32
  assert out_16["ssl/hidden"].dtype == jnp.bfloat16
  assert out_16["spectrogram/features"].dtype == jnp.bfloat16
  assert zspeech_16.dtype == loss_16.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads_16))
  # bfloat16 keeps 8 bits of mantissa: embeddings close to float32's, yet not equal. (The
  # loss moves more: a random tower embeds every clip alike, and the scale of 14 magnifies
  # their small differences.)
  cosines = np.sum(np.asarray(zspeech_16) * np.asarray(zspeech_32), axis=-1)
  assert np.all(cosines > 0.98) and not np.array_equal(zspeech_16, zspeech_32), cosines
  np.testing.assert_allclose(loss_16, loss_32, rtol=0.1)
  ssl_32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_32["ssl_encoder"])])
  ssl_16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_16["ssl_encoder"])])
  cosine = ssl_32 @ ssl_16 / (np.linalg.norm(ssl_32) * np.linalg.norm(ssl_16))
  assert cosine > 0.9, cosine


def test_remat_changes_nothing_numerically(batch):
  variables, loss, grads, _, _ = _loss_and_grads(_config(remat=False), batch)
  _, loss_remat, grads_remat, _, _ = _loss_and_grads(_config(remat=True), batch, variables)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  chex.assert_trees_all_close(grads_remat, grads, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(grads["ssl_encoder"]["encoder"]["layers_0"]["attention"]
                           ["q_proj"]["kernel"]) != 0)


def test_unknown_dtype_is_refused():
  with pytest.raises(ConfigError, match="config.model.dtype must be one of"):
    clasp.build(_config("float16"))
