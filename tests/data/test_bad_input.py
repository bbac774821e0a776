"""Every kind of bad input is skipped and counted, or stops a --strict build at its path."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from clasp_jax.data import bad_input
from clasp_jax.data.sources import manifest
from clasp_jax.data import pipeline
from clasp_jax.data import reader
from clasp_jax.data import tfds_builder

tfds.disable_progress_bar()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMITS = bad_input.AudioLimits(max_duration_s=2.0)


def tone(seconds, sample_rate, channels=1, amplitude=0.4):
  time = np.arange(int(seconds * sample_rate)) / sample_rate
  mono = (amplitude * np.sin(2 * np.pi * 330 * time)).astype(np.float32)
  return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def truncate(path, keep_fraction):
  with open(path, "rb") as stream:
    data = stream.read()
  with open(path, "wb") as stream:
    stream.write(data[:int(len(data) * keep_fraction)])


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
  """A manifest holding one input of each bad kind next to good and converted ones.

  Returns the manifest path, the expected skip counts and the rows; each bad row has a
  unique `case` (a field the manifest reader ignores).
  """
  root = tmp_path_factory.mktemp("bad")
  clips = root / "clips"
  clips.mkdir()
  rows, expected = [], dict.fromkeys(bad_input.SKIP_KINDS, 0)

  def add(name, text, kind=None, split="train", **row):
    rows.append({"audio": f"clips/{name}", "text": text, "language": "en",
                 "category": "test", "split": split, "id": row.pop("id", name),
                 "case": f"{kind}:{name}" if kind else "usable", **row})
    if kind:
      expected[kind] += 1

  for number in range(6):
    soundfile.write(clips / f"good{number}.wav", tone(0.5 + 0.1 * number, 16000), 16000)
    add(f"good{number}.wav", f"A good sentence number {number}.",
        split="test" if number == 2 else "train")
  soundfile.write(clips / "stereo44k.flac", tone(0.5, 44100, channels=2), 44100)
  add("stereo44k.flac", "Stereo at forty four kilohertz.")
  soundfile.write(clips / "three_channels_22k.wav", tone(0.5, 22050, channels=3), 22050)
  add("three_channels_22k.wav", "Three channels at twenty two kilohertz.")
  soundfile.write(clips / "odd_rate_11025.wav", tone(0.5, 11025), 11025)
  add("odd_rate_11025.wav", "An odd but usable sample rate.", split="validation")

  add("missing.wav", "This file does not exist.", bad_input.MISSING)
  (clips / "empty.wav").write_bytes(b"")
  add("empty.wav", "This file is empty.", bad_input.EMPTY)
  soundfile.write(clips / "cut.wav", tone(1.0, 16000), 16000)
  truncate(clips / "cut.wav", 0.5)
  add("cut.wav", "This wav file was cut in half.", bad_input.TRUNCATED)
  soundfile.write(clips / "cut.flac", tone(1.0, 16000), 16000)
  truncate(clips / "cut.flac", 0.5)
  add("cut.flac", "This flac file was cut in half.", bad_input.TRUNCATED)
  (clips / "notes.wav").write_text("these are meeting notes, not audio\n" * 20)
  add("notes.wav", "A text file named like audio.", bad_input.NOT_AUDIO)
  soundfile.write(clips / "silence.wav", np.zeros(16000, np.float32), 16000)
  add("silence.wav", "Nothing is said here.", bad_input.SILENT)
  soundfile.write(clips / "long.wav", tone(3.0, 16000), 16000)
  add("long.wav", "A clip longer than the maximum.", bad_input.TOO_LONG)
  soundfile.write(clips / "phone_4k.wav", tone(0.5, 4000), 4000)
  add("phone_4k.wav", "Sampled far too low.", bad_input.LOW_SAMPLE_RATE)
  soundfile.write(clips / "untranscribed.wav", tone(0.5, 16000), 16000)
  add("untranscribed.wav", "", bad_input.EMPTY_TEXT)
  add("untranscribed.wav", " \t \n ", bad_input.EMPTY_TEXT, id="whitespace")
  add("good0.wav", "Same id as the first good clip.", bad_input.DUPLICATE_ID, id="good0.wav")
  # The same sentence as good2 (test) in train: a leak the split rule removes from train.
  add("good1.wav", "A good sentence number 2!", bad_input.SHARED_SENTENCE, id="leak")

  path = root / "bad.jsonl"
  write_manifest(path, rows)
  return path, expected, rows


def write_manifest(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def test_decode_clip_names_each_kind(bad_manifest):
  path, _, _ = bad_manifest
  clips = path.parent / "clips"
  cases = {"missing.wav": "missing", "empty.wav": "empty", "cut.wav": "truncated",
           "cut.flac": "truncated", "notes.wav": "not_audio", "silence.wav": "silent",
           "long.wav": "too_long", "phone_4k.wav": "low_sample_rate"}
  for name, kind in cases.items():
    with pytest.raises(bad_input.BadInputError) as raised:
      bad_input.decode_clip(clips / name, LIMITS)
    assert raised.value.kind == kind, name
    assert raised.value.path == str(clips / name)
  clip = bad_input.decode_clip(clips / "three_channels_22k.wav", LIMITS)
  assert (clip.source_sample_rate, clip.source_channels) == (22050, 3)
  assert clip.audio.ndim == 1 and len(clip.audio) == 8000


def test_bad_inputs_are_skipped_and_counted_in_metadata(bad_manifest, tmp_path):
  path, expected, _ = bad_manifest
  assert all(expected.values())  # The manifest holds every kind.
  options = tfds_builder.BuildOptions(name="bad", kind="manifest", limits=LIMITS,
                                      num_workers=2)
  dataset_dir = tfds_builder.build_dataset(manifest.read_examples(path), str(tmp_path),
                                           options)
  counts = reader.read_metadata(dataset_dir)["bad_input"]
  assert counts["skipped"] == expected
  assert counts["converted"] == {"resampled": 3, "downmixed": 2}
  written = sum(len(reader.open_split(dataset_dir, split))
                for split in tfds.builder_from_directory(dataset_dir).info.splits)
  assert written == 9  # six good clips and three converted ones


def test_build_log_reports_each_skip_and_the_summary(bad_manifest, tmp_path):
  path, expected, _ = bad_manifest
  result = subprocess.run(
      [sys.executable, "-m", "clasp_jax.data.build", "--kind=manifest", f"--source={path}",
       f"--data_dir={tmp_path}", "--max_duration_s=2", "--num_workers=1"],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
      timeout=120)
  assert result.returncode == 0, result.stderr
  log = result.stderr
  logged = collections.Counter(re.findall(r"skipping \S+: (\w+)", log))
  assert logged == {kind: count for kind, count in expected.items() if count}
  assert "skipped {'missing': 1" in log
  assert result.stdout.strip().endswith(os.path.join("clasp_speech_text", "bad", "1.0.0"))


def test_strict_build_stops_with_the_offending_path(bad_manifest, tmp_path):
  path, _, _ = bad_manifest
  result = subprocess.run(
      [sys.executable, "-m", "clasp_jax.data.build", "--kind=manifest", f"--source={path}",
       f"--data_dir={tmp_path}", "--max_duration_s=2", "--strict"],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
      timeout=120)
  assert result.returncode == 1
  last_line = result.stderr.strip().splitlines()[-1]
  # Rows are checked for text first: the first bad row in the file is the empty transcript.
  assert last_line == (f"error: --strict stopped at {path.parent / 'clips' / 'untranscribed.wav'}"
                       ": empty_text (no transcript)")
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "clasp_speech_text" / "bad" / "1.0.0")


@pytest.mark.parametrize("case", [
    "missing:missing.wav", "empty:empty.wav", "truncated:cut.wav", "truncated:cut.flac",
    "not_audio:notes.wav", "silent:silence.wav", "too_long:long.wav",
    "low_sample_rate:phone_4k.wav", "empty_text:untranscribed.wav",
    "duplicate_id:good0.wav", "shared_sentence:good1.wav"])
def test_strict_build_stops_at_each_kind_with_its_path(bad_manifest, case, tmp_path):
  path, _, rows = bad_manifest
  bad_rows = [row for row in rows if row["case"] == case]
  assert len(bad_rows) >= 1
  usable_rows = [row for row in rows if row["case"] == "usable"]
  manifest_path = path.parent / f"strict_{case.replace(':', '_')}.jsonl"
  write_manifest(manifest_path, usable_rows + bad_rows[:1])
  bad_row = bad_rows[0]
  options = tfds_builder.BuildOptions(name="strict", kind="manifest", strict=True,
                                      limits=LIMITS, num_workers=1)
  with pytest.raises(bad_input.BadInputError) as raised:
    tfds_builder.build_dataset(manifest.read_examples(manifest_path), str(tmp_path), options)
  # The leak is reported at the train copy's audio; every other row at its own file.
  assert raised.value.path == str(path.parent / bad_row["audio"])
  assert raised.value.kind == case.split(":")[0]
  assert not os.path.exists(tmp_path / "clasp_speech_text" / "strict" / "1.0.0")


def test_silent_windows_never_become_nan(tmp_path):
  """A clip that is silent after its first 0.3 s, randomly cropped and peak-normalised."""
  audio = np.concatenate([tone(0.3, 16000), np.zeros(16000 * 2, np.float32)])
  rows = []
  for number in range(8):
    soundfile.write(tmp_path / f"{number}.wav", audio, 16000)
    rows.append({"audio": f"{number}.wav", "text": f"Speech then silence {number}.",
                 "split": "train"})
  manifest_path = tmp_path / "m.jsonl"
  write_manifest(manifest_path, rows)
  options = tfds_builder.BuildOptions(name="quiet", kind="manifest")
  dataset_dir = tfds_builder.build_dataset(manifest.read_examples(manifest_path),
                                           str(tmp_path / "o"), options)
  source = reader.open_split(dataset_dir, "train")
  config = pipeline.PipelineConfig(global_batch_size=4, max_duration_s=0.5, random_crop=True,
                                   peak_normalize=True, seed=1)
  silent_rows = 0
  for batch in pipeline.InputPipeline(source, config).iterate(0, 6):
    audio = batch.arrays["audio"]
    assert np.all(np.isfinite(audio))
    assert np.abs(audio).max() <= 1.0
    silent_rows += int(np.sum(np.abs(audio).max(axis=1) == 0))
  assert silent_rows > 0  # The scenario really happened.


def test_a_split_without_any_usable_input_is_a_clear_error(tmp_path):
  soundfile.write(tmp_path / "fine.wav", tone(0.5, 16000), 16000)
  rows = [{"audio": "fine.wav", "text": "Usable.", "split": "train"},
          {"audio": "gone.wav", "text": "Never extracted.", "split": "test"}]
  write_manifest(tmp_path / "m.jsonl", rows)
  options = tfds_builder.BuildOptions(name="broken", kind="manifest")
  with pytest.raises(ValueError, match=r"split test: none of its 1 inputs is usable .*missing"):
    tfds_builder.build_dataset(manifest.read_examples(tmp_path / "m.jsonl"),
                               str(tmp_path / "o"), options)
