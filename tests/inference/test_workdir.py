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


@pytest.mark.parametrize("source,preparation,want", [
    ("common_voice", "paper", ["hello world", "its fine"]),
    ("common_voice", "as_is", ["Hello, World!", "It's fine."]),
    ("speech_brown", "paper", ["Hello, World!", "It's fine."]),
])
def test_sentences_are_prepared_by_source_before_tokenising(labse_like_dir, source, preparation,
                                                            want):
  from clasp_jax.data import features  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import text_tower  # pylint: disable=g-import-not-at-top
  tower = text_tower.load(str(labse_like_dir), max_length=16)
  arrays = {name: np.zeros((2, 3), np.float32) for name in features.FEATURE_FIELDS}
  arrays.update({name: np.zeros(2, np.int32) for name in features.LABEL_FIELDS})
  split = features.FeatureSplit(arrays, ["c"], ["en"], source=source,
                                sentences=["Hello, World!", "It's fine."])
  inference.tokenize_split(split, "test", tower, preparation)
  input_ids, _ = tower.pad_batch(tower.tokenize(want), length=tower.max_length)
  np.testing.assert_array_equal(split.arrays["input_ids"], input_ids)
  with pytest.raises(inference.ConfigError, match="config.text.preparation"):
    inference.tokenize_split(split, "test", tower, "authors")
