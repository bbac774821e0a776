"""`python -m clasp_jax.search` on a trained tiny workdir: the archive of the tone corpus' test
clips is indexed (then grown), queried by text as the evaluator ranks, served to Chromium, and
bad input gets one-line errors with the convention's exit codes.

The commands run in this process (their `run` functions, as the CLI calls them) except where
the test is about the real entry point: `python -m` once for query, and for serve.
"""

import contextlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from clasp_jax.data import reader
from clasp_jax.inference import archive_search
from clasp_jax.inference import workdir as inference
from clasp_jax.retrieval import search_index
from clasp_jax.trainer.checkpointing import Checkpointer
from configs import base
from tests.helpers.devtools import AUDIO_DURATION, HITS

# With `-n 2 --dist loadgroup` both modules run on one worker, which trains the shared
# tiny workdir (tests/conftest.py: trained_audio_workdir) once.
pytestmark = pytest.mark.xdist_group("trained_audio_workdir")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_BATCH = 24  # Test clips in the archive at first; the rest arrive later.


@pytest.fixture(scope="module")
def workdir(trained_audio_workdir):
  return str(trained_audio_workdir[0])


@pytest.fixture(scope="module")
def best_step(workdir):
  """The step the commands use by default (--checkpoint=best)."""
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    return checkpointer.best_step()
  finally:
    checkpointer.close()


@pytest.fixture(scope="module")
def test_clips(tone_corpus):
  """[(audio path, sentence)] of the test split in its stored order (the evaluator's)."""
  corpus_root = tone_corpus
  for _ in range(4):  # ROOT/data/<builder>/<name>/<version>: the manifest is in ROOT.
    corpus_root = os.path.dirname(corpus_root)
  with open(os.path.join(corpus_root, "manifest.jsonl")) as stream:
    by_id = {row["id"]: row for row in map(json.loads, stream)}
  split = reader.open_split(tone_corpus, "test")
  rows = [by_id[split[index]["id"]] for index in range(len(split))]
  return [(os.path.join(corpus_root, row["audio"]), row["text"]) for row in rows]


