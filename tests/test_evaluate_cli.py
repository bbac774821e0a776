"""`python -m clasp_jax.evaluate` end to end: real processes, real files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clasp_jax import evaluate
from clasp_jax.retrieval import evaluation as protocols
from clasp_jax.retrieval import scoring
from tests.helpers import retrieval_reference as reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "clasp_jax.evaluate", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "embeddings.npz"
  np.savez(path, **reference.planted_corpus(seed=3))
  return path


def test_writes_every_metric(npz_path, tmp_path):
  output = tmp_path / "out" / "metrics.json"
  result = run_cli(f"--embeddings={npz_path}", f"--output={output}", "--skip_ties",
                   "--duplicates_as_hits", "--cross_lingual=fr:en", "--block_rows=8",
                   "--block_cols=16")
  assert result.returncode == 0, result.stderr
  assert "speech_to_text: hits@1" in result.stdout
  assert "scored 96/96 speech rows" in result.stderr  # The progress line.
  written = json.loads(output.read_text())
  metrics = {name: value for name, value in written.items() if not name.startswith("settings/")}
  want = protocols.evaluate(
      reference.planted_corpus(seed=3),
      protocols.Protocol(skip_ties=True, duplicates_as_hits=True,
                         cross_lingual=(("fr", "en"),)),
      # Same tiles as the command: cosines of different vectors that are equal in exact
      # arithmetic may round apart under another tile shape.
      blocking=scoring.make_blocking(block_rows=8, block_cols=16), normalize=True)
  assert metrics == pytest.approx(want)
  assert written["settings/protocol"] == "hard" and written["settings/num_pairs"] == 96


def test_bad_input_gives_one_line_and_nonzero_exit(npz_path, tmp_path):
  missing = run_cli(f"--embeddings={tmp_path / 'nope.npz'}", f"--output={tmp_path / 'o.json'}")
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines()[-1].startswith("error: --embeddings: no such file")
  assert "Traceback" not in missing.stderr
  bad_pair = run_cli(f"--embeddings={npz_path}", f"--output={tmp_path / 'o.json'}",
                     "--cross_lingual=fr")
  assert bad_pair.returncode == 1 and "Traceback" not in bad_pair.stderr
  assert "TEXT_LANGUAGE:SPEECH_LANGUAGE" in bad_pair.stderr
  assert not (tmp_path / "o.json").exists()


def test_help_lists_the_flags():
  result = run_cli("--helpshort")  # absl exits with status 1 after printing help.
  assert "Traceback" not in result.stderr
  assert "python -m clasp_jax.evaluate --embeddings=" in result.stdout
  for flag in ("--embeddings", "--output", "--protocol", "--num_candidates", "--skip_ties",
               "--duplicates_as_hits", "--breakdowns", "--cross_lingual"):
    assert flag in result.stdout + result.stderr, flag


@pytest.mark.parametrize("arrays,message", [
    ({"speech": np.zeros((3, 4), np.float32)}, "need 'speech' and 'text'"),
    ({"speech": np.ones((3, 4), np.float32), "text": np.ones((3, 4), np.float32),
      "languages": np.array(["en"] * 3)}, "unknown fields \\['languages'\\]"),
    ({"speech": np.ones((3, 4), np.float32), "text": np.ones((3, 4), np.float32),
      "category": np.array(["a", 1, None], dtype=object)}, "fixed-width strings"),
    ({"speech": np.ones((3, 4), np.int32), "text": np.ones((3, 4), np.int32)}, "hold floats"),
])
def test_file_contents_are_checked(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(protocols.InputError, match=message):
    protocols.Corpus.from_mapping(evaluate.load_embeddings(str(path)), strict=True)


def test_a_file_that_is_not_npz_is_refused(tmp_path):
  path = tmp_path / "embeddings.npz"
  path.write_text("speech,text\n")
  with pytest.raises(protocols.InputError, match="not an .npz"):
    evaluate.load_embeddings(str(path))
  path.write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(protocols.InputError, match="cannot read"):
    evaluate.load_embeddings(str(path))
  np.save(tmp_path / "single.npy", np.zeros(3))
  with pytest.raises(protocols.InputError, match="not an .npz"):
    evaluate.load_embeddings(str(tmp_path / "single.npy"))
