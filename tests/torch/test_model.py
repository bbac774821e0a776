"""clasp_jax.torch: the whole forward from waveform to embedding in PyTorch equals the Flax
audio-mode model (float32, CPU); its front-end equals ours for both image kinds."""

import importlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")

import clasp_jax.torch as clasp_torch  # noqa: E402
from clasp_jax.models import spectrogram  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _clips(lengths, seed=0):
  # At 16-bit precision, as datasets store audio (the models' preparation is then exact).
  rng = np.random.default_rng(seed)
  clips = []
  for length in lengths:
    time = np.arange(length) / 16_000
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * time)
    clip = tone + 0.05 * rng.standard_normal(length)
    clips.append((np.round(clip * 32768) / 32768).astype(np.float32))
  return clips


def test_whole_forward_from_waveform_equals_the_flax_model(tiny_audio_model, tiny_audio_export):
  # Lengths below, at and beyond the 1 s the model crops to, padded together on the Flax side.
  clips = _clips([4_000, 9_317, 16_000, 21_000])
  theirs = clasp_torch.load(tiny_audio_export).embed_speech(clips)
  ours = tiny_audio_model.embed_speech(clips)
  assert theirs.shape == ours.shape == (4, 16)
  np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  assert np.abs(ours[0] - ours[1]).max() > 1e-2  # Different clips, different rows.


def test_text_tower_equals_the_flax_one(tiny_audio_model, tiny_audio_export):
  sentences = ["red cat runs", "the small green bird sings here today and now slowly"]
  theirs = clasp_torch.load(tiny_audio_export).embed_text(sentences)
  ours = tiny_audio_model.embed_text(sentences)
  np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_feature_inputs_give_the_fusion_encoder_alone(tiny_audio_export):
  model = clasp_torch.load(tiny_audio_export)
  waveform = model.prepare_waveform(_clips([12_000])[0])
  with torch.no_grad():
    features = model.speech_features(waveform)
    raw = model.embed_features(features["speech"].numpy(), features["spectrogram"].numpy(),
                               normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw), model(waveform).numpy(), atol=1e-6)


@pytest.mark.parametrize("front_end", [
    spectrogram.FrontEnd(kind="log_mel", sample_rate=16_000, n_fft=400, hop_length=160,
                         n_mels=40, top_db=80.0),
    spectrogram.FrontEnd(kind="stft_db", sample_rate=16_000, n_fft=512, hop_length=128,
                         top_db=None),
    spectrogram.FrontEnd(kind="stft_db", sample_rate=16_000, n_fft=256, hop_length=64,
                         ref="max", top_db=60.0),
], ids=["log_mel", "stft_db", "stft_db_ref_max"])
def test_torch_stft_front_end_equals_ours(front_end):
  import dataclasses
  clip = _clips([5_000], seed=2)[0]
  ours, _ = front_end(clip[None])
  theirs = clasp_torch.FrontEnd(dataclasses.asdict(front_end))(torch.from_numpy(clip))
  assert theirs.shape == ours.shape[1:]
  np.testing.assert_allclose(theirs.numpy(), np.asarray(ours)[0], atol=2e-3, rtol=0)


def test_without_torch_the_import_error_says_what_to_install(monkeypatch):
  for name in [name for name in sys.modules if name == "clasp_jax.torch" or
               name.startswith("clasp_jax.torch.")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, "torch", None)  # What an environment without torch gives.
  with pytest.raises(ImportError, match=r"install the torch extra"):
    importlib.import_module("clasp_jax.torch")


def _readme_code(folder):
  import re
  readme = (folder / "README.md").read_text()
  return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_the_folder_readme_runs(tiny_audio_export, capsys):
  namespace = {}
  exec(compile(_readme_code(tiny_audio_export), "README.md", "exec"), namespace)
  assert namespace["speech"].shape == namespace["text"].shape == (1, 16)
  assert capsys.readouterr().out.strip().startswith("[[")
