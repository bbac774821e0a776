"""Each dataset kind built from a fixture in its released layout, then read back."""

import collections
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from clasp_jax.data import audio_io
from clasp_jax.data.sources import registry as readers
from clasp_jax.data import reader
from clasp_jax.data.sources import speech_brown
from clasp_jax.data import splits
from clasp_jax.data import tfds_builder
from clasp_jax.data.sources.source import SPLITS

tfds.disable_progress_bar()


def write_tone(path, seconds, sample_rate, frequency=220.0, channels=1, **kwargs):
  """A short tone (non-silent audio) in any format soundfile writes."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  time = np.arange(int(round(seconds * sample_rate))) / sample_rate
  tone = (0.4 * np.sin(2 * np.pi * frequency * time)).astype(np.float32)
  audio = np.stack([tone * (1.0 - 0.3 * c) for c in range(channels)], axis=1)
  soundfile.write(path, audio if channels > 1 else tone, sample_rate, **kwargs)
  return path


def build_kind(tmp_path, kind, source, name=None, **read_kwargs):
  examples = readers.read_source(kind, source, **read_kwargs)
  options = tfds_builder.BuildOptions(name=name or kind, kind=kind, seed=3, num_workers=2,
                                      source_path=source)
  return tfds_builder.build_dataset(examples, str(tmp_path / "data"), options)


def read_all(dataset_dir):
  """{split: [records]} for every split the dataset has."""
  info_splits = tfds.builder_from_directory(dataset_dir).info.splits
  return {split: reader.open_split(dataset_dir, split).read(
      range(info_splits[split].num_examples)) for split in SPLITS if split in info_splits}


def assert_no_shared_sentence(records_by_split):
  seen = {}
  for split, records in records_by_split.items():
    for record in records:
      sentence = splits.normalize_sentence(record["text"])
      assert seen.setdefault(sentence, split) == split, (record["text"], split, seen[sentence])


# ----------------------------------------------------------------------------- Speech Brown

BROWN_SENTENCES = [f"The {word} story number {i} ends here." for i, word in
                   enumerate(["first", "odd", "quiet", "bright", "late"] * 7)]  # 35 distinct


@pytest.fixture(scope="module")
def speech_brown_release(tmp_path_factory):
  """global_metadata.json keyed by id plus two extracted parts of 22.05 kHz clips."""
  root = tmp_path_factory.mktemp("SpeechBrown")
  metadata = {}
  entries = [(i, text) for i, text in enumerate(BROWN_SENTENCES)]
  # Five more recordings of already used sentences: they must share their sentence's split.
  entries += [(35 + j, BROWN_SENTENCES[j * 3]) for j in range(5)]
  for number, text in entries:
    clip_id = f"sb_{number:04d}"
    part = f"dataset_part{1 + number % 2}"
    write_tone(str(root / part / "dataset" / f"{clip_id}.wav"), 0.3 + 0.01 * number, 22050,
               frequency=150 + 7 * number)
    # The metadata records paths as the authors' machine saw them (not the extracted tree).
    recorded = (f"{part}/dataset/{clip_id}.wav" if number % 4 else
                f"/home/authors/speech_brown/dataset/{clip_id}.wav")
    metadata[clip_id] = {"audio_file_path": recorded,
                         "category": speech_brown.CATEGORIES[number % 15], "text": text}
  with open(root / speech_brown.METADATA_FILE, "w", encoding="utf-8") as stream:
    json.dump(metadata, stream)
  return root, metadata


@pytest.fixture(scope="module")
def speech_brown_dataset(speech_brown_release, tmp_path_factory):
  root, _ = speech_brown_release
  return build_kind(tmp_path_factory.mktemp("sb_out"), "speech_brown", str(root))


def test_speech_brown_fields_counts_and_categories(speech_brown_release, speech_brown_dataset):
  _, metadata = speech_brown_release
  by_split = read_all(speech_brown_dataset)
  records = [r for split_records in by_split.values() for r in split_records]
  assert sorted(r["id"] for r in records) == sorted(metadata)
  assert {r["category"] for r in records} == set(speech_brown.CATEGORIES)
  for record in records:
    entry = metadata[record["id"]]
    assert record["text"] == entry["text"]
    assert record["category"] == entry["category"]
    assert (record["language"], record["source"]) == ("en", "speech_brown")
    assert record["audio"].dtype == np.int16
    number = int(record["id"].split("_")[1])
    source_frames = int(round((0.3 + 0.01 * number) * 22050))
    assert len(record["audio"]) == int(np.ceil(source_frames * 16000 / 22050))
  counts = reader.read_metadata(speech_brown_dataset)["bad_input"]
  assert sum(counts["skipped"].values()) == 0
  assert counts["converted"]["resampled"] == len(metadata)


def test_speech_brown_split_is_80_10_10_of_sentences_and_disjoint(speech_brown_dataset):
  by_split = read_all(speech_brown_dataset)
  assert_no_shared_sentence(by_split)
  distinct = {split: {splits.normalize_sentence(r["text"]) for r in records}
              for split, records in by_split.items()}
  total = sum(len(s) for s in distinct.values())
  assert total == len(set(BROWN_SENTENCES))
  bounds = np.round(np.cumsum(splits.DEFAULT_FRACTIONS) * total).astype(int)
  assert [len(distinct[s]) for s in SPLITS] == [bounds[0], bounds[1] - bounds[0],
                                                 bounds[2] - bounds[1]]


def test_speech_brown_split_is_deterministic_for_a_seed(speech_brown_release, tmp_path):
  root, _ = speech_brown_release
  first = read_all(build_kind(tmp_path / "a", "speech_brown", str(root)))
  second = read_all(build_kind(tmp_path / "b", "speech_brown", str(root)))
  assert ({s: sorted(r["id"] for r in rs) for s, rs in first.items()} ==
          {s: sorted(r["id"] for r in rs) for s, rs in second.items()})


# ----------------------------------------------------------------------------------- FLEURS

def write_fleurs_language(root, code, sentences_by_split, sample_rate=16000):
  """{split}.tsv (no header) and audio/{split}/*.wav; each sentence read by two speakers."""
  folder = root / "data" / code
  rows_written = collections.Counter()
  for release_split, sentences in sentences_by_split.items():
    lines = []
    for sentence_id, text in sentences:
      for speaker in range(2):
        file_name = f"{sentence_id * 10 + speaker}.wav"
        path = write_tone(str(folder / "audio" / release_split / file_name), 0.4, sample_rate,
                          frequency=200 + sentence_id + 50 * speaker)
        frames = soundfile.info(path).frames
        lines.append("\t".join([str(sentence_id), file_name, text, text.lower(),
                                "p h o n e s", str(frames), ["MALE", "FEMALE"][speaker]]))
        rows_written[release_split] += 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{release_split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return rows_written


@pytest.fixture(scope="module")
def fleurs_release(tmp_path_factory):
  root = tmp_path_factory.mktemp("fleurs")
  english = {
      "train": [(i, f"Training sentence {i}, read \"aloud\".") for i in range(1, 9)],
      "dev": [(20, "A development sentence."), (21, "Another one for dev.")],
      # Sentence 1 leaks from train into test: the test copy stays, the train copy goes.
      "test": [(30, "A test sentence."), (31, "Training sentence 1, read \"aloud\".")],
  }
  written = write_fleurs_language(root, "en_us", english)
  write_fleurs_language(root, "de_de", {"train": [(1, "Ein Satz.")], "dev": [(2, "Noch einer.")],
                                        "test": [(3, "Der letzte.")]})
  return root, written


def test_fleurs_official_splits_language_filter_and_leak_removal(fleurs_release, tmp_path):
  root, written = fleurs_release
  dataset_dir = build_kind(tmp_path, "fleurs", str(root), languages=["en_us"])
  by_split = read_all(dataset_dir)
  assert {s: len(rs) for s, rs in by_split.items()} == {
      "train": written["train"] - 2, "validation": written["dev"], "test": written["test"]}
  assert_no_shared_sentence(by_split)
  records = [r for rs in by_split.values() for r in rs]
  assert {(r["language"], r["category"], r["source"]) for r in records} == {
      ("en", "fleurs", "fleurs")}
  assert 'Training sentence 3, read "aloud".' in {r["text"] for r in by_split["train"]}
  assert all(len(r["audio"]) == int(0.4 * 16000) for r in records)
  skipped = reader.read_metadata(dataset_dir)["bad_input"]["skipped"]
  assert skipped["shared_sentence"] == 2 and sum(skipped.values()) == 2


def test_fleurs_unknown_language_is_a_clear_error(fleurs_release):
  root, _ = fleurs_release
  with pytest.raises(FileNotFoundError, match="fr_fr"):
    readers.read_source("fleurs", str(root), languages=["fr_fr"])


# ------------------------------------------------------------------------------ Common Voice

CV_HEADER = ["client_id", "path", "sentence", "up_votes", "down_votes", "age", "gender",
             "accent", "locale", "segment"]


@pytest.fixture(scope="module")
def common_voice_release(tmp_path_factory):
  """cv-corpus/en with validated.tsv, train/dev/test.tsv and 48 kHz mp3 clips."""
  folder = tmp_path_factory.mktemp("cv-corpus") / "en"
  rows = []
  for number in range(14):
    name = f"common_voice_en_{1000 + number}.mp3"
    write_tone(str(folder / "clips" / name), 0.5, 48000, frequency=180 + 20 * number,
               format="MP3")
    # Two speakers each read a sentence twice (the same text in the same split).
    rows.append({"client_id": f"speaker{number % 3}", "path": name,
                 "sentence": f"Common voice sentence {number // 2}.", "up_votes": "2",
                 "down_votes": "0", "age": "", "gender": "", "accent": "", "locale": "en",
                 "segment": ""})
  # Early releases list the clip without its extension.
  rows[-1]["path"] = rows[-1]["path"][:-len(".mp3")]
  tables = {"validated": rows, "train": rows[:10], "dev": rows[10:12], "test": rows[12:]}
  for name, table_rows in tables.items():
    with open(folder / f"{name}.tsv", "w", encoding="utf-8", newline="") as stream:
      writer = csv.DictWriter(stream, CV_HEADER, delimiter="\t")
      writer.writeheader()
      writer.writerows(table_rows)
  return folder, tables


def test_common_voice_official_splits_from_mp3(common_voice_release, tmp_path):
  folder, tables = common_voice_release
  dataset_dir = build_kind(tmp_path, "common_voice", str(folder))
  by_split = read_all(dataset_dir)
  assert {s: len(rs) for s, rs in by_split.items()} == {"train": 10, "validation": 2, "test": 2}
  assert_no_shared_sentence(by_split)
  expected = {f"en/{os.path.splitext(r['path'])[0]}": r for r in tables["validated"]}
  for records in by_split.values():
    for record in records:
      row = expected[record["id"]]
      assert record["text"] == row["sentence"]
      assert record["speaker"] == row["client_id"]
      assert (record["language"], record["category"]) == ("en", "common_voice")
      # 0.5 s of 48 kHz MP3 at 16 kHz, give or take the decoder's padding.
      assert abs(len(record["audio"]) - 8000) < 1200
  counts = reader.read_metadata(dataset_dir)["bad_input"]
  assert counts["converted"]["resampled"] == 14 and sum(counts["skipped"].values()) == 0


def test_common_voice_validated_gets_a_seeded_sentence_split(common_voice_release, tmp_path):
  folder, _ = common_voice_release
  examples = readers.read_source("common_voice", str(folder), common_voice_splits="validated")
  assert all(example.split is None for example in examples)
  dataset_dir = build_kind(tmp_path, "common_voice", str(folder),
                           common_voice_splits="validated")
  by_split = read_all(dataset_dir)
  assert sum(len(rs) for rs in by_split.values()) == 14
  assert_no_shared_sentence(by_split)


# --------------------------------------------------------------------------------- manifest

@pytest.fixture(scope="module")
def manifest_sources(tmp_path_factory):
  """Clips in four formats, rates and channel layouts, listed by a JSONL and a CSV manifest."""
  root = tmp_path_factory.mktemp("manifest")
  clips = [
      ("a.wav", 16000, 1, {}),
      ("b.flac", 44100, 2, {}),
      ("c.ogg", 48000, 1, {"format": "OGG", "subtype": "VORBIS"}),
      ("d.mp3", 22050, 1, {"format": "MP3"}),
  ]
  rows = []
  for number, (name, rate, channels, kwargs) in enumerate(clips):
    write_tone(str(root / "clips" / name), 0.5, rate, frequency=300 + 40 * number,
               channels=channels, **kwargs)
    rows.append({"audio": f"clips/{name}", "text": f"Manifest sentence {number}.",
                 "language": ["en", "de", "es", "it"][number], "category": "local",
                 "id": f"m{number}", "split": ["train", "train", "dev", "test"][number]})
  jsonl = root / "recordings.jsonl"
  jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  csv_path = root / "recordings.csv"
  with open(csv_path, "w", encoding="utf-8", newline="") as stream:
    writer = csv.DictWriter(stream, ["audio", "text", "language", "category"])
    writer.writeheader()
    writer.writerows([{k: row[k] for k in ("audio", "text", "language", "category")}
                      for row in rows])
  return root, rows


def test_manifest_jsonl_decodes_every_format_to_16k_mono(manifest_sources, tmp_path):
  root, rows = manifest_sources
  dataset_dir = build_kind(tmp_path, "manifest", str(root / "recordings.jsonl"),
                           name="recordings")
  by_split = read_all(dataset_dir)
  assert {s: sorted(r["id"] for r in rs) for s, rs in by_split.items()} == {
      "train": ["m0", "m1"], "validation": ["m2"], "test": ["m3"]}
  records = {r["id"]: r for rs in by_split.values() for r in rs}
  for row in rows:
    record = records[row["id"]]
    assert (record["text"], record["language"], record["category"]) == (
        row["text"], row["language"], row["category"])
    expected = audio_io.load_audio(str(root / row["audio"]))
    stored = record["audio"].astype(np.float32) / tfds_builder.INT16_SCALE
    assert len(stored) == len(expected)
    np.testing.assert_allclose(stored, expected, atol=1.0 / 32768)
  counts = reader.read_metadata(dataset_dir)["bad_input"]["converted"]
  assert counts == {"resampled": 3, "downmixed": 1}


def test_manifest_csv_without_split_gets_sentence_split(manifest_sources, tmp_path):
  root, rows = manifest_sources
  dataset_dir = build_kind(tmp_path, "manifest", str(root / "recordings.csv"),
                           name="recordings")
  by_split = read_all(dataset_dir)
  assert sorted(r["text"] for rs in by_split.values() for r in rs) == sorted(
      row["text"] for row in rows)
  # Without an id column the id is the audio path without its extension.
  assert {r["id"] for rs in by_split.values() for r in rs} == {
      os.path.join("clips", c) for c in "abcd"}


def test_rebuilding_needs_overwrite(manifest_sources, tmp_path):
  root, _ = manifest_sources
  examples = readers.read_source("manifest", str(root / "recordings.jsonl"))
  options = tfds_builder.BuildOptions(name="again", kind="manifest", num_workers=1)
  tfds_builder.build_dataset(examples, str(tmp_path), options)
  with pytest.raises(FileExistsError, match="--overwrite"):
    tfds_builder.build_dataset(examples, str(tmp_path), options)
  rebuilt = tfds_builder.build_dataset(examples, str(tmp_path), options, overwrite=True)
  assert len(reader.open_split(rebuilt, "train")) == 2


def test_concatenated_splits_read_across_datasets(speech_brown_dataset, manifest_sources,
                                                  tmp_path):
  root, _ = manifest_sources
  manifest_dir = build_kind(tmp_path, "manifest", str(root / "recordings.jsonl"), name="m")
  joined = reader.open_split([speech_brown_dataset, manifest_dir], "train")
  brown = reader.open_split(speech_brown_dataset, "train")
  assert len(joined) == len(brown) + 2
  np.testing.assert_array_equal(joined.lengths[:len(brown)], brown.lengths)
  assert joined[len(brown)]["source"] == "manifest"
  assert joined[0]["id"] == brown[0]["id"]
  with pytest.raises(IndexError):
    joined[len(joined)]


def test_build_cli_help_and_one_line_errors(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def run(*flags):
    return subprocess.run([sys.executable, "-m", "clasp_jax.data.build", *flags],
                          capture_output=True, text=True, cwd=repo,
                          env={**os.environ, "PYTHONPATH": repo}, timeout=120)

  result = run("--help")
  assert result.returncode == 0
  assert "--kind" in result.stdout and "--strict" in result.stdout
  result = run("--kind=bogus", f"--source={tmp_path}", f"--data_dir={tmp_path}")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: flag --kind=bogus")
  result = run("--kind=speech_brown", f"--source={tmp_path}", f"--data_dir={tmp_path}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"error: {tmp_path / speech_brown.METADATA_FILE} not found")
