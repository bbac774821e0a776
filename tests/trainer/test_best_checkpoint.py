"""The best checkpoint by the early-stopping metric is kept beside the newest ones, and it is
what `evaluate --workdir` scores by default."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from clasp_jax.inference import workdir as inference
from clasp_jax.retrieval import metrics
from clasp_jax.trainer import trainer
from clasp_jax.trainer.checkpointing import Checkpointer
from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Trains past its best evaluation: early stopping on the validation loss taken as a score to
  maximise, so the first evaluations score best and patience ends the run two later."""
  workdir = tmp_path_factory.mktemp("early_stopped")
  config = base.get_config("tiny")
  config.total_steps = 200
  config.eval_every_steps = config.checkpoint_every_steps = 10
  config.keep_checkpoints = 1
  config.early_stopping.mode = "max"
  config.early_stopping.patience = 2
  trainer.train_and_evaluate(config, str(workdir))
  return workdir


def _evaluations(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "val/loss" in r}


def test_best_step_is_kept_beside_the_newest(workdir):
  evaluations = _evaluations(workdir)
  best_step = max(evaluations, key=lambda step: evaluations[step]["val/loss"])
  last_step = max(evaluations)
  assert best_step < last_step <= 200, "the run must go past its best evaluation"
  checkpointer = Checkpointer(str(workdir), every_steps=0, keep=1)
  try:
    assert checkpointer.latest_step() == last_step
    assert checkpointer.best_step() == best_step
    best, best_record = checkpointer.read("best")
    latest, _ = checkpointer.read("latest")
    assert best_record["step"] == best_step == int(best["step"])
    with pytest.raises(AssertionError):
      chex.assert_trees_all_close(best["params"], latest["params"])
  finally:
    checkpointer.close()


def test_evaluate_workdir_scores_the_best_step(workdir, tmp_path):
  evaluations = _evaluations(workdir)
  best_step = max(evaluations, key=lambda step: evaluations[step]["val/loss"])
  embeddings, step = inference.embed_workdir_split(str(workdir), "validation")
  assert step == best_step
  expected = metrics.bidirectional_metrics(embeddings["speech"], embeddings["text"])
  for name in ("speech_to_text/mrr", "text_to_speech/hits@5", "speech_to_text/mean_rank"):
    assert evaluations[best_step][f"val/{name}"] == pytest.approx(expected[name], rel=1e-6)

  output = tmp_path / "metrics.json"
  process = subprocess.run(
      [sys.executable, "-m", "clasp_jax.evaluate", f"--workdir={workdir}", "--split=validation",
       f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-2000:]
  results = json.loads(output.read_text())
  assert results["settings/checkpoint"] == "best"
  assert results["settings/checkpoint_step"] == best_step
  assert results["speech_to_text/mrr"] == pytest.approx(
      evaluations[best_step]["val/speech_to_text/mrr"], rel=1e-6)
  latest, latest_step = inference.embed_workdir_split(str(workdir), "validation",
                                                      checkpoint="latest")
  assert latest_step == max(evaluations)
  assert not np.allclose(latest["speech"], embeddings["speech"])
