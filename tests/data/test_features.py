"""Feature-mode data: the array format round-trips and the synthetic set is learnable."""

import numpy as np
import pytest

from clasp_jax.data import features
from clasp_jax.data.sampling import EpochSampler
from configs import base


def test_synthetic_features_are_deterministic_and_labelled():
  dims = {"speech": 12, "spectrogram": 10, "text": 8}
  a = features.synthetic_feature_split("train", num_examples=50, dims=dims, noise=1.0, seed=3)
  b = features.synthetic_feature_split("train", num_examples=50, dims=dims, noise=1.0, seed=3)
  val = features.synthetic_feature_split("validation", num_examples=50, dims=dims, noise=1.0,
                                         seed=3)
  for name in features.FEATURE_FIELDS + features.LABEL_FIELDS:
    np.testing.assert_array_equal(a.arrays[name], b.arrays[name])
  assert not np.allclose(a.arrays["text"], val.arrays["text"])
  assert a.dims == dims
  np.testing.assert_allclose(np.linalg.norm(a.arrays["text"], axis=1), 1.0, rtol=1e-5)
  assert set(a.label_names("category")) <= set(features.SYNTHETIC_CATEGORIES)


def test_speech_features_carry_the_text_signal():
  """A least-squares map from speech to text features retrieves far above chance."""
  dims = {"speech": 64, "spectrogram": 48, "text": 32}
  train = features.synthetic_feature_split("train", num_examples=2000, dims=dims, noise=1.0,
                                           seed=0)
  val = features.synthetic_feature_split("validation", num_examples=200, dims=dims, noise=1.0,
                                         seed=0)
  mapping, *_ = np.linalg.lstsq(train.arrays["speech"], train.arrays["text"], rcond=None)
  predicted = val.arrays["speech"] @ mapping
  hits = np.mean(np.argmax(predicted @ val.arrays["text"].T, axis=1) == np.arange(200))
  assert hits > 20 / 200


def test_feature_split_round_trips_through_files(tmp_path):
  dims = {"speech": 6, "spectrogram": 5, "text": 4}
  split = features.synthetic_feature_split("test", num_examples=9, dims=dims, noise=0.5, seed=1)
  features.write_feature_split(str(tmp_path / "test"), split)
  config = base.get_config(f"features={tmp_path}")
  loaded = features.load_split(config.data, "test")
  for name in features.FEATURE_FIELDS + features.LABEL_FIELDS:
    np.testing.assert_array_equal(loaded.arrays[name], split.arrays[name])
  assert loaded.categories == split.categories and loaded.num_examples == 9


def test_missing_feature_folder_is_a_clear_error(tmp_path):
  config = base.get_config(f"features={tmp_path}")
  with pytest.raises(FileNotFoundError, match="info.json is missing"):
    features.load_split(config.data, "train")


def test_epoch_sampler_covers_each_epoch_once_and_shards_disjointly():
  shards = [EpochSampler(100, 20, seed=5, process_index=p, process_count=2) for p in range(2)]
  for epoch in range(2):
    seen = np.concatenate([s.local_indices(epoch * 5 + k) for s in shards for k in range(5)])
    assert sorted(seen) == list(range(100))
  assert not set(shards[0].local_indices(3)) & set(shards[1].local_indices(3))
  with pytest.raises(ValueError, match="does not divide"):
    EpochSampler(100, 21, seed=0, process_count=2)
