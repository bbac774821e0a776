"""clasp_jax.load: the README's example runs as written, paths and waveforms embed alike,
and misuse fails with one clear message."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import clasp_jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _readme_example() -> str:
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  section = readme.split("## Python API", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tiny_audio_workdir, tmp_path, monkeypatch, capsys):
  code = _readme_example()
  assert 'clasp_jax.load("/runs/clasp")' in code
  clip = 0.3 * np.sin(2 * np.pi * 440 * np.arange(12_000) / 16_000)
  soundfile.write(tmp_path / "clip1.wav", clip, 16_000, subtype="PCM_16")
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code.replace("/runs/clasp", str(tiny_audio_workdir)), "README.md", "exec"),
       namespace)
  scores = namespace["scores"]
  assert scores.shape == (2, 2)
  np.testing.assert_allclose(scores, namespace["ztext"] @ namespace["zspeech"].T, atol=1e-6)
  printed = capsys.readouterr().out.strip().splitlines()[-1]
  assert [int(x) for x in re.findall(r"\d+", printed)] == list(scores.argmax(axis=1))


def test_paths_and_waveforms_embed_alike_and_similarity_is_cosine(tiny_audio_model, tmp_path):
  model = tiny_audio_model
  assert model.speech_kind == "audio" and model.embed_dim == 16 and model.step == 7
  clip = (np.round(0.2 * np.sin(np.arange(10_000) / 9.0) * 32768) / 32768).astype(np.float32)
  soundfile.write(tmp_path / "clip.wav", clip, 16_000, subtype="PCM_16")
  rows = model.embed_speech([str(tmp_path / "clip.wav"), clip])
  np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)
  a, b = np.array([[3.0, 4.0]]), np.array([[4.0, 3.0], [0.0, -2.0]])
  np.testing.assert_allclose(model.similarity(a, b), [[24 / 25, -4 / 5]], atol=1e-6)


def test_misuse_fails_with_one_clear_message(tiny_audio_model, tmp_path):
  model = tiny_audio_model
  with pytest.raises(TypeError, match="list of paths or waveforms"):
    model.embed_speech("clip.wav")
  with pytest.raises(TypeError, match="list of sentences"):
    model.embed_text("one sentence")
  with pytest.raises(ValueError, match="audio-mode model"):
    model.embed_features(speech=np.zeros((1, 32), np.float32))
  (tmp_path / "bad.wav").write_bytes(b"not audio")
  with pytest.raises(ValueError, match="bad.wav"):
    model.embed_speech([str(tmp_path / "bad.wav")])
  with pytest.raises(ValueError, match="different widths"):
    model.similarity(np.ones((1, 2)), np.ones((1, 3)))


def test_import_clasp_jax_does_not_import_jax():
  process = subprocess.run(
      [sys.executable, "-c", "import sys, clasp_jax; print('jax' in sys.modules)"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert process.stdout.strip() == "False", process.stderr
