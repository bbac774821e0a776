"""Feature-mode data: precomputed per-example features, as the paper trains.

A feature split is a folder `<root>/<split>/` holding one `.npy` file per field, read memory
mapped so that a split larger than RAM still trains:

  speech.npy       (N, speech_dim)       float32  speech SSL features (HuBERT mean-pooled)
  spectrogram.npy  (N, spectrogram_dim)  float32  spectrogram encoder features
  text.npy         (N, text_dim)         float32  sentence embeddings (LaBSE)
  category.npy     (N,)                  int32    index into info.json "categories"
  language.npy     (N,)                  int32    index into info.json "languages"
  info.json        {"num_examples", "categories": [...], "languages": [...], "source": ...}
  sentences.json   optional: the N sentences, needed when the trainer runs a text tower

`python -m clasp_jax.extract` writes such splits from built speech-text datasets (its
spectrogram.npy is (N, 0) when no spectrogram encoder was given: only fusion mode 'speech'
trains on it). `synthetic_features` generates splits on the fly from a seed (offline default).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import numpy as np

FEATURE_FIELDS = ("speech", "spectrogram", "text")
LABEL_FIELDS = ("category", "language")
SYNTHETIC_CATEGORIES = (
    "adventure", "belles_lettres", "editorial", "fiction", "government", "hobbies", "humor",
    "learned", "lore", "mystery", "news", "religion", "reviews", "romance", "science_fiction")
SYNTHETIC_LANGUAGES = ("en", "de", "es")


@dataclasses.dataclass
class FeatureSplit:
  """One split's arrays (row i of every field is example i) and its label names."""

  arrays: dict[str, np.ndarray]
  categories: list[str]
  languages: list[str]
  source: str = ""
  sentences: list[str] | None = None

  def __post_init__(self):
    missing = [f for f in FEATURE_FIELDS + LABEL_FIELDS if f not in self.arrays]
    if missing:
      raise ValueError(f"feature split lacks fields {missing}")
    counts = {name: len(array) for name, array in self.arrays.items()}
    if self.sentences is not None:
      counts["sentences"] = len(self.sentences)
    if len(set(counts.values())) != 1:
      raise ValueError(f"feature fields differ in length: {counts}")

  @property
  def num_examples(self) -> int:
    return len(self.arrays["text"])

  def __len__(self) -> int:
    return self.num_examples

  @property
  def lengths(self) -> np.ndarray:
    """Every row has the same shape: nothing to bucket or pad (the pipeline's Source API)."""
    return np.zeros(self.num_examples, np.int64)

  def describe(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Host fields of `indices` as the input pipeline reports them for audio sources."""
    indices = np.asarray(indices, dtype=np.int64)
    sentences = (np.asarray(self.sentences, dtype=object)[indices] if self.sentences is not None
                 else np.full(len(indices), "", dtype=object))
    return {
        "id": indices.astype(str).astype(object),
        "text": sentences,
        "language": np.asarray(self.languages, dtype=object)[self.arrays["language"][indices]],
        "category": np.asarray(self.categories, dtype=object)[self.arrays["category"][indices]],
        "speaker": np.full(len(indices), "", dtype=object),
        "source": np.full(len(indices), self.source, dtype=object),
    }

  @property
  def dims(self) -> dict[str, int]:
    return {name: int(self.arrays[name].shape[1]) for name in FEATURE_FIELDS}

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The model inputs of `indices`, as a batch."""
    return {name: np.asarray(self.arrays[name][indices], np.float32) for name in FEATURE_FIELDS}

  def label_names(self, field: str) -> np.ndarray:
    names = np.asarray(self.categories if field == "category" else self.languages, dtype=object)
    return names[np.asarray(self.arrays[field])]


def write_feature_split(directory: str, split: FeatureSplit) -> None:
  os.makedirs(directory, exist_ok=True)
  if split.sentences is not None:
    with open(os.path.join(directory, "sentences.json"), "w") as f:
      json.dump(list(split.sentences), f, ensure_ascii=False)
  for name in FEATURE_FIELDS + LABEL_FIELDS:
    array = split.arrays[name]
    dtype = np.float32 if name in FEATURE_FIELDS else np.int32
    np.save(os.path.join(directory, f"{name}.npy"), np.asarray(array, dtype))
  info = {"num_examples": split.num_examples, "categories": list(split.categories),
          "languages": list(split.languages), "source": split.source}
  with open(os.path.join(directory, "info.json"), "w") as f:
    json.dump(info, f, indent=2)


def read_feature_split(directory: str) -> FeatureSplit:
  """Memory-maps a split written by `write_feature_split` (or by an extraction job)."""
  info_path = os.path.join(directory, "info.json")
  if not os.path.exists(info_path):
    raise FileNotFoundError(f"no feature split at {directory}: {info_path} is missing")
  with open(info_path) as f:
    info = json.load(f)
  arrays = {}
  for name in FEATURE_FIELDS + LABEL_FIELDS:
    path = os.path.join(directory, f"{name}.npy")
    if not os.path.exists(path):
      raise FileNotFoundError(f"feature split {directory} lacks {name}.npy")
    arrays[name] = np.load(path, mmap_mode="r")
  sentences = None
  sentences_path = os.path.join(directory, "sentences.json")
  if os.path.exists(sentences_path):
    with open(sentences_path) as f:
      sentences = json.load(f)
  split = FeatureSplit(arrays, info["categories"], info["languages"], info.get("source", ""),
                       sentences)
  if split.num_examples != info["num_examples"]:
    raise ValueError(f"{directory}: info.json says {info['num_examples']} examples, "
                     f"arrays hold {split.num_examples}")
  return split


def synthetic_feature_split(split: str, *, num_examples: int, dims: Mapping[str, int],
                            noise: float, seed: int) -> FeatureSplit:
  """A learnable but not trivial retrieval problem, made offline.

  Text embeddings cluster by category (so near neighbours are confusable); speech and
  spectrogram features are fixed random non-linear maps of the text embedding (the same maps
  for every split, drawn from `seed`) plus per-example noise of relative size `noise`.
  """
  map_rng = np.random.default_rng([seed, 0])
  text_dim = dims["text"]
  centres = map_rng.standard_normal((len(SYNTHETIC_CATEGORIES), text_dim))
  speech_map = map_rng.standard_normal((text_dim, dims["speech"])) / np.sqrt(text_dim)
  spectrogram_map = map_rng.standard_normal((text_dim, dims["spectrogram"])) / np.sqrt(text_dim)

  split_index = {"train": 1, "validation": 2, "test": 3}.get(split, 4 + sum(map(ord, split)))
  rng = np.random.default_rng([seed, split_index])
  category = rng.integers(0, len(SYNTHETIC_CATEGORIES), num_examples)
  language = rng.integers(0, len(SYNTHETIC_LANGUAGES), num_examples)
  text = 0.8 * centres[category] + rng.standard_normal((num_examples, text_dim))
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  scaled_text = text * np.sqrt(text_dim)  # unit-variance coordinates before the maps.
  speech = np.tanh(scaled_text @ speech_map)  # (N, t) @ (t, s) -> (N, s)
  spectrogram = np.maximum(scaled_text @ spectrogram_map, 0.0)  # (N, t) @ (t, p) -> (N, p)
  speech += noise * rng.standard_normal(speech.shape)
  spectrogram += noise * rng.standard_normal(spectrogram.shape)
  arrays = {
      "speech": speech.astype(np.float32),
      "spectrogram": spectrogram.astype(np.float32),
      "text": text.astype(np.float32),
      "category": category.astype(np.int32),
      "language": language.astype(np.int32),
  }
  return FeatureSplit(arrays, list(SYNTHETIC_CATEGORIES), list(SYNTHETIC_LANGUAGES),
                      source="synthetic_features")


def load_split(data_config, split: str) -> FeatureSplit:
  """The split that `config.data` describes: 'synthetic_features' or a 'features' folder."""
  if data_config.kind == "synthetic_features":
    sizes = {"train": data_config.num_train, "validation": data_config.num_validation,
             "test": data_config.num_test}
    if split not in sizes:
      raise ValueError(f"synthetic_features has splits {sorted(sizes)}, not {split!r}")
    return synthetic_feature_split(split, num_examples=sizes[split], dims=dict(data_config.dims),
                                   noise=data_config.noise, seed=data_config.seed)
  if data_config.kind == "features":
    if not data_config.directory:
      raise ValueError("config.data.directory must name the feature folder for kind 'features'")
    return read_feature_split(os.path.join(data_config.directory, split))
  raise ValueError(f"config.data.kind must be 'synthetic_features' or 'features', "
                   f"got {data_config.kind!r}")
