"""Listing and padding audio for the speech commands; the one list of audio extensions."""

import numpy as np
import pytest

from clasp_jax.data import audio_io
from clasp_jax.data.sources import layout
from clasp_jax.inference import speech_batching


def test_folder_listing_is_recursive_sorted_and_case_blind(tmp_path):
  (tmp_path / "b").mkdir()
  for name in ("b/z.FLAC", "a.wav", "b/c.m4a", "notes.txt", "d.aiff"):
    (tmp_path / name).write_bytes(b"x")
  listed = speech_batching.list_audio_inputs(tmp_path)
  assert listed == [str(tmp_path / name) for name in ("a.wav", "b/c.m4a", "b/z.FLAC", "d.aiff")]


def test_list_file_and_bad_inputs(tmp_path):
  (tmp_path / "list.txt").write_text("# header\n\nrel.wav\n/abs/x.flac\n")
  assert speech_batching.list_audio_inputs(tmp_path / "list.txt") == [
      str(tmp_path / "rel.wav"), "/abs/x.flac"]
  (tmp_path / "empty").mkdir()
  with pytest.raises(speech_batching.InputListError, match="folder holds no audio files"):
    speech_batching.list_audio_inputs(tmp_path / "empty")
  with pytest.raises(speech_batching.InputListError, match="no such file or folder"):
    speech_batching.list_audio_inputs(tmp_path / "nothing")


def test_release_layouts_find_the_same_extensions(tmp_path):
  """The dataset builders' AudioIndex and `embed speech` take the same files for audio."""
  for name in audio_io.AUDIO_EXTENSIONS:
    (tmp_path / f"clip{name.upper()}").write_bytes(b"x")
  index = layout.AudioIndex(tmp_path)
  for name in audio_io.AUDIO_EXTENSIONS:
    assert index.resolve(f"/elsewhere/clip{name.upper()}") == str(tmp_path / f"clip{name.upper()}")
  assert len(speech_batching.list_audio_inputs(tmp_path)) == len(audio_io.AUDIO_EXTENSIONS)


def test_pad_batch_rounds_lengths_up_and_fills_missing_rows():
  clips = [np.ones(5, np.float32), np.full(12, 2.0, np.float32)]
  batch, lengths = speech_batching.pad_batch(clips, batch_size=4, pad_multiple=8)
  assert batch.shape == (4, 16) and lengths.tolist() == [5, 12, 0, 0]
  assert batch[0, :5].tolist() == [1.0] * 5 and not batch[0, 5:].any() and not batch[2:].any()
