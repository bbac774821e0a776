"""HuBERT / wav2vec2 in Flax against transformers' PyTorch models, and the checkpoint loader."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from clasp_jax.models import wav2vec2_checkpoint  # pylint: disable=g-import-not-at-top
from clasp_jax.models import wav2vec2  # pylint: disable=g-import-not-at-top

TOLERANCE = 1e-4


# XLA's optimisation passes cost more than they save on these tiny graphs (conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compiles")


NUM_SAMPLES = 2000
LENGTHS = np.array([2000, 1500, 777])

# (model_type, feat_extract_norm, do_stable_layer_norm, conv_bias, extra config)
VARIANTS = [
    ("hubert", "layer", True, True, {}),  # hubert-large-ls960-ft's layout
    ("hubert", "group", False, False, {"feat_proj_layer_norm": False}),
    ("wav2vec2", "group", False, False, {}),  # wav2vec2-base-960h's layout
    ("wav2vec2", "layer", True, True, {"num_conv_pos_embeddings": 15}),  # odd positional kernel
]


def tiny_hf_config(model_type, feat_extract_norm, stable, conv_bias, **extra):
  config_class = {"hubert": transformers.HubertConfig, "wav2vec2": transformers.Wav2Vec2Config}
  settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=12,
                  feat_extract_norm=feat_extract_norm, do_stable_layer_norm=stable,
                  conv_bias=conv_bias)
  settings.update(extra)
  return config_class[model_type](**settings)


def ctc_model_class(model_type):
  return {"hubert": transformers.HubertForCTC, "wav2vec2": transformers.Wav2Vec2ForCTC}[model_type]


def randomise_norms(model, seed):
  """Random init leaves layer norms at (1, 0), which would hide swapped scale/bias tensors."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "norm" in name:
        centre = 1.0 if name.endswith("weight") else 0.0
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3 + centre)


def padded_batch(seed=0):
  waveform = np.random.RandomState(seed).randn(len(LENGTHS), NUM_SAMPLES).astype(np.float32)
  mask = np.arange(NUM_SAMPLES)[None] < LENGTHS[:, None]
  return waveform * mask, mask


def _variant_id(variant):
  model_type, norm, stable, bias, _ = variant
  return f"{model_type}-{norm}-{'stable' if stable else 'post'}-{'bias' if bias else 'nobias'}"


@pytest.fixture(scope="module", params=VARIANTS, ids=_variant_id)
def ctc_checkpoint(request, tmp_path_factory):
  model_type, norm, stable, bias, extra = request.param
  torch.manual_seed(0)
  config = tiny_hf_config(model_type, norm, stable, bias, **extra)
  model = ctc_model_class(model_type)(config).eval()
  randomise_norms(model, seed=1)
  folder = tmp_path_factory.mktemp(f"{model_type}_{norm}")
  model.save_pretrained(folder)
  return model, str(folder)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, output_hidden_states=True):
  """One jitted apply per model, so tests sharing a model and input shapes compile once."""
  return jax.jit(functools.partial(model.apply, output_hidden_states=output_hidden_states))


def flax_forward(checkpoint, waveform, lengths=None, **kwargs):
  return _jitted_apply(checkpoint.model)(
      {"params": checkpoint.params}, jnp.asarray(waveform),
      None if lengths is None else jnp.asarray(lengths), **kwargs)


def max_diff(flax_value, torch_value):
  return float(np.max(np.abs(np.asarray(flax_value) - torch_value.detach().numpy())))


def test_parity_without_padding(ctc_checkpoint):
  torch_model, folder = ctc_checkpoint
  checkpoint = wav2vec2_checkpoint.load(folder)
  assert checkpoint.config.ctc_vocab_size == 12
  waveform, _ = padded_batch()
  outputs = flax_forward(checkpoint, waveform)
  with torch.no_grad():
    reference = torch_model(torch.tensor(waveform), output_hidden_states=True)
    base = getattr(torch_model, checkpoint.config.model_type)(torch.tensor(waveform))
  assert max_diff(outputs["logits"], reference.logits) < TOLERANCE
  assert max_diff(outputs["last_hidden_state"], base.last_hidden_state) < TOLERANCE
  assert len(outputs["hidden_states"]) == len(reference.hidden_states) == 3
  for flax_state, torch_state in zip(outputs["hidden_states"], reference.hidden_states):
    assert max_diff(flax_state, torch_state) < TOLERANCE


