"""The assembled CLASP model: towers by name, from waveform (or features) to embeddings."""

import copy
import functools
import json

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clasp_jax.common.config_args import ConfigError
from clasp_jax.common.workdir import upgrade_config
from clasp_jax.models import clasp
from clasp_jax.models import text_tower
from configs import base

# XLA's optimisation passes cost more than they save on these tiny graphs (conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compiles")

SAMPLES = 4000  # 0.25 s at 16 kHz: 199 SSL frames, 26 spectrogram frames
LENGTHS = np.array([4000, 3100, 1777, 2500])
SSL_DIM, SPECTROGRAM_DIM, TEXT_DIM = 32, 20, 16  # the `tiny,speech=audio` sizes


def audio_config(mode="joint", **speech):
  config = base.get_config(f"tiny,speech=audio,mode={mode}")
  config.model.speech.update(speech)
  return config


def audio_batch(lengths=LENGTHS, samples=SAMPLES, seed=0):
  rng = np.random.RandomState(seed)
  mask = np.arange(samples)[None] < np.asarray(lengths)[:, None]
  audio = (rng.randn(len(lengths), samples) * 0.1).astype(np.float32) * mask
  text = rng.randn(len(lengths), TEXT_DIM).astype(np.float32)
  return {"audio": audio, "audio_mask": mask, "text": text}


def tree_shapes(tree):
  return jax.tree.map(lambda leaf: tuple(np.shape(leaf)), tree)


@functools.lru_cache(maxsize=None)
def _init(model):
  return jax.jit(model.init)


@functools.lru_cache(maxsize=None)
def _apply(model, method=None, train=False):
  if train:
    return jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  return jax.jit(functools.partial(model.apply, method=method))


def initialised(model, batch, seed=0):
  """Variables with batch statistics moved off their (0, 1) init by one training pass, so
  that inference-mode tests see real normalisation."""
  variables = _init(model)(jax.random.key(seed), batch)
  _, updates = _apply(model, train=True)(variables, batch, rngs={"dropout": jax.random.key(1)})
  return {"params": variables["params"], **updates}


@pytest.fixture(scope="module")
def audio_model():
  config = audio_config()
  model = clasp.model_from_config(config.model, config.loss)
  return model, initialised(model, audio_batch())


