"""The Flax fusion encoder against the authors' PyTorch module: sizes, outputs, BatchNorm."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clasp_jax.models.fusion import FusionEncoder

torch = pytest.importorskip("torch")
from tests.helpers import torch_fusion as torch_reference  # noqa: E402  (needs torch)

SPEECH_DIM, SPECTROGRAM_DIM, BATCH = 1024, 1000, 6
FLAX_TO_TORCH_BRANCH = {"linear_0": 0, "norm_0": 1, "linear_1": 4, "norm_1": 5, "linear_2": 8}
FLAX_TO_TORCH_CONCAT_MIX = {"linear_0": 0, "norm_0": 1, "linear_1": 3, "linear_2": 5}


def _init(fusion, mode="joint"):
  model = FusionEncoder(fusion=fusion, mode=mode)
  speech = jnp.zeros((2, SPEECH_DIM))
  spectrogram = jnp.zeros((2, SPECTROGRAM_DIM))
  variables = model.init(jax.random.key(0), speech, spectrogram, train=False)
  return model, variables


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _linear_or_norm(torch_module, flax_params, flax_stats):
  """Copies one PyTorch Linear or BatchNorm1d into Flax leaves."""
  if isinstance(torch_module, torch.nn.Linear):
    flax_params["kernel"] = jnp.asarray(torch_module.weight.detach().numpy().T)
    flax_params["bias"] = jnp.asarray(torch_module.bias.detach().numpy())
  else:
    flax_params["scale"] = jnp.asarray(torch_module.weight.detach().numpy())
    flax_params["bias"] = jnp.asarray(torch_module.bias.detach().numpy())
    flax_stats["mean"] = jnp.asarray(torch_module.running_mean.numpy())
    flax_stats["var"] = jnp.asarray(torch_module.running_var.numpy())


def _torch_to_flax(torch_model, variables, fusion):
  params = flax.core.unfreeze(variables["params"])
  stats = flax.core.unfreeze(variables["batch_stats"])
  branches = {"speech_branch": torch_model.audio_seq if fusion == "concat" else torch_model.text_seq,
              "spectrogram_branch": torch_model.image_seq}
  for name, sequential in branches.items():
    for layer, index in FLAX_TO_TORCH_BRANCH.items():
      _linear_or_norm(sequential[index], params[name][layer], stats[name].setdefault(layer, {}))
  if fusion == "concat":
    for layer, index in FLAX_TO_TORCH_CONCAT_MIX.items():
      _linear_or_norm(torch_model.mix_seq[index], params["mix"][layer],
                      stats["mix"].setdefault(layer, {}))
  else:
    for side, suffix in (("speech_gate", "text"), ("spectrogram_gate", "image")):
      for flax_name, torch_name in (("input_gate", "input_gate"), ("forget_gate", "forget_gate"),
                                    ("candidate", "tanh")):
        module = getattr(torch_model, f"{torch_name}_{suffix}")[0]
        _linear_or_norm(module, params["mix"][side][flax_name], {})
    _linear_or_norm(torch_model.weight[0], params["mix"]["mix_weights"], {})
  return {"params": params, "batch_stats": stats}


def _torch_model(fusion):
  torch.manual_seed(0)
  cls = torch_reference.ConcatFusion if fusion == "concat" else torch_reference.GatedFusion
  return cls(SPEECH_DIM, SPECTROGRAM_DIM)


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_parameter_count_and_shapes_match_pytorch(fusion):
  model, variables = _init(fusion)
  torch_model = _torch_model(fusion)
  torch_params = sum(p.numel() for p in torch_model.parameters())
  torch_buffers = sum(b.numel() for name, b in torch_model.named_buffers()
                      if not name.endswith("num_batches_tracked"))
  assert _count(variables["params"]) == torch_params
  assert _count(variables["batch_stats"]) == torch_buffers
  out = model.apply(variables, jnp.ones((3, SPEECH_DIM)), jnp.ones((3, SPECTROGRAM_DIM)),
                    train=False)
  assert out.shape == (3, 768)


def test_paper_concat_encoder_has_the_expected_size():
  _, variables = _init("concat")
  # Two branches (in->768->576->768 with two BatchNorms) and the 1536->1024->800->768 mix.
  branch = lambda d: d * 768 + 768 + 2 * 768 + 768 * 576 + 576 + 2 * 576 + 576 * 768 + 768
  mix = 1536 * 1024 + 1024 + 2 * 1024 + 1024 * 800 + 800 + 800 * 768 + 768
  assert _count(variables["params"]) == branch(1024) + branch(1000) + mix


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_outputs_and_batchnorm_statistics_match_pytorch(fusion):
  model, variables = _init(fusion)
  torch_model = _torch_model(fusion)
  rng = np.random.default_rng(0)
  speech = rng.standard_normal((BATCH, SPEECH_DIM)).astype(np.float32)
  spectrogram = rng.standard_normal((BATCH, SPECTROGRAM_DIM)).astype(np.float32)
  variables = _torch_to_flax(torch_model, variables, fusion)

  # Train mode without dropout: batch statistics and running-statistics updates.
  for module in torch_model.modules():
    if isinstance(module, torch.nn.Dropout):
      module.p = 0.0
  torch_model.train()
  expected = torch_model(torch.from_numpy(speech), torch.from_numpy(spectrogram)).detach().numpy()
  nodrop = FusionEncoder(fusion=fusion, branch_dropout=(0.0, 0.0))
  out, updates = nodrop.apply(variables, speech, spectrogram, train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.key(1)})
  np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)
  torch_running_var = torch_model.image_seq[1].running_var.numpy()
  np.testing.assert_allclose(updates["batch_stats"]["spectrogram_branch"]["norm_0"]["var"],
                             torch_running_var, rtol=1e-4, atol=1e-6)

  # Eval mode: running statistics, no dropout.
  torch_model.eval()
  expected = torch_model(torch.from_numpy(speech), torch.from_numpy(spectrogram)).detach().numpy()
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
  out = model.apply(variables, speech, spectrogram, train=False)
  np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,present,absent", [
    ("speech", "speech_branch", "spectrogram_branch"),
    ("spectrogram", "spectrogram_branch", "speech_branch"),
])
def test_single_branch_modes_build_only_their_branch(mode, present, absent):
  model, variables = _init("concat", mode)
  assert present in variables["params"] and absent not in variables["params"]
  assert "mix" not in variables["params"]
  out = model.apply(variables, jnp.ones((2, SPEECH_DIM)), jnp.ones((2, SPECTROGRAM_DIM)),
                    train=False)
  assert out.shape == (2, 768)


def test_dropout_is_active_in_training_only():
  model, variables = _init("concat")
  rng = np.random.default_rng(3)
  speech = rng.standard_normal((4, SPEECH_DIM)).astype(np.float32)
  spectrogram = rng.standard_normal((4, SPECTROGRAM_DIM)).astype(np.float32)
  run = lambda seed: model.apply(variables, speech, spectrogram, train=True,
                                 rngs={"dropout": jax.random.key(seed)}, mutable=["batch_stats"])[0]
  assert not np.allclose(run(1), run(2))
  eval_a = model.apply(variables, speech, spectrogram, train=False)
  np.testing.assert_array_equal(eval_a, model.apply(variables, speech, spectrogram, train=False))


def test_unknown_fusion_is_a_clear_error():
  with pytest.raises(ValueError, match="fusion must be one of"):
    _init("attention")