def test_parity_with_padding(ctc_checkpoint):
  """Padded batch + attention mask, computed exactly as transformers does (all frames)."""
  torch_model, folder = ctc_checkpoint
  # Group norm: statistics over the padding too, as transformers takes them. The layer-norm
  # extractor does not depend on the option, so those variants share the default model.
  group_norm = torch_model.config.feat_extract_norm == "group"
  checkpoint = wav2vec2_checkpoint.load(folder, group_norm_valid_frames_only=not group_norm)
  waveform, mask = padded_batch()
  outputs = flax_forward(checkpoint, waveform, LENGTHS)
  with torch.no_grad():
    attention_mask = torch.tensor(mask.astype(np.int64))
    reference = torch_model(torch.tensor(waveform), attention_mask=attention_mask)
    base = getattr(torch_model, checkpoint.config.model_type)(
        torch.tensor(waveform), attention_mask=attention_mask)
  assert max_diff(outputs["logits"], reference.logits) < TOLERANCE
  assert max_diff(outputs["last_hidden_state"], base.last_hidden_state) < TOLERANCE
  expected_frames = torch_model._get_feat_extract_output_lengths(torch.tensor(LENGTHS)).numpy()
  np.testing.assert_array_equal(np.asarray(outputs["frame_mask"]).sum(axis=1), expected_frames)


def test_padded_rows_equal_clips_alone(ctc_checkpoint):
  """Default model: each padded row equals transformers on that clip with no padding at all,
  for the group-norm extractor too, and pooling covers valid frames only."""
  torch_model, folder = ctc_checkpoint
  checkpoint = wav2vec2_checkpoint.load(folder)
  waveform, _ = padded_batch()
  outputs = flax_forward(checkpoint, waveform, LENGTHS)
  for row, length in enumerate(LENGTHS):
    with torch.no_grad():
      base_model = getattr(torch_model, checkpoint.config.model_type)
      alone = base_model(torch.tensor(waveform[row:row + 1, :length])).last_hidden_state[0]
    frames = alone.shape[0]
    assert max_diff(outputs["last_hidden_state"][row, :frames], alone) < TOLERANCE
    assert max_diff(outputs["pooled"][row], alone.mean(0)) < TOLERANCE


def test_mask_time_indices_use_masked_spec_embed(ctc_checkpoint):
  torch_model, folder = ctc_checkpoint
  checkpoint = wav2vec2_checkpoint.load(folder)
  waveform, _ = padded_batch()
  frames = checkpoint.config.frame_lengths(NUM_SAMPLES)
  mask_time = np.zeros((len(LENGTHS), frames), bool)
  mask_time[:, 5:15] = True
  outputs = flax_forward(checkpoint, waveform, mask_time_indices=jnp.asarray(mask_time))
  with torch.no_grad():
    reference = torch_model(torch.tensor(waveform), mask_time_indices=torch.tensor(mask_time))
  assert max_diff(outputs["logits"], reference.logits) < TOLERANCE
  unmasked = flax_forward(checkpoint, waveform)
  assert np.abs(np.asarray(unmasked["logits"]) - np.asarray(outputs["logits"])).max() > 1e-3


def test_bare_encoder_checkpoint_loads_without_head(tmp_path):
  torch.manual_seed(0)
  model = transformers.HubertModel(tiny_hf_config("hubert", "layer", True, True)).eval()
  model.save_pretrained(tmp_path)
  checkpoint = wav2vec2_checkpoint.load(tmp_path)
  assert checkpoint.config.ctc_vocab_size is None
  waveform, _ = padded_batch()
  outputs = flax_forward(checkpoint, waveform)
  assert "logits" not in outputs
  with torch.no_grad():
    reference = model(torch.tensor(waveform)).last_hidden_state
  assert max_diff(outputs["last_hidden_state"], reference) < TOLERANCE
  with pytest.raises(wav2vec2_checkpoint.CheckpointError,
                     match=r"missing tensor\(s\): lm_head.weight"):
    wav2vec2_checkpoint.load(tmp_path, with_ctc_head=True)


def _save_tiny_ctc(folder, model_type="wav2vec2"):
  torch.manual_seed(0)
  model = ctc_model_class(model_type)(tiny_hf_config(model_type, "group", False, False)).eval()
  model.save_pretrained(folder)
  return model