def test_audio_mode_runs_from_waveform_to_unit_embeddings(audio_model):
  model, variables = audio_model
  zspeech, ztext, out = _apply(model)(variables, audio_batch())
  assert zspeech.shape == ztext.shape == (4, TEXT_DIM)
  np.testing.assert_allclose(np.linalg.norm(zspeech, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(ztext, axis=-1), 1.0, atol=1e-6)
  frames = 199
  assert out["ssl/hidden"].shape == (4, frames, SSL_DIM)
  assert out["ssl/pooled"].shape == (4, SSL_DIM)
  assert out["spectrogram/features"].shape == (4, SPECTROGRAM_DIM)
  # The tiny extractor sees 40 samples every 20: frames lying wholly inside each clip.
  np.testing.assert_array_equal(np.sum(out["ssl/frame_mask"], axis=1), (LENGTHS - 40) // 20 + 1)
  assert all(np.isfinite(np.asarray(value)).all() for value in jax.tree.leaves(out))
  # Different clips, different embeddings.
  assert np.abs(zspeech[0] - zspeech[1]).max() > 1e-3


def test_padded_clip_embeds_as_the_clip_alone(audio_model):
  model, variables = audio_model
  batch = audio_batch()
  together = _apply(model)(variables, batch)
  for row in (1, 2):
    length = LENGTHS[row]
    alone = _apply(model)(variables, {name: value[row:row + 1, :length] if name != "text"
                                      else value[row:row + 1] for name, value in batch.items()})
    np.testing.assert_allclose(together[0][row], alone[0][0], atol=1e-5)
    np.testing.assert_allclose(together[2]["ssl/pooled"][row], alone[2]["ssl/pooled"][0],
                               atol=1e-5)
    np.testing.assert_allclose(together[2]["spectrogram/features"][row],
                               alone[2]["spectrogram/features"][0], atol=1e-5)
  # What sits in the padding does not matter.
  noisy = dict(batch, audio=np.where(batch["audio_mask"], batch["audio"], 5.0).astype(np.float32))
  np.testing.assert_allclose(_apply(model)(variables, noisy)[0], together[0], atol=1e-6)


@pytest.mark.parametrize("mode, present, absent", [
    ("joint", {"ssl_encoder", "spectrogram_encoder"}, set()),
    ("speech", {"ssl_encoder"}, {"spectrogram_encoder"}),
    ("spectrogram", {"spectrogram_encoder"}, {"ssl_encoder"}),
])
def test_each_mode_builds_only_its_branches(mode, present, absent):
  config = audio_config(mode)
  model = clasp.model_from_config(config.model, config.loss)
  shapes = jax.eval_shape(model.init, jax.random.key(0), audio_batch())
  names = set(shapes["params"])
  assert names == {"speech_encoder", "logit_scale"} | present
  assert not names & absent
  branches = {"joint": {"speech_branch", "spectrogram_branch", "mix"},
              "speech": {"speech_branch"}, "spectrogram": {"spectrogram_branch"}}[mode]
  assert set(shapes["params"]["speech_encoder"]) == branches
  # Only the spectrogram encoder and the fusion encoder keep BatchNorm statistics.
  assert set(shapes["batch_stats"]) == {"speech_encoder"} | (present & {"spectrogram_encoder"})


def test_speech_audio_config_builds_small_random_towers():
  """The `speech=audio` config (no `tiny`): a 4-layer 256-wide HuBERT at random init and the
  default spectrogram CNN, whose 256-d and 1000-d vectors feed the fusion branches."""
  config = base.get_config("speech=audio")
  model = clasp.model_from_config(config.model, config.loss)
  batch = {"audio": np.zeros((2, 16_000), np.float32), "audio_mask": np.ones((2, 16_000), bool),
           "text": np.zeros((2, 768), np.float32)}
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
  assert set(shapes) == {"speech_encoder", "logit_scale", "ssl_encoder", "spectrogram_encoder"}
  assert len(shapes["ssl_encoder"]["encoder"]) == 4 + 2  # layers, positional conv, layer norm
  assert shapes["speech_encoder"]["speech_branch"]["linear_0"]["kernel"].shape == (256, 768)
  assert shapes["speech_encoder"]["spectrogram_branch"]["linear_0"]["kernel"].shape == (1000, 768)
  assert clasp.pretrained_params(config) == {}  # random init reads nothing


def test_feature_and_audio_models_share_the_fusion_encoder(audio_model):
  """A feature-mode model's fusion weights, copied into an audio-mode model, give the
  audio model's embeddings when fed the vectors its audio tower computed."""
  audio, audio_variables = audio_model
  config = base.get_config("tiny")
  config.data.dims.update({"speech": SSL_DIM, "spectrogram": SPECTROGRAM_DIM})
  features = clasp.model_from_config(config.model, config.loss)
  rng = np.random.RandomState(5)
  feature_batch = {name: rng.randn(8, dim).astype(np.float32) for name, dim in
                   (("speech", SSL_DIM), ("spectrogram", SPECTROGRAM_DIM), ("text", TEXT_DIM))}
  feature_variables = initialised(features, feature_batch, seed=7)
  assert (tree_shapes(feature_variables["params"]["speech_encoder"])
          == tree_shapes(audio_variables["params"]["speech_encoder"]))

  shared = copy.deepcopy(jax.device_get(audio_variables))
  for collection in ("params", "batch_stats"):
    shared[collection]["speech_encoder"] = feature_variables[collection]["speech_encoder"]
  shared["params"]["logit_scale"] = feature_variables["params"]["logit_scale"]
  batch = audio_batch()
  zspeech, _, out = _apply(audio)(shared, batch)
  vectors = {"speech": out["ssl/pooled"], "spectrogram": out["spectrogram/features"],
             "text": batch["text"]}
  feature_zspeech, _, _ = _apply(features)(feature_variables, vectors)
  np.testing.assert_allclose(zspeech, feature_zspeech, atol=1e-6)
  # The copy mattered: with its own fusion weights the audio model embeds differently.
  assert np.abs(_apply(audio)(audio_variables, batch)[0] - zspeech).max() > 1e-3


def test_embed_speech_and_text_equal_the_call(audio_model):
  model, variables = audio_model
  batch = audio_batch()
  zspeech, ztext, _ = _apply(model)(variables, batch)
  speech_only = {"audio": batch["audio"], "audio_mask": batch["audio_mask"]}
  np.testing.assert_allclose(_apply(model, "embed_speech")(variables, speech_only), zspeech,
                             atol=1e-6)
  np.testing.assert_allclose(_apply(model, "embed_text")(variables, {"text": batch["text"]}),
                             ztext, atol=1e-6)
  with pytest.raises(ValueError, match=r"lacks \['audio', 'audio_mask'\] \(audio mode\)"):
    model.apply(variables, {"text": batch["text"]}, method="embed_speech")


def test_text_encoder_tower_by_name(labse_like_dir):
  """kind='encoder': the module comes from the folder's configs, its weights from
  `pretrained_params`, and together they embed as the loaded text tower does."""
  config = base.get_config("tiny")
  config.model.text.kind = "encoder"
  config.model.text.encoder = labse_like_dir
  model = clasp.model_from_config(config.model, config.loss)
  tower = text_tower.load(labse_like_dir)
  input_ids, attention_mask = tower.pad_batch(tower.tokenize(["a cat", "Zürich façade 日本"]))
  batch = {"speech": np.ones((2, 24), np.float32), "spectrogram": np.ones((2, 20), np.float32),
           "input_ids": input_ids, "attention_mask": attention_mask}
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  pretrained = clasp.pretrained_params(config)
  assert set(pretrained) == {"text_encoder"}
  assert tree_shapes(pretrained["text_encoder"]) == tree_shapes(shapes["params"]["text_encoder"])

  variables = _init(model)(jax.random.key(0), batch)
  variables = {**variables, "params": {**variables["params"], **pretrained}}
  zspeech, ztext, _ = _apply(model)(variables, batch)
  np.testing.assert_allclose(ztext, tower.embed(["a cat", "Zürich façade 日本"]), atol=1e-5)
  np.testing.assert_allclose(_apply(model, "embed_text")(variables, batch), ztext, atol=1e-6)
  np.testing.assert_allclose(_apply(model, "embed_speech")(variables, batch), zspeech, atol=1e-6)


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory):
  pytest.importorskip("torch")
  from tests.helpers import checkpoints
  return checkpoints.build_hubert(tmp_path_factory.mktemp("hubert"))


@pytest.mark.parametrize("layer", [-1, 1])
def test_ssl_checkpoint_loads_through_the_config(hubert_dir, layer):
  """config.model.speech.checkpoint: the pooled SSL vectors equal transformers' PyTorch
  HuBERT on each clip alone (feature-extractor normalised, hidden state mean-pooled)."""
  import torch
  torch_model, feature_extractor, folder = hubert_dir
  config = audio_config("speech", checkpoint=folder, layer=layer)
  model = clasp.model_from_config(config.model, config.loss)
  pretrained = clasp.pretrained_params(config)
  assert set(pretrained) == {"ssl_encoder"}
  batch = audio_batch()
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  assert tree_shapes(pretrained["ssl_encoder"]) == tree_shapes(shapes["params"]["ssl_encoder"])
  variables = _init(model)(jax.random.key(0), batch)
  variables = {**variables, "params": {**variables["params"], **pretrained}}
  _, _, out = _apply(model)(variables, batch)

  for row, length in enumerate(LENGTHS):
    inputs = feature_extractor(batch["audio"][row, :length], sampling_rate=16_000,
                               return_tensors="pt")
    with torch.no_grad():
      reference = torch_model(inputs.input_values, output_hidden_states=True)
    hidden = reference.last_hidden_state if layer == -1 else reference.hidden_states[layer]
    np.testing.assert_allclose(out["ssl/pooled"][row], hidden.mean(dim=1)[0].numpy(), atol=1e-4)


def test_ctc_checkpoint_head_is_left_out(ctc_encoder):
  """A *ForCTC checkpoint (wav2vec2-base layout) serves as the SSL encoder without its head."""
  _, _, folder = ctc_encoder
  config = audio_config("speech", checkpoint=str(folder))
  model = clasp.model_from_config(config.model, config.loss)
  pretrained = clasp.pretrained_params(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), audio_batch())
  assert "lm_head" not in pretrained["ssl_encoder"]
  assert tree_shapes(pretrained["ssl_encoder"]) == tree_shapes(shapes["params"]["ssl_encoder"])


