"""The JAX spectrogram front-end against librosa on noise, tones and real (espeak-ng) speech."""

import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

librosa = pytest.importorskip("librosa")
soundfile = pytest.importorskip("soundfile")

from clasp_jax.models import spectrogram  # pylint: disable=g-import-not-at-top

SAMPLE_RATE = 22_050
MAX_DB_ERROR = 1e-2  # the bound, float32


def _noise(num_samples=40_000, seed=0):
  return (0.3 * np.random.RandomState(seed).randn(num_samples)).astype(np.float32)


def _tones(num_samples=30_000):
  time = np.arange(num_samples) / SAMPLE_RATE
  chord = 0.5 * np.sin(2 * np.pi * 440 * time) + 0.2 * np.sin(2 * np.pi * 3000 * time + 0.3)
  sweep = 0.1 * np.sin(2 * np.pi * (200 + 2000 * time) * time)
  return (chord + sweep).astype(np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
  if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (Debian package espeak-ng): no real speech to test on")
  path = tmp_path_factory.mktemp("speech") / "speech.wav"
  subprocess.run(["espeak-ng", "-w", str(path), "The quick brown fox jumps over the lazy dog, "
                  "while speech is retrieved with text queries."], check=True, capture_output=True)
  waveform, sample_rate = soundfile.read(path, dtype="float32")
  assert sample_rate == SAMPLE_RATE
  return waveform


@pytest.fixture(scope="module")
def clips(speech):
  """Three clips of different lengths: speech, noise, tones."""
  return {"speech": speech, "noise": _noise(), "tones": _tones()}


def _padded(clip_list):
  lengths = np.array([len(clip) for clip in clip_list])
  batch = np.zeros((len(clip_list), lengths.max()), np.float32)
  for row, clip in enumerate(clip_list):
    batch[row, :len(clip)] = clip
  # Garbage past the ends must not matter: it is zeroed like librosa's own padding.
  batch += (np.arange(batch.shape[1])[None] >= lengths[:, None]) * 7.0
  return batch, lengths


def _valid(images, frame_mask, row):
  return np.asarray(images)[row][:, np.asarray(frame_mask)[row]]


@pytest.mark.parametrize("settings", [
    dict(),  # CLASP: librosa.stft defaults, amplitude_to_db defaults
    dict(ref="max"),
    dict(n_fft=1024, hop_length=256, window="hamming"),
    dict(n_fft=512, hop_length=160, win_length=400),  # hop not dividing n_fft, short window
    dict(center=False, top_db=60.0),
], ids=["clasp-defaults", "ref-max", "hamming-1024", "win400-hop160", "no-centre-top60"])
def test_stft_db_matches_librosa(clips, settings):
  names = list(clips)
  batch, lengths = _padded([clips[name] for name in names])
  front_end = spectrogram.FrontEnd(**settings)
  images, frame_mask = jax.jit(front_end)(batch, lengths)
  for row, name in enumerate(names):
    magnitude = np.abs(librosa.stft(clips[name], n_fft=front_end.n_fft,
                                    hop_length=front_end.hop_length,
                                    win_length=front_end.win_length, window=front_end.window,
                                    center=front_end.center))
    ref = np.max if front_end.ref == "max" else front_end.ref
    expected = librosa.amplitude_to_db(magnitude, ref=ref, top_db=front_end.top_db)
    got = _valid(images, frame_mask, row)
    assert got.shape == expected.shape, name
    assert np.abs(got - expected).max() <= MAX_DB_ERROR, name


def test_without_top_db_on_noise():
  """Without the top_db floor, bins 100+ dB under the peak are float32 rounding noise in both
  implementations, so only broadband noise (no such bins) is compared."""
  noise = _noise(30_000, seed=3)
  images, frame_mask = spectrogram.FrontEnd(top_db=None)(noise[None])
  expected = librosa.amplitude_to_db(np.abs(librosa.stft(noise)), top_db=None)
  assert np.abs(_valid(images, frame_mask, 0) - expected).max() <= MAX_DB_ERROR


@pytest.mark.parametrize("htk,norm", [(False, "slaney"), (True, "slaney"), (False, None)])
def test_log_mel_matches_librosa(clips, htk, norm):
  names = list(clips)
  batch, lengths = _padded([clips[name] for name in names])
  front_end = spectrogram.FrontEnd(kind="log_mel", n_fft=1024, hop_length=256, n_mels=80, fmin=20.0,
                                   fmax=8000.0, htk=htk, mel_norm=norm)
  images, frame_mask = jax.jit(front_end)(batch, lengths)
  assert images.shape[1] == front_end.num_bins == 80
  for row, name in enumerate(names):
    mel = librosa.feature.melspectrogram(y=clips[name], sr=SAMPLE_RATE, n_fft=1024, hop_length=256,
                                         n_mels=80, fmin=20.0, fmax=8000.0, htk=htk, norm=norm)
    expected = librosa.power_to_db(mel, top_db=80.0)
    assert np.abs(_valid(images, frame_mask, row) - expected).max() <= MAX_DB_ERROR, name


@pytest.mark.parametrize("htk", [False, True])
def test_mel_filterbank_and_scale_match_librosa(htk):
  frequencies = np.array([0.0, 50.0, 999.0, 1000.0, 1001.0, 4000.0, 11025.0])
  np.testing.assert_allclose(spectrogram.hz_to_mel(frequencies, htk),
                             librosa.hz_to_mel(frequencies, htk=htk), rtol=1e-9)
  mels = spectrogram.hz_to_mel(frequencies, htk)
  np.testing.assert_allclose(spectrogram.mel_to_hz(mels, htk), frequencies, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(
      spectrogram.mel_filterbank(16_000, 400, 40, fmin=30.0, fmax=7600.0, htk=htk),
      librosa.filters.mel(sr=16_000, n_fft=400, n_mels=40, fmin=30.0, fmax=7600.0, htk=htk),
      rtol=1e-5, atol=1e-8)


def test_complex_stft_matches_librosa_and_frame_count():
  noise = _noise(10_001)
  spectrum, frame_mask = spectrogram.stft(noise, n_fft=512, hop_length=128)
  expected = librosa.stft(noise, n_fft=512, hop_length=128)
  assert spectrum.shape == (1,) + expected.shape
  assert int(frame_mask.sum()) == spectrogram.frame_count(10_001, 512, 128) == expected.shape[1]
  np.testing.assert_allclose(np.asarray(spectrum[0]), expected, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("ref,top_db", [("max", 80.0), (1.0, 30.0), (1.0, None)])
def test_per_clip_reductions_ignore_padding(ref, top_db):
  """ref='max' and top_db use each clip's own valid frames: a loud neighbour in the batch
  changes nothing, and padded frames hold what trailing digital silence gets from librosa."""
  quiet = 0.01 * _noise(20_000, seed=1)
  loud = 10.0 * _noise(30_000, seed=2)
  front_end = spectrogram.FrontEnd(ref=ref, top_db=top_db)
  together, frame_mask = front_end(np.stack([np.pad(quiet, (0, 10_000)), loud]),
                                   np.array([20_000, 30_000]))
  alone, _ = front_end(quiet[None])
  np.testing.assert_allclose(_valid(together, frame_mask, 0), np.asarray(alone[0]), atol=1e-4)
  padded_values = np.asarray(together)[0][:, ~np.asarray(frame_mask)[0]]
  with_silence = np.concatenate([quiet, np.zeros(8_192, np.float32)])
  silence_db = librosa.amplitude_to_db(np.abs(librosa.stft(with_silence)), top_db=top_db,
                                       ref=np.max if ref == "max" else ref)[:, -3]
  assert padded_values.size and np.abs(padded_values - silence_db[0]).max() < MAX_DB_ERROR
  assert np.ptp(silence_db) == 0  # librosa's silence frame is flat: one value to compare with


def test_silence_is_finite_and_floored():
  images, _ = spectrogram.FrontEnd()(np.zeros((2, 8000), np.float32))
  assert np.isfinite(np.asarray(images)).all()
  np.testing.assert_allclose(np.asarray(images), 20 * np.log10(1e-5))


def test_power_to_db_validates_arguments():
  power = jnp.ones((1, 3, 4))
  with pytest.raises(ValueError, match="amin"):
    spectrogram.power_to_db(power, amin=0.0)
  with pytest.raises(ValueError, match="top_db"):
    spectrogram.power_to_db(power, top_db=-1.0)
  with pytest.raises(ValueError, match="ref"):
    spectrogram.power_to_db(power, ref="mean")
  with pytest.raises(ValueError, match="kind"):
    spectrogram.FrontEnd(kind="cqt")


@pytest.mark.parametrize("kind", ["stft_db", "log_mel"])
def test_clip_groups_change_no_value(kind):
  rng = np.random.default_rng(3)
  clips = (0.1 * rng.standard_normal((5, 6000))).astype(np.float32)
  lengths = np.array([6000, 2500, 4100, 6000, 900])
  settings = dict(kind=kind, n_fft=512, hop_length=128, ref="max")
  whole, whole_mask = spectrogram.FrontEnd(clips_per_group=5, **settings)(clips, lengths)
  grouped, grouped_mask = spectrogram.FrontEnd(clips_per_group=2, **settings)(clips, lengths)
  np.testing.assert_array_equal(np.asarray(grouped_mask), np.asarray(whole_mask))
  np.testing.assert_allclose(np.asarray(grouped), np.asarray(whole), atol=1e-5)


def test_cpu_groups_follow_frame_bytes_and_cap_the_group_count(monkeypatch):
  front_end = spectrogram.FrontEnd()  # n_fft 2048: a 4 s clip at 22.05 kHz has 173 frames
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert front_end._clips_per_group(64, 88_200) == 64  # accelerators take the batch whole
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert front_end._clips_per_group(64, 88_200) == 16
  assert front_end._clips_per_group(4096, 88_200) == 4096 // 32  # at most 32 groups
  assert front_end._clips_per_group(8, 22_050 * 600) == 1  # ten-minute clips: one each
  with pytest.raises(ValueError, match="clips_per_group"):
    spectrogram.FrontEnd(clips_per_group=0)(np.zeros((2, 4096), np.float32))
