"""The trainer's text-tower option: a pretrained sentence encoder, fine-tuned in its top layers."""

import jax
import numpy as np
import pytest

from clasp_jax.trainer import trainer
from clasp_jax.trainer.checkpointing import Checkpointer
from clasp_jax.data import features
from configs import base

pytest.importorskip("torch")
from tests.helpers.checkpoints import build_labse_like  # noqa: E402

WORDS = "the cat a dog sat ran on under mat hill red old small big house tree".split()


def _split_with_sentences(name, count, seed):
  dims = {"speech": 24, "spectrogram": 20, "text": 16}
  split = features.synthetic_feature_split(name, num_examples=count, dims=dims, noise=0.5,
                                           seed=seed)
  rng = np.random.default_rng(seed + len(name))
  split.sentences = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(count)]
  return split


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("features")
  for name, count in (("train", 128), ("validation", 64)):
    features.write_feature_split(str(root / name), _split_with_sentences(name, count, 0))
  return root


def _config(feature_dir, encoder, top_layers):
  config = base.get_config(f"tiny,features={feature_dir}")
  config.text.encoder = encoder
  config.text.trainable_top_layers = top_layers
  config.text.max_length = 16
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 8, 8, 8
  return config


def test_top_layer_fine_tunes_and_the_rest_stays_frozen(tmp_path, feature_dir):
  encoder = build_labse_like(tmp_path / "labse")
  from clasp_jax.models import text_tower
  pretrained = jax.device_get(text_tower.load(encoder).params)
  results = trainer.train_and_evaluate(_config(feature_dir, encoder, 1), str(tmp_path / "w"))
  assert np.isfinite(results["val/loss"]) and "val/text_to_speech/mrr" in results

  state, _ = Checkpointer(str(tmp_path / "w"), every_steps=1, keep=1).read()
  tuned = state["params"]["text_encoder"]
  layers = tuned["transformer"]["encoder"]
  top, bottom = layers["layer_1"], layers["layer_0"]
  changed = lambda new, old: any(not np.array_equal(a, b) for a, b in
                                 zip(jax.tree.leaves(new), jax.tree.leaves(old)))
  assert changed(top, pretrained["transformer"]["encoder"]["layer_1"])
  assert changed(tuned["dense_2"], pretrained["dense_2"])
  assert not changed(bottom, pretrained["transformer"]["encoder"]["layer_0"])
  assert not changed(tuned["transformer"]["embeddings"], pretrained["transformer"]["embeddings"])
  overview = (tmp_path / "w" / "parameters.txt").read_text()
  assert "text_encoder/transformer/encoder/layer_0" in overview and "frozen" in overview


def test_text_encoder_needs_sentences(tmp_path):
  encoder = build_labse_like(tmp_path / "labse")
  config = base.get_config("tiny")
  config.text.encoder = encoder
  with pytest.raises(trainer.ConfigError, match="needs the sentences"):
    trainer.train_and_evaluate(config, str(tmp_path / "w"))