def test_auxiliary_ctc_head_gives_per_frame_logits():
  config = audio_config("speech", ctc_vocab_size=7)
  model = clasp.model_from_config(config.model, config.loss)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          audio_batch())
  assert set(shapes["params"]) == {"speech_encoder", "logit_scale", "ssl_encoder", "ctc_head"}
  _, _, out = jax.eval_shape(model.apply, shapes, audio_batch())
  assert out["ctc/logits"].shape == (4, 199, 7)


def log_mel_config(mode="joint"):
  """The tiny audio model with an SSL encoder over 80-bin log-mel frames (10 ms), its two
  convolutions striding 2 each: 25 frames a second, as in the embedded default."""
  config = audio_config(mode, ssl_input="log_mel", ctc_vocab_size=5)
  config.model.speech.ssl.update(conv_dim=(16, 16), conv_kernel=(3, 3), conv_stride=(2, 2))
  return config


def test_log_mel_ssl_input_strides_over_mel_frames():
  config = log_mel_config()
  model = clasp.model_from_config(config.model, config.loss)
  variables = initialised(model, audio_batch())
  first_conv = variables["params"]["ssl_encoder"]["feature_extractor"]["conv_layers_0_conv"]
  assert first_conv["kernel"].shape == (3, 80, 16)  # the mel bins are its input channels
  batch = audio_batch()
  together = _apply(model)(variables, batch)
  # 25 mel frames (centred, 10 ms hop) of a 0.25 s clip -> 12 -> 5 SSL frames.
  assert together[2]["ssl/hidden"].shape == (4, 5, SSL_DIM)
  assert together[2]["ctc/logits"].shape == (4, 5, 5)
  mel_frames = 1 + LENGTHS // 160
  np.testing.assert_array_equal(np.sum(together[2]["ssl/frame_mask"], axis=1),
                                ((mel_frames - 3) // 2 + 1 - 3) // 2 + 1)
  for row in (1, 2):
    length = LENGTHS[row]
    alone = _apply(model)(variables, {name: value[row:row + 1, :length] if name != "text"
                                      else value[row:row + 1] for name, value in batch.items()})
    np.testing.assert_allclose(together[0][row], alone[0][0], atol=1e-5)
  assert np.abs(together[0][0] - together[0][1]).max() > 1e-3


def test_log_mel_ssl_input_is_only_for_encoders_trained_from_scratch(hubert_dir):
  config = audio_config("speech", ssl_input="log_mel", checkpoint=hubert_dir[2])
  with pytest.raises(ConfigError, match="ssl_input='log_mel' is for an SSL encoder trained"):
    clasp.model_from_config(config.model, config.loss)
  config = audio_config("speech", ssl_input="mfcc")
  with pytest.raises(ConfigError, match="ssl_input must be one of"):
    clasp.model_from_config(config.model, config.loss)


def test_spectrogram_statistics_synchronise_over_the_data_axis():
  """model_from_config(axis_name='data') reaches the spectrogram encoder: a train-mode pass
  under shard_map on 8 devices updates its statistics as one device does on the whole batch."""
  config = audio_config("spectrogram")
  batch = audio_batch(lengths=np.array([4000, 4000, 300, 900, 2000, 3500, 1200, 4000]))
  dense = clasp.model_from_config(config.model, config.loss)
  sharded = clasp.model_from_config(config.model, config.loss, axis_name="data")
  variables = _init(dense)(jax.random.key(0), batch)

  def train_stats(model, variables, batch):
    _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(0)})
    return updates["batch_stats"]["spectrogram_encoder"]

  want = jax.jit(functools.partial(train_stats, dense))(variables, batch)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  got = jax.jit(jax.shard_map(functools.partial(train_stats, sharded), mesh=mesh,
                              in_specs=(P(), P("data")), out_specs=P(), check_vma=False))(
                                  variables, batch)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-5)


