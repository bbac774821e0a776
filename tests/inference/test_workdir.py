"""`python -m clasp_jax.evaluate --workdir`: a trained run embeds a split and is scored."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clasp_jax.inference import workdir as inference
from clasp_jax.retrieval import metrics
from clasp_jax.trainer import trainer
from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained")
  config = base.get_config("tiny")
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 20
  trainer.train_and_evaluate(config, str(workdir))
  return workdir


def test_workdir_embeddings_reproduce_the_trainers_validation_metrics(workdir):
  embeddings, step = inference.embed_workdir_split(str(workdir), "validation")
  assert step == 20
  expected = metrics.bidirectional_metrics(embeddings["speech"], embeddings["text"])
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  last_eval = [r for r in logged if "val/loss" in r][-1]
  for name in ("speech_to_text/hits@5", "text_to_speech/mrr", "speech_to_text/mean_rank"):
    assert last_eval[f"val/{name}"] == pytest.approx(expected[name], rel=1e-6)


def test_cli_evaluates_a_workdir_split(workdir, tmp_path):
  output = tmp_path / "metrics.json"
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.evaluate", f"--workdir={workdir}", "--split=test",
       f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-2000:]
  results = json.loads(output.read_text())
  embeddings, _ = inference.embed_workdir_split(str(workdir), "test")
  expected = metrics.bidirectional_metrics(embeddings["speech"], embeddings["text"])
  assert results["speech_to_text/hits@1"] == pytest.approx(expected["speech_to_text/hits@1"])
  assert results["text_to_speech/mean_rank"] == pytest.approx(expected["text_to_speech/mean_rank"])
  assert results["settings/split"] == "test"
  assert any(key.startswith("by_category/") for key in results)
  assert np.isfinite(results["speech_to_text/mrr"])


def test_cli_rejects_a_folder_that_is_no_workdir(tmp_path):
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.evaluate", f"--workdir={tmp_path}",
       f"--output={tmp_path / 'm.json'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == 1
  assert "config.json is missing" in process.stderr and "Traceback" not in process.stderr