def test_pytorch_bin_and_legacy_weight_norm_names(tmp_path):
  """pytorch_model.bin read weights-only, with the pre-parametrization weight_g / weight_v names."""
  model = _save_tiny_ctc(tmp_path)
  state_dict = model.state_dict()
  renamed = {}
  for name, tensor in state_dict.items():
    name = name.replace("parametrizations.weight.original0", "weight_g")
    renamed[name.replace("parametrizations.weight.original1", "weight_v")] = tensor
  assert any(name.endswith("weight_g") for name in renamed)
  os.remove(tmp_path / "model.safetensors")
  torch.save(renamed, tmp_path / "pytorch_model.bin")
  checkpoint = wav2vec2_checkpoint.load(tmp_path)
  waveform, _ = padded_batch()
  with torch.no_grad():
    reference = model(torch.tensor(waveform)).logits
  assert max_diff(flax_forward(checkpoint, waveform)["logits"], reference) < TOLERANCE


def test_pytorch_bin_with_pickled_code_is_refused(tmp_path):
  _save_tiny_ctc(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  torch.save({"model": transformers.HubertConfig()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(wav2vec2_checkpoint.CheckpointError, match="weights-only"):
    wav2vec2_checkpoint.load(tmp_path)


def _rewrite_safetensors(folder, edit):
  path = folder / "model.safetensors"
  tensors = safetensors_numpy.load_file(str(path))
  edit(tensors)
  safetensors_numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
  _save_tiny_ctc(tmp_path)
  name = "wav2vec2.encoder.layers.1.attention.k_proj.bias"
  _rewrite_safetensors(tmp_path, lambda tensors: tensors.pop(name))
  with pytest.raises(wav2vec2_checkpoint.CheckpointError, match=rf"1 missing tensor\(s\): {name}"):
    wav2vec2_checkpoint.load(tmp_path)


def test_unused_tensor_is_named(tmp_path):
  _save_tiny_ctc(tmp_path)
  extra = {"wav2vec2.quantizer.codevectors": np.zeros((1, 4, 8), np.float32)}
  _rewrite_safetensors(tmp_path, lambda tensors: tensors.update(extra))
  with pytest.raises(wav2vec2_checkpoint.CheckpointError,
                     match=r"1 unused tensor\(s\): wav2vec2.quantizer.codevectors"):
    wav2vec2_checkpoint.load(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
  _save_tiny_ctc(tmp_path)
  _rewrite_safetensors(tmp_path, lambda t: t.update({"lm_head.bias": np.zeros((13,), np.float32)}))
  with pytest.raises(wav2vec2_checkpoint.CheckpointError, match=r"shape mismatch.*lm_head.bias"):
    wav2vec2_checkpoint.load(tmp_path)


def test_unsupported_options_and_bad_folders_fail_clearly(tmp_path):
  _save_tiny_ctc(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["add_adapter"] = True
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(wav2vec2_checkpoint.CheckpointError, match="add_adapter"):
    wav2vec2_checkpoint.load(tmp_path)
  with pytest.raises(wav2vec2_checkpoint.CheckpointError, match="not a checkpoint folder"):
    wav2vec2_checkpoint.load(tmp_path / "nowhere")
  os.remove(tmp_path / "model.safetensors")
  config["add_adapter"] = False
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(wav2vec2_checkpoint.CheckpointError, match="no model.safetensors"):
    wav2vec2_checkpoint.load(tmp_path)


def test_sharded_safetensors(tmp_path):
  model = _save_tiny_ctc(tmp_path)
  tensors = safetensors_numpy.load_file(str(tmp_path / "model.safetensors"))
  os.remove(tmp_path / "model.safetensors")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for shard, shard_names in shards.items():
    safetensors_numpy.save_file({n: tensors[n] for n in shard_names}, str(tmp_path / shard))
    weight_map.update({n: shard for n in shard_names})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  waveform, _ = padded_batch()
  with torch.no_grad():
    reference = model(torch.tensor(waveform)).logits
  outputs = flax_forward(wav2vec2_checkpoint.load(tmp_path), waveform)
  assert max_diff(outputs["logits"], reference) < TOLERANCE


def _random_state_dict(model, seed):
  """Fills a meta-device model with random weights quickly (PyTorch's own init takes ~10 s
  for HuBERT-large); norms stay near 1 so activations keep a sane scale."""
  model.to_empty(device="cpu")
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "norm" in name or name.endswith("original0"):
        tensor.fill_(1.0 if name.endswith(("weight", "original0")) else 0.0)
      else:
        tensor.normal_(0.0, 0.02, generator=generator)
  return model.eval()


@pytest.mark.parametrize("name", sorted(wav2vec2.PRESETS))
def test_reference_checkpoint_shapes_instantiate_and_run(name):
  """The real HuBERT-large / wav2vec2-base layouts (configs from the project reference)
  load through the same mapping and match PyTorch on a tiny input."""
  preset = wav2vec2.PRESETS[name]
  config_class = {"hubert": transformers.HubertConfig, "wav2vec2": transformers.Wav2Vec2Config}
  with torch.device("meta"):
    hf_config = config_class[preset["model_type"]](**preset)
    torch_model = ctc_model_class(preset["model_type"])(hf_config)
  torch_model = _random_state_dict(torch_model, seed=0)
  config = wav2vec2.Config.from_hf_dict(preset)
  assert (config.hidden_size, config.num_hidden_layers) == (
      (1024, 24) if preset["model_type"] == "hubert" else (768, 12))
  params = wav2vec2_checkpoint.convert_state_dict(
      {key: value.numpy() for key, value in torch_model.state_dict().items()}, config)
  waveform = np.random.RandomState(0).randn(1, 1600).astype(np.float32)
  outputs = jax.jit(wav2vec2.Model(config).apply)({"params": params}, jnp.asarray(waveform))
  with torch.no_grad():
    reference = torch_model(torch.tensor(waveform)).logits
  assert outputs["logits"].shape == (1, 4, 32)
  assert max_diff(outputs["logits"], reference) < TOLERANCE


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_hubert")
  torch.manual_seed(0)
  model = transformers.HubertForCTC(tiny_hf_config("hubert", "layer", True, True)).eval()
  model.save_pretrained(folder)
  return wav2vec2_checkpoint.load(folder)


def test_bfloat16_compute_stays_close(tiny_checkpoint):
  waveform, _ = padded_batch()
  variables = {"params": tiny_checkpoint.params}
  float32 = jax.jit(tiny_checkpoint.model.apply)(variables, waveform, LENGTHS)
  bf16_model = wav2vec2.Model(tiny_checkpoint.config, dtype=jnp.bfloat16)
  bfloat16 = jax.jit(bf16_model.apply)(variables, waveform, LENGTHS)
  assert bfloat16["last_hidden_state"].dtype == jnp.bfloat16
  reference = np.asarray(float32["pooled"])
  relative = np.abs(np.asarray(bfloat16["pooled"]) - reference).max() / np.abs(reference).max()
  assert relative < 0.05


def test_remat_gives_the_same_values_and_gradients(tiny_checkpoint):
  waveform, _ = padded_batch()

  def loss(params, model):
    return jnp.sum(model.apply({"params": params}, waveform, LENGTHS)["pooled"] ** 2)

  plain = wav2vec2.Model(tiny_checkpoint.config)
  remat = wav2vec2.Model(tiny_checkpoint.config, remat=True)
  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  plain_value, plain_grads = value_and_grad(tiny_checkpoint.params, plain)
  remat_value, remat_grads = value_and_grad(tiny_checkpoint.params, remat)
  np.testing.assert_allclose(remat_value, plain_value, rtol=1e-6)
  for plain_leaf, remat_leaf in zip(jax.tree_util.tree_leaves(plain_grads),
                                    jax.tree_util.tree_leaves(remat_grads)):
    np.testing.assert_allclose(remat_leaf, plain_leaf, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(leaf).max()) for leaf in jax.tree_util.tree_leaves(plain_grads)) > 0


def test_training_mode_applies_dropout_and_layerdrop(tiny_checkpoint):
  waveform, _ = padded_batch()
  model = tiny_checkpoint.model

  @functools.partial(jax.jit, static_argnums=1)
  def pooled(seed, deterministic):
    outputs = model.apply({"params": tiny_checkpoint.params}, waveform, LENGTHS,
                          deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(seed)})
    return outputs["pooled"]

  run = lambda seed, deterministic: np.asarray(pooled(seed, deterministic))

  inference = run(0, True)
  np.testing.assert_array_equal(run(1, True), inference)
  assert np.abs(run(0, False) - inference).max() > 1e-3
  assert np.abs(run(0, False) - run(1, False)).max() > 1e-3
  assert np.isfinite(run(2, False)).all()


def test_frame_lengths_match_transformers():
  preset = wav2vec2.PRESETS["facebook/wav2vec2-base-960h"]
  conv_layout = {key: preset[key] for key in ("conv_dim", "conv_stride", "conv_kernel")}
  torch_model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **conv_layout))
  config = wav2vec2.Config.from_hf_dict(preset)
  lengths = np.array([400, 401, 16000, 64000, 12345])
  expected = torch_model._get_feat_extract_output_lengths(torch.tensor(lengths)).numpy()
  np.testing.assert_array_equal(config.frame_lengths(lengths), expected)
  np.testing.assert_array_equal(np.asarray(config.frame_lengths(jnp.asarray(lengths))), expected)
  assert config.frame_lengths(399) == 0 and wav2vec2.receptive_field(config) == 400