def test_feature_mode_is_unchanged_and_needs_no_towers():
  config = base.get_config("tiny")
  model = clasp.model_from_config(config.model, config.loss)
  batch = clasp.example_batch(config.data.dims)
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  assert set(shapes["params"]) == {"speech_encoder", "logit_scale"}
  assert clasp.pretrained_params(config) == {}
  with pytest.raises(ValueError, match=r"lacks \['spectrogram'\]"):
    model.init(jax.random.key(0), {"speech": batch["speech"], "text": batch["text"]})


def _legacy_config(encoder):
  """A config.json as workdirs wrote it before the towers moved under `model`."""
  config = base.get_config("tiny").to_dict()
  del config["model"]["speech"], config["model"]["text"]
  config["text"] = {"encoder": encoder, "trainable_top_layers": 2, "max_length": 32}
  return ml_collections.ConfigDict(config)


def test_upgrade_config_moves_the_legacy_text_block():
  legacy = _legacy_config("/models/LaBSE")
  upgraded = upgrade_config(legacy)
  assert "text" not in upgraded and "text" in legacy  # a copy; the input stays as it was
  assert upgraded.model.text.to_dict() == {"kind": "encoder", "encoder": "/models/LaBSE",
                                           "trainable_top_layers": 2, "max_length": 32,
                                           "preparation": "as_is"}
  assert upgraded.model.speech.kind == "features"
  assert upgrade_config(_legacy_config("")).model.text.kind == "precomputed"
  # Today's configs pass through unchanged.
  current = base.get_config("tiny,speech=audio")
  assert upgrade_config(current).to_dict() == current.to_dict()
  # ... and through config.json (tuples come back as lists) to the same model.
  reread = upgrade_config(ml_collections.ConfigDict(json.loads(current.to_json_best_effort())))
  assert (clasp.model_from_config(reread.model, reread.loss)
          == clasp.model_from_config(current.model, current.loss))
  # A legacy model block (no speech, no text) still builds the feature-mode model.
  model = clasp.model_from_config(_legacy_config("").model, legacy.loss)
  assert (model.speech_kind, model.resolved_text_kind) == ("features", "precomputed")
  both = _legacy_config("")
  both.model.text = ml_collections.ConfigDict({"kind": "precomputed"})
  with pytest.raises(ConfigError, match="both a top-level `text` block"):
    upgrade_config(both)


@pytest.mark.parametrize("change, message", [
    ({"model.text.encoder": "/some/folder"}, "kind is 'precomputed'"),
    ({"model.text.kind": "encoder"}, "needs config.model.text.encoder"),
    ({"model.text.kind": "labse"}, "text.kind must be one of"),
    ({"model.speech.kind": "wave"}, "speech.kind must be one of"),
    ({"model.speech.kind": "audio", "model.speech.layer": 5}, r"layer must be -1 .* \[0, 2\]"),
    ({"model.speech.kind": "audio", "model.speech.checkpoint": "/no/such/hubert"},
     "not a checkpoint folder"),
    ({"model.speech.kind": "audio", "model.speech.spectrogram.kind": "mfcc"},
     "spectrogram: kind must be"),
])
def test_bad_tower_configs_are_clear_errors(change, message):
  config = base.get_config("tiny,speech=audio")
  config.model.speech.kind = "features"
  for key, value in change.items():
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  with pytest.raises(ConfigError, match=message):
    clasp.model_from_config(config.model, config.loss)
