"""`evaluate --baseline=asr`: CTC transcripts of a built dataset, embedded and scored."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
soundfile = pytest.importorskip("soundfile")

from clasp_jax.inference import asr_baseline  # noqa: E402
from clasp_jax.retrieval import metrics
from clasp_jax.models import text_tower
from clasp_jax import transcribe
from clasp_jax.data import reader  # noqa: E402
from clasp_jax.models import wav2vec2_checkpoint  # noqa: E402
from tests.helpers.checkpoints import build_labse_like  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SENTENCES = ["the cat sat", "a dog ran", "the old house", "a red tree", "the cat sat",
             "small hill", "big mat", "under the tree"] * 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A manifest dataset of tones (16 examples, one split each of train/validation/test)."""
  root = tmp_path_factory.mktemp("asr_data")
  rows = []
  for index, sentence in enumerate(SENTENCES):
    rate = (16000, 22050)[index % 2]
    seconds = 0.5 + 0.1 * index
    time = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (150 + 40 * index) * time) * np.sin(7 * time + index)
    soundfile.write(root / f"clip{index}.wav", tone.astype(np.float32), rate)
    rows.append({"audio": f"clip{index}.wav", "text": sentence, "language": "en",
                 "category": ("news", "fiction")[index % 2], "id": f"c{index}",
                 "split": "test" if index < 10 else ("train" if index < 14 else "validation")})
  manifest = root / "manifest.jsonl"
  manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.data.build", "--kind=manifest", f"--source={manifest}",
       f"--data_dir={root / 'built'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-2000:]
  return process.stdout.strip().splitlines()[-1]


def test_cli_scores_the_cascade_like_its_parts(dataset, ctc_encoder, tmp_path):
  _, _, ctc_folder = ctc_encoder
  sentence_folder = build_labse_like(tmp_path / "labse")
  output, transcripts_path = tmp_path / "metrics.json", tmp_path / "transcripts.tsv"
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.evaluate", "--baseline=asr", f"--data={dataset}",
       "--split=test", f"--speech_encoder={ctc_folder}", f"--text_encoder={sentence_folder}",
       f"--output={output}", f"--transcripts={transcripts_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  results = json.loads(output.read_text())

  # The same cascade from its parts, clip by clip.
  split = reader.open_split(dataset, "test")
  records = split.read(range(len(split)))
  checkpoint = wav2vec2_checkpoint.load(str(ctc_folder))
  expected_transcripts = [
      asr_baseline.transcribe_waveforms(checkpoint, [r["audio"].astype(np.float32) / 32768.0],
                                        batch_size=1)[0] for r in records]
  lines = transcripts_path.read_text().splitlines()
  assert [line.split("\t")[1] for line in lines] == expected_transcripts
  assert [line.split("\t")[2] for line in lines] == [r["text"] for r in records]
  tower = text_tower.load(sentence_folder)
  zspeech = tower.embed(expected_transcripts).astype(np.float64)
  ztext = tower.embed([r["text"] for r in records]).astype(np.float64)
  # A random tiny CTC model repeats transcripts, so equal embeddings tie exactly; rounding
  # keeps BLAS from ordering those ties by position.
  scores = np.round(zspeech @ ztext.T, 5)  # (n, d) @ (d, n) -> (n, n)
  for direction, matrix in (("speech_to_text", scores), ("text_to_speech", scores.T)):
    expected = metrics.metrics_from_ranks(metrics.gold_ranks(matrix))
    for name in ("hits@1", "mrr", "mean_rank"):
      assert results[f"{direction}/{name}"] == pytest.approx(expected[name], abs=1e-6), name
  assert results["settings/baseline"] == "asr"
  assert results["speech_to_text/num_queries"] == len(records) == 10
  assert any(key.startswith("by_category/news/") for key in results)


def test_transcribe_waveforms_matches_the_file_cli(ctc_encoder, tmp_path):
  _, _, ctc_folder = ctc_encoder
  rng = np.random.default_rng(0)
  clip = (0.2 * rng.standard_normal(12000)).astype(np.float32)
  soundfile.write(tmp_path / "clip.wav", clip, 16000, subtype="FLOAT")
  from_file = transcribe.transcribe(str(ctc_folder), [str(tmp_path / "clip.wav")]).transcripts
  checkpoint = wav2vec2_checkpoint.load(str(ctc_folder))
  assert asr_baseline.transcribe_waveforms(checkpoint, [clip]) == from_file


def test_baseline_needs_its_encoders(tmp_path):
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.evaluate", "--baseline=asr", f"--data={tmp_path}",
       f"--output={tmp_path / 'm.json'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert process.returncode == 2
  assert "needs --data, --speech_encoder and --text_encoder" in process.stderr