def run_command(command, argv):
  """(exit code, stdout, stderr) of a search sub-command run in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = archive_search.SUBCOMMANDS[command]([f"search {command}", *argv])
  return code, out.getvalue(), err.getvalue()


def one_error_line(err):
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, workdir, test_clips):
  """The index of all test clips, built in two runs; returns (index, archive, run logs)."""
  root = tmp_path_factory.mktemp("archive")
  audio, index = root / "audio", str(root / "index")
  os.makedirs(audio / "first")
  os.makedirs(audio / "later")
  for number, (path, _) in enumerate(test_clips):
    shutil.copy2(path, audio / ("first" if number < FIRST_BATCH else "later") /
                 os.path.basename(path))
  shutil.move(str(audio / "later"), str(root / "later"))  # Not in the archive yet.
  transcripts = root / "transcripts.tsv"
  transcripts.write_text("".join(f"first/{os.path.basename(path)}\t{text}\n"
                                 for path, text in test_clips[:3]))
  argv = [f"--workdir={workdir}", f"--audio={audio}", f"--index={index}", "--batch_size=8",
          f"--transcripts={transcripts}"]
  logs = [run_command("index", argv)]
  first = search_index.SearchIndex.load(index)
  first_rows = {entry.path: np.array(row) for entry, row in zip(first.entries, first.embeddings)}
  shutil.move(str(root / "later"), str(audio / "later"))
  (audio / "later" / "broken.wav").write_bytes(b"RIFF but not audio")
  logs.append(run_command("index", argv[:-1]))  # Transcripts are kept without the file.
  return index, str(audio), logs, first_rows


def test_index_grows_by_the_new_files_only(archive, test_clips, workdir, best_step):
  index_folder, audio, logs, first_rows = archive
  (code, _, err), (code2, _, err2) = logs
  assert code == 0, err
  assert f"{FIRST_BATCH} new, 0 changed, 0 removed, 0 unchanged" in err
  assert f"embedded {FIRST_BATCH}/{FIRST_BATCH} files" in err
  assert code2 == 0, err2  # An unreadable file is listed, not fatal.
  added = len(test_clips) - FIRST_BATCH
  assert f"{added + 1} new, 0 changed, 0 removed, {FIRST_BATCH} unchanged" in err2
  assert f"embedded {added + 1}/{added + 1} files" in err2
  assert re.search(r"skipped .*broken\.wav: undecodable", err2), err2
  assert f"{len(test_clips)} recordings indexed; {added} embedded" in err2
  assert "1 unreadable" in err2

  index = search_index.SearchIndex.load(index_folder)
  assert index.model == search_index.ModelInfo(workdir, best_step)
  assert sorted(os.path.basename(e.path) for e in index.entries) == sorted(
      os.path.basename(path) for path, _ in test_clips)
  for entry, row in zip(index.entries, index.embeddings):
    if entry.path in first_rows:  # Kept as they were, not embedded again.
      np.testing.assert_array_equal(row, first_rows[entry.path])
  said = {os.path.basename(path): text for path, text in test_clips[:3]}
  assert {os.path.basename(e.path): e.transcript for e in index.entries if e.transcript} == said


def test_query_returns_what_evaluate_ranks_first(archive, test_clips, workdir, best_step,
                                                 tmp_path):
  index_folder = archive[0]
  embeddings, step = inference.embed_workdir_split(workdir, "test")
  assert step == best_step
  scores = embeddings["text"] @ embeddings["speech"].T  # (texts, d) @ (d, clips) -> (texts, clips)
  ranked_first = np.flatnonzero(scores.argmax(axis=1) == np.arange(len(scores)))
  # A few dozen steps rank only a few sentences first (sometimes none); the check of every
  # query's list against the evaluator's scores below is what keeps this test from passing idly.

  queries = tmp_path / "queries.txt"
  queries.write_text("".join(text + "\n" for _, text in test_clips))
  code, out, err = run_command("query", [f"--index={index_folder}", f"--queries={queries}",
                                         "-k", "3", "--json"])
  assert code == 0, err
  answers = [json.loads(line) for line in out.splitlines()]
  assert [answer["query"] for answer in answers] == [text for _, text in test_clips]
  names = [os.path.basename(path) for path, _ in test_clips]
  for number in ranked_first:
    assert os.path.basename(answers[number]["results"][0]["path"]) == names[number]
  compared = 0
  for number, answer in enumerate(answers):  # Every list is in the evaluator's order...
    order = np.argsort(-scores[number], kind="stable")[:4]
    found = [os.path.basename(hit["path"]) for hit in answer["results"]]
    for place in range(3):  # ...wherever its scores are not within rounding of each other.
      # Scores are checked to 1e-4 below, so a gap over 2e-4 fixes the order.
      if scores[number, order[place]] - scores[number, order[place + 1]] < 3e-4:
        break
      assert found[place] == names[order[place]], (number, place)
      compared += 1
    np.testing.assert_allclose([hit["score"] for hit in answer["results"]],
                               scores[number, order[:3]], atol=1e-4)
    assert [hit["rank"] for hit in answer["results"]] == [1, 2, 3]
    assert answer["model"] == {"workdir": workdir, "step": best_step}
  assert compared >= len(test_clips), compared  # Most places were clear enough to compare.

  # The real entry point, with a sentence in the command line and text output.
  sentence_number = int(ranked_first[0]) if len(ranked_first) else 0
  expected_first = os.path.basename(answers[sentence_number]["results"][0]["path"])
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.search", "query", f"--index={index_folder}",
       test_clips[sentence_number][1], "-k", "2"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-2000:]
  lines = process.stdout.splitlines()
  assert len(lines) == 2
  rank, score, path = lines[0].split()[:3]
  assert rank == "1" and os.path.basename(path) == expected_first
  assert float(score) == pytest.approx(answers[sentence_number]["results"][0]["score"],
                                       abs=6e-5)  # Printed to 4 decimals.

  # A recording finds itself first.
  code, out, err = run_command("query", [f"--index={index_folder}", "--json", "-k", "1",
                                         f"--audio_query={test_clips[5][0]}"])
  assert code == 0, err
  hit = json.loads(out)["results"][0]
  assert os.path.basename(hit["path"]) == names[5] and hit["score"] == pytest.approx(1, abs=1e-4)


@pytest.fixture(scope="module")
def feature_workdir(tmp_path_factory):
  """A workdir whose model has no text tower and reads features (its config is enough)."""
  folder = tmp_path_factory.mktemp("feature_run")
  (folder / "config.json").write_text(base.get_config("tiny").to_json_best_effort())
  return str(folder)


def test_bad_input_gives_one_line_errors(archive, feature_workdir, tmp_path):
  index_folder, audio = archive[0], archive[1]
  no_text_index = str(tmp_path / "no_text_index")
  clip = tmp_path / "clip.wav"
  soundfile.write(clip, np.zeros(1600, np.float32), 16000)
  search_index.update_index(no_text_index, [clip], lambda batch: np.ones((len(batch), 4)),
                            model=search_index.ModelInfo(feature_workdir, 0))
  cases = [
      ("query", [f"--index={tmp_path / 'none'}", "dogs"], 1, "no search index in"),
      ("query", [f"--index={index_folder}", "  "], 2, "empty query"),
      ("query", [f"--index={index_folder}"], 2, "give one of a query text"),
      ("query", [f"--index={index_folder}", "dogs", f"--audio_query={clip}"], 2, "not a query text and --audio_query"),
      ("query", [f"--index={index_folder}", "-k", "0", "dogs"], 2, "--k=0"),
      ("query", [f"--index={index_folder}", f"--audio_query={tmp_path / 'x.wav'}"], 1,
       "--audio_query"),
      ("query", [f"--index={no_text_index}", "dogs"], 1, "has no text tower"),
      ("query", ["dogs"], 2, "missing required flag(s): --index"),
      ("serve", [f"--index={no_text_index}", "--port=0"], 1, "has no text tower"),
      ("serve", [f"--index={tmp_path / 'none'}"], 1, "no search index in"),
      ("index", [f"--workdir={feature_workdir}", f"--audio={audio}",
                 f"--index={tmp_path / 'i'}"], 1, "features-mode model"),
      ("index", [f"--workdir={tmp_path}", f"--audio={audio}", f"--index={tmp_path / 'i'}"], 1,
       "is not a training workdir"),
      ("index", [f"--workdir={feature_workdir}", f"--audio={tmp_path / 'none'}",
                 f"--index={tmp_path / 'i'}"], 1, "no such folder"),
      ("index", [f"--workdir={feature_workdir}", f"--audio={audio}", "--index=i",
                 "--dtype=float64"], 2, "--dtype"),
      ("index", [f"--workdir={feature_workdir}", f"--audio={audio}", "--index=i",
                 "--checkpoint=soon"], 2, "--checkpoint must be"),
  ]
  for command, argv, expected_code, message in cases:
    code, _, err = run_command(command, argv)
    line = one_error_line(err)
    assert code == expected_code and message in line, (command, argv, err)
  code, out, _ = run_command("query", ["--help"])
  assert code == 0 and "--audio_query" in out and "--json" in out


def test_help_and_unknown_subcommand():
  process = subprocess.run([sys.executable, "-m", "clasp_jax.search", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
  assert process.returncode == 0 and all(
      f"search {name}" in process.stdout for name in ("index", "query", "serve"))
  process = subprocess.run([sys.executable, "-m", "clasp_jax.search", "find"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
  assert process.returncode == 2 and process.stderr.startswith("error: expected a sub-command")


def read_line(stream, timeout):
  deadline = time.monotonic() + timeout
  buffer = b""
  while not buffer.endswith(b"\n"):
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
      raise TimeoutError(f"no line from the server in {timeout} s (got {buffer!r})")
    chunk = os.read(stream.fileno(), 1)
    if not chunk:
      raise EOFError(f"the server exited (got {buffer!r})")
    buffer += chunk
  return buffer.decode()


def test_serve_in_chromium(browser, archive, test_clips, tmp_path):
  index_folder = archive[0]
  sentence = test_clips[0][1]
  code, out, err = run_command("query", [f"--index={index_folder}", "--json", "-k", "3",
                                         sentence])
  assert code == 0, err
  expected = json.loads(out)["results"]
  log = open(tmp_path / "server.log", "wb")
  server = subprocess.Popen(
      [sys.executable, "-m", "clasp_jax.search", "serve", f"--index={index_folder}",
       "--port=0"], cwd=REPO, stdout=subprocess.PIPE, stderr=log)
  try:
    line = read_line(server.stdout, 300)
    address = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
    assert address, line
    browser.navigate(address[1])
    assert browser.evaluate("document.title") == "Archive search"
    browser.type_and_submit("#q", sentence)
    hits = browser.evaluate(HITS)
    assert len(hits) == min(10, len(test_clips))
    assert [hit["path"] for hit in hits[:3]] == [hit["path"] for hit in expected]
    assert float(hits[0]["score"]) == pytest.approx(expected[0]["score"], abs=1e-4)
    assert hits[0]["transcript"] == expected[0]["transcript"]
    assert hits[0]["audio"] and re.fullmatch(r"/audio\?id=\d+", hits[0]["audio"])
    duration = soundfile.info(expected[0]["path"]).duration
    assert browser.evaluate(AUDIO_DURATION) == pytest.approx(duration, abs=0.01)
  finally:
    server.terminate()
    server.wait(timeout=30)
    log.close()
