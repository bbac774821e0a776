"""Sentences from fortune files and the espeak-ng corpus built from them."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from clasp_jax.data import fortunes
from clasp_jax.data import reader
from clasp_jax.data import splits
from clasp_jax.data import speech_corpus

tfds.disable_progress_bar()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed "
                                  "(scripts/install_system_packages.sh)")

ENGLISH = [f"The {animal} in the garden is not what it seems to be." for animal in
           ("cat", "dog", "owl", "fox", "hen", "pig", "cow", "rat", "bee", "eel", "ant")]
GERMAN = [f"Der {thing} ist nicht so schwer, wie man denkt." for thing in
          ("Tisch", "Stein", "Berg", "Baum", "Koffer", "Hammer", "Wagen", "Apfel", "Brief",
           "Schrank", "Teller")]
SPANISH = [f"La {thing} de la casa es muy vieja y bonita." for thing in
           ("mesa", "puerta", "silla", "ventana", "cocina", "escalera", "pared", "lampara",
            "cama", "alfombra", "cortina")]


def write_fortune_file(path, entries):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as stream:
    stream.write("\n%\n".join(entries) + "\n%\n")
  with open(f"{path}.dat", "wb") as stream:  # strfile index: never read as text
    stream.write(b"\x00\x02binary")


@pytest.fixture(scope="module")
def fortunes_dir(tmp_path_factory):
  """A small copy of the Debian layout: English at the root, de/, es/, it/, off/."""
  root = tmp_path_factory.mktemp("fortunes")
  # Two sentences per entry, attributions, and lines wrapped like the real files.
  english = [f"{a}\nIt stays there.\n\t\t-- Someone Famous" if i % 2 else a
             for i, a in enumerate(ENGLISH)]
  write_fortune_file(str(root / "animals"), english + [
      "Too short.",  # two words
      " ".join(["word"] * 41) + ".",  # 41 words
      "if (x) { return y; } and the rest is code.",
      "THE SHOUTING IN THIS SENTENCE IS NOT PROSE.",
      "    An indented poem line that is not running prose.",
      ENGLISH[0].upper().lower().capitalize(),  # a duplicate once normalised
  ])
  write_fortune_file(str(root / "ascii-art"), ["The art of the line is the art of the box."])
  write_fortune_file(str(root / "de" / "dinge"), GERMAN + [
      "The English sentence in the German file is dropped."])
  write_fortune_file(str(root / "es" / "casa.fortunes"), SPANISH)
  write_fortune_file(str(root / "es" / "off" / "rudo.fortunes"),
                     ["La palabra de la calle es muy fea y rara."])
  write_fortune_file(str(root / "it" / "cose"), ["Il gatto della casa non è un cane."])
  # The English root links the Italian files in (as Debian does).
  os.symlink(root / "it" / "cose", root / "cose")
  return str(root)


def test_read_sentences_keeps_prose_of_the_right_language(fortunes_dir):
  english = fortunes.read_sentences("en", fortunes_dir)
  assert sorted(s.text for s in english) == sorted(ENGLISH + ["It stays there."])
  assert {s.category for s in english} == {"animals"}
  assert all(s.language == "en" for s in english)
  german = fortunes.read_sentences("de", fortunes_dir)
  assert sorted(s.text for s in german) == sorted(GERMAN)
  spanish = fortunes.read_sentences("es", fortunes_dir)
  assert {s.category for s in spanish} == {"casa"}  # topic without ".fortunes", no off/
  assert [s.text for s in fortunes.read_sentences("it", fortunes_dir)] == [
      "Il gatto della casa non è un cane."]
  assert fortunes.available_languages(fortunes_dir) == ["en", "de", "es", "it"]


def test_sentences_are_split_and_counted_in_words():
  paragraph = "¿Quién sabe? Nadie lo sabe. «Ni yo», dijo él. Fin del cuento!"
  assert fortunes.split_sentences(paragraph) == [
      "¿Quién sabe?", "Nadie lo sabe.", "«Ni yo», dijo él.", "Fin del cuento!"]
  assert fortunes.looks_like("Der Hund ist nicht hier.", "de")
  assert not fortunes.looks_like("Der Hund ist nicht hier.", "en")


def test_unknown_or_missing_languages_are_clear_errors(fortunes_dir, tmp_path):
  with pytest.raises(ValueError, match="no Debian fortunes package for language 'fr'"):
    fortunes.read_sentences("fr", fortunes_dir)
  with pytest.raises(FileNotFoundError, match="fortunes-de"):
    fortunes.read_sentences("de", str(tmp_path))


def test_sample_sentences_is_even_and_seeded(fortunes_dir):
  first = fortunes.sample_sentences(["en", "de", "es"], 25, seed=3, fortunes_dir=fortunes_dir)
  again = fortunes.sample_sentences(["en", "de", "es"], 25, seed=3, fortunes_dir=fortunes_dir)
  other = fortunes.sample_sentences(["en", "de", "es"], 25, seed=4, fortunes_dir=fortunes_dir)
  assert first == again
  assert first != other
  assert [sum(s.language == lang for s in first) for lang in ("en", "de", "es")] == [9, 8, 8]
  with pytest.raises(ValueError, match="only 11 usable de sentences"):
    fortunes.sample_sentences(["de"], 12, seed=0, fortunes_dir=fortunes_dir)


def test_speakers_differ_in_voice_speed_and_pitch():
  speakers = speech_corpus.make_speakers("en", 6, seed=0, variants=speech_corpus.VARIANTS)
  assert len({s.id for s in speakers}) == 6
  assert len({(s.voice, s.variant) for s in speakers}) == 6
  assert len({(s.speed_wpm, s.pitch) for s in speakers}) > 1
  assert all(speech_corpus.SPEED_WPM[0] <= s.speed_wpm <= speech_corpus.SPEED_WPM[1] and
             speech_corpus.PITCH[0] <= s.pitch <= speech_corpus.PITCH[1] for s in speakers)
  assert speakers == speech_corpus.make_speakers("en", 6, seed=0, variants=speech_corpus.VARIANTS)


def audio_digests(corpus_dir):
  digests = {}
  for folder, _, files in os.walk(os.path.join(corpus_dir, "audio")):
    for name in files:
      with open(os.path.join(folder, name), "rb") as stream:
        digests[name] = hashlib.sha256(stream.read()).hexdigest()
  return digests


@pytest.fixture(scope="module")
def corpus(fortunes_dir, tmp_path_factory):
  output = str(tmp_path_factory.mktemp("corpus"))
  summary = speech_corpus.synthesize_corpus(output, ["en", "de", "es"], 30, seed=0,
                                         speakers_per_language=3, num_workers=2,
                                         fortunes_dir=fortunes_dir)
  return output, summary


@needs_espeak
def test_corpus_is_16k_speech_in_three_languages_with_disjoint_splits(corpus):
  output, summary = corpus
  with open(os.path.join(output, "manifest.jsonl"), encoding="utf-8") as stream:
    rows = [json.loads(line) for line in stream]
  assert len(rows) == summary["utterances"] == 30
  assert summary["per_language_split"] == {
      language: {"train": 8, "validation": 1, "test": 1} for language in ("en", "de", "es")}
  texts_by_split = {}
  for row in rows:
    info = soundfile.info(os.path.join(output, row["audio"]))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert 0.5 < info.duration < 15
    assert row["speaker"].startswith(row["language"] + "-s")
    texts_by_split.setdefault(row["split"], set()).add(splits.normalize_sentence(row["text"]))
  assert sum(len(texts) for texts in texts_by_split.values()) == 30
  assert texts_by_split["train"].isdisjoint(texts_by_split["test"] |
                                            texts_by_split["validation"])
  assert len({row["speaker"] for row in rows if row["language"] == "en"}) > 1
  train = reader.open_split(summary["dataset_dir"], "train")
  records = train.read(range(len(train)))
  assert len(records) == 24
  assert {r["language"] for r in records} == {"en", "de", "es"}
  assert {r["source"] for r in records} == {"synthetic"}
  assert all(np.abs(r["audio"]).max() > 1000 for r in records)  # really speech, not silence
  metadata = reader.read_metadata(summary["dataset_dir"])
  assert sum(metadata["bad_input"]["skipped"].values()) == 0


@needs_espeak
def test_corpus_is_identical_for_a_seed(corpus, fortunes_dir, tmp_path):
  output, _ = corpus
  again = str(tmp_path / "again")
  speech_corpus.synthesize_corpus(again, ["en", "de", "es"], 30, seed=0, speakers_per_language=3,
                               num_workers=1, fortunes_dir=fortunes_dir, build=False)
  for name in ("manifest.jsonl",):
    with open(os.path.join(output, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
      assert a.read() == b.read()
  assert audio_digests(output) == audio_digests(again)
  with pytest.raises(FileExistsError, match="--overwrite"):
    speech_corpus.synthesize_corpus(again, ["en"], 3, seed=0, fortunes_dir=fortunes_dir,
                                 build=False)


def run_module(*args):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)


def test_synthesize_cli_help_and_clear_errors(fortunes_dir, tmp_path):
  result = run_module("clasp_jax.data.synthesize", "--help")
  assert result.returncode == 0
  assert "--num_sentences" in result.stdout and "--languages" in result.stdout
  result = run_module("clasp_jax.data.synthesize", f"--output={tmp_path}", "--languages=en,fr",
                      "--num_sentences=4", f"--fortunes_dir={fortunes_dir}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: languages ['fr']")
  assert "Traceback" not in result.stderr


def test_install_script_is_valid_and_documents_itself():
  script = os.path.join(REPO, "scripts", "install_system_packages.sh")
  assert subprocess.run(["bash", "-n", script]).returncode == 0
  result = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
  assert result.returncode == 0 and "espeak-ng" in result.stdout
  result = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True)
  assert result.returncode == 2 and "unknown argument" in result.stderr
