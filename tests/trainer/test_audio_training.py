"""Audio-mode CLASP trains end to end from waveforms: the loss falls, trainable towers move
and frozen ones stay bit-identical, a restart equals the uninterrupted run, and the trained
workdir embeds new audio and sentences as its evaluator did."""

import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from clasp_jax.data import reader
from clasp_jax.inference import workdir as inference
from clasp_jax.models import text_tower
from clasp_jax.retrieval import metrics
from clasp_jax.trainer import trainer
from tests.helpers import workdirs
from tests.helpers import audio_workdir

# With `-n 2 --dist loadgroup` both modules run on one worker, which trains the shared
# tiny workdir (tests/conftest.py: trained_audio_workdir) once.
pytestmark = pytest.mark.xdist_group("trained_audio_workdir")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL_STEPS = 24


def audio_config(dataset, encoder):
  return audio_workdir.audio_config(dataset, encoder, total_steps=TOTAL_STEPS)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(trained_audio_workdir):
  return trained_audio_workdir


def _params(workdir, step):
  return workdirs.read_state(workdir, step)[0]["params"]


def test_audio_mode_learns_and_only_trainable_towers_move(trained, labse_like_dir):
  workdir, _ = trained
  losses = [r["train/loss"] for r in _jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
  assert len(losses) == TOTAL_STEPS // 4
  assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
  overview = (workdir / "parameters.txt").read_text()
  assert "ssl_encoder/" in overview and "spectrogram_encoder/" in overview

  final = _params(workdir, "latest")
  pretrained = jax.device_get(text_tower.load(labse_like_dir).params)
  chex.assert_trees_all_equal(final["text_encoder"], pretrained)  # Frozen: bit-identical.
  first = _params(workdir, 12)
  for tower in ("ssl_encoder", "spectrogram_encoder", "speech_encoder"):
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(final[tower]), jax.tree.leaves(first[tower]))]
    assert sum(moved) > len(moved) // 2, tower


def test_restart_at_step_k_equals_the_uninterrupted_run(trained, tmp_path, tone_corpus,
                                                        labse_like_dir):
  workdir, config = trained
  # A run that was stopped after its step-12 checkpoint: the same workdir without step 24.
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(TOTAL_STEPS))
  shutil.rmtree(resumed / "best")
  trainer.train_and_evaluate(config, str(resumed))
  chex.assert_trees_all_close(_params(resumed, "latest"), _params(workdir, "latest"),
                              rtol=0, atol=1e-6)


def test_embed_clasp_gives_the_rows_the_evaluator_scored(trained, tmp_path, tone_corpus):
  workdir, _ = trained
  embeddings, step = inference.embed_workdir_split(str(workdir), "validation")
  logged = [r for r in _jsonl(workdir / "metrics.jsonl") if "val/loss" in r and r["step"] == step]
  expected = metrics.bidirectional_metrics(embeddings["speech"], embeddings["text"])
  assert logged[0]["val/speech_to_text/mrr"] == pytest.approx(expected["speech_to_text/mrr"],
                                                              rel=1e-5)

  # ROOT/data/<builder>/<name>/<version>: the manifest and audio/ are in ROOT.
  corpus_root = tone_corpus
  for _ in range(4):
    corpus_root = os.path.dirname(corpus_root)
  rows = [json.loads(line) for line in open(os.path.join(corpus_root, "manifest.jsonl"))]
  by_id = {row["id"]: row for row in rows}
  split = reader.open_split(tone_corpus, "validation")  # Its stored order is the evaluator's.
  validation = [by_id[split[index]["id"]] for index in range(len(split))]
  audio_list = tmp_path / "audio.txt"
  audio_list.write_text("".join(os.path.join(corpus_root, row["audio"]) + "\n"
                                for row in validation))
  sentences = tmp_path / "sentences.txt"
  sentences.write_text("".join(row["text"] + "\n" for row in validation))
  for flags, output in ((["--input", str(audio_list)], tmp_path / "speech.npy"),
                        (["--text", "--input", str(sentences)], tmp_path / "text.npy")):
    process = subprocess.run(
        [sys.executable, "-m", "clasp_jax.embed", "clasp", f"--workdir={workdir}", *flags,
         f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
  np.testing.assert_allclose(np.load(tmp_path / "speech.npy"), embeddings["speech"], atol=1e-4)
  np.testing.assert_allclose(np.load(tmp_path / "text.npy"), embeddings["text"], atol=1e-5)
