"""Every matmul and convolution of the towers runs at the precision the module names.

On CPU all precisions compute alike, so the tests read the traced programs: a dot or a
convolution left at DEFAULT would round float32 inputs to tf32/bf16 on GPU/TPU and break
parity with PyTorch there.
"""

import jax
import jax.numpy as jnp
import pytest

from clasp_jax.models import precision
from clasp_jax.models import spectrogram_encoder
from clasp_jax.models import wav2vec2
from clasp_jax.models.fusion import FusionEncoder

CONTRACTIONS = ("dot_general", "conv_general_dilated")


def contraction_precisions(fn, *args) -> list:
  """The precision of every dot and convolution in fn's program, sub-programs included."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in CONTRACTIONS:
        found.append(eqn.params["precision"])
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def assert_all_at(found, name):
  assert found, "the program has no dot or convolution"
  expected = precision.lax_precision(name)
  for pair in found:
    if name == "default":
      assert pair is None or set(pair) == {expected}, pair
    else:
      assert pair is not None and set(pair) == {expected}, pair


TINY_SPEECH = wav2vec2.Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
                              conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                              num_conv_pos_embedding_groups=2, ctc_vocab_size=5)
TINY_SPECTROGRAM = spectrogram_encoder.Config(width_multiplier=0.1, depth_multiplier=0.2,
                                              head_channels=16, output_dim=8)


@pytest.mark.parametrize("name", ["highest", "default"])
def test_speech_encoder_contractions_follow_its_precision(name):
  model = wav2vec2.Model(TINY_SPEECH, precision=name)
  waveform = jnp.zeros((2, 400), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), waveform)
  found = contraction_precisions(
      lambda p, w: model.apply(p, w, jnp.array([400, 300]))["logits"], params, waveform)
  assert_all_at(found, name)


def test_speech_encoder_backward_pass_keeps_highest():
  model = wav2vec2.Model(TINY_SPEECH, remat=True)
  waveform = jnp.zeros((2, 400), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), waveform)
  loss = lambda p: jnp.sum(model.apply(p, waveform)["pooled"])
  assert_all_at(contraction_precisions(jax.grad(loss), params), "highest")


@pytest.mark.parametrize("name", ["highest", "default"])
def test_spectrogram_encoder_contractions_follow_its_precision(name):
  model = spectrogram_encoder.Model(TINY_SPECTROGRAM, precision=name)
  images = jnp.zeros((2, 16, 12), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  assert_all_at(contraction_precisions(lambda v, x: model.apply(v, x), variables, images), name)


@pytest.mark.parametrize("name", ["highest", "default"])
def test_fusion_encoder_contractions_follow_its_precision(name):
  model = FusionEncoder(embed_dim=8, branch_hidden=(16, 12), fusion_hidden=(16, 12),
                        precision=name)
  speech, spectrogram = jnp.zeros((4, 10)), jnp.zeros((4, 6))
  variables = jax.eval_shape(
      lambda rng: model.init(rng, speech, spectrogram, train=False), jax.random.PRNGKey(0))
  assert_all_at(contraction_precisions(
      lambda v, a, b: model.apply(v, a, b, train=False), variables, speech, spectrogram),
      name)


def test_unknown_precision_is_a_clear_error():
  with pytest.raises(ValueError, match="precision must be one of"):
    jax.eval_shape(wav2vec2.Model(TINY_SPEECH, precision="fast").init, jax.random.PRNGKey(0),
                   jnp.zeros((1, 400)))
