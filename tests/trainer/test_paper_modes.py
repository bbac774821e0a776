"""configs/base.py:paper in both modes at tiny size, through the code path of the full runs:
feature mode on feature splits, and `paper,speech=audio` from waveforms with a (tiny, random)
HuBERT checkpoint frozen, a LaBSE-shaped text tower frozen, and a built dataset."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from clasp_jax.data import features
from clasp_jax.models import text_tower
from clasp_jax.models import wav2vec2_checkpoint
from clasp_jax.trainer import trainer
from tests.helpers import workdirs
from configs import base

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _params(workdir, step="latest"):
  return workdirs.read_state(workdir, step)[0]["params"]


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory):
  pytest.importorskip("torch")
  from tests.helpers import checkpoints
  return checkpoints.build_hubert(tmp_path_factory.mktemp("hubert"))[2]


def test_paper_audio_mode_trains_over_the_frozen_pretrained_towers(
    tmp_path, tone_corpus, hubert_dir, labse_like_dir):
  config = base.get_config("paper,speech=audio,tiny")
  config.model.speech.checkpoint = hubert_dir
  config.model.text.encoder = labse_like_dir
  config.data.datasets = tone_corpus
  config.data.max_duration_s = 1.0
  config.model.embed_dim = text_tower.load(labse_like_dir).embedding_dim
  config.num_epochs = 2
  config.optimizer.learning_rate = 1e-3
  config.log_every_steps = 1
  trainer.train_and_evaluate(config, str(tmp_path))

  records = _jsonl(tmp_path / "metrics.jsonl")
  assert any("val/speech_to_text/hits@1" in r for r in records)
  assert config.data.peak_normalize and config.loss.scale_init == 0.07
  params = _params(tmp_path)
  assert "text_encoder" not in params  # LaBSE frozen: its embeddings come with the batch.
  pretrained = jax.device_get(wav2vec2_checkpoint.load(hubert_dir).params)
  chex.assert_trees_all_equal(params["ssl_encoder"], pretrained)  # Frozen: bit-identical.
  overview = (tmp_path / "parameters.txt").read_text()
  assert "spectrogram_encoder/" in overview


def test_paper_feature_mode_trains_on_feature_splits(tmp_path):
  rng = np.random.default_rng(0)
  dims = {"speech": 24, "spectrogram": 20, "text": 16}
  directory = tmp_path / "features"
  for split, count in (("train", 64), ("validation", 32), ("test", 32)):
    text = rng.normal(size=(count, dims["text"])).astype(np.float32)
    arrays = {"text": text,
              "speech": np.tanh(text @ rng.normal(size=(16, 24))).astype(np.float32),
              "spectrogram": np.tanh(text @ rng.normal(size=(16, 20))).astype(np.float32),
              "category": np.zeros(count, np.int32), "language": np.zeros(count, np.int32)}
    features.write_feature_split(str(directory / split), features.FeatureSplit(
        arrays=arrays, categories=["c"] * count, languages=["en"] * count))
  config = base.get_config(f"paper,tiny,features={directory}")
  config.num_epochs = 2
  config.eval_every_steps = 0  # Once per epoch, as the paper (tiny evaluates every 20 steps).
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  records = _jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in records if "val/loss" in r] == [2, 4]
