"""A trained workdir as a model: its config, its chosen checkpoint, and embedding with it.

  trained = load_trained(WORKDIR, checkpoint="best")
  embeddings = trained.embed_split("test")          # what the evaluators score

The model is rebuilt from the workdir's config by the same code as in training
(`models.clasp.build`), the split is read by the same input pipeline, and the variables come
from the checkpoint (`best` by default: the step that scored best on the early-stopping metric,
or the newest when no evaluation ran).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.common import workdir as workdir_files
from clasp_jax.common.mesh import data_mesh
from clasp_jax.data import audio_io, pipeline
from clasp_jax.data.tfds_builder import INT16_SCALE
from clasp_jax.inference import split_embedding
from clasp_jax.models import clasp
from clasp_jax.trainer import steps
from clasp_jax.trainer.checkpointing import Checkpointer


@dataclasses.dataclass
class TrainedModel:
  """A rebuilt model with the variables of one checkpoint, replicated over `mesh`."""

  workdir: str
  config: ml_collections.ConfigDict
  built: clasp.BuiltModel
  variables: dict[str, Any]
  step: int
  mesh: Mesh

  @functools.cached_property
  def predict_fn(self):
    """(variables, global batch) -> (zspeech, ztext), sharded over the mesh like in training."""
    return steps.shard_over_mesh(functools.partial(steps.embed_step, model=self.built.model),
                                 self.mesh, batch_out=True)

  # -------------------------------------------------------------- New audio and sentences.

  @property
  def speech_kind(self) -> str:
    return self.built.model.speech_kind

  def prepare_waveform(self, waveform: np.ndarray) -> np.ndarray:
    """A 16 kHz mono clip as the training pipeline feeds it: stored at 16-bit precision (as
    datasets are), cropped to config.data.max_duration_s, peak-normalised if configured."""
    options = pipeline.pipeline_config(self.config, train=False)
    clip = np.asarray(waveform, np.float32)
    clip = np.clip(np.round(clip * INT16_SCALE), -32768, 32767) / INT16_SCALE
    clip = clip[:int(round(options.max_duration_s * audio_io.TARGET_SAMPLE_RATE))]
    if options.peak_normalize:
      clip = audio_io.peak_normalize(clip)
    return clip.astype(np.float32)

  def _sharded(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return jax.device_put(arrays, NamedSharding(self.mesh, P(steps.AXIS)))

  def _rows(self, batch_size: int) -> int:
    return -(-batch_size // self.mesh.size) * self.mesh.size

  @functools.cached_property
  def _embed_speech_fn(self):
    model = self.built.model
    return jax.jit(lambda variables, batch: model.apply(variables, batch,
                                                        method=type(model).embed_speech))

  @functools.cached_property
  def _embed_text_fn(self):
    model = self.built.model
    return jax.jit(lambda variables, batch: model.apply(variables, batch,
                                                        method=type(model).embed_text))

  def embed_waveforms(self, waveforms: Sequence[np.ndarray], *, batch_size: int = 16,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(n, embed_dim) normalised speech embeddings of 16 kHz mono clips (audio-mode models)."""
    if self.speech_kind != "audio":
      raise ValueError(f"{self.workdir} trained a feature-mode model: it embeds precomputed "
                       "speech features, not audio (use embed_features)")
    rows = self._rows(batch_size)
    pad_multiple = audio_io.TARGET_SAMPLE_RATE  # One compiled length per second of audio.
    outputs = []
    for start in range(0, len(waveforms), rows):
      clips = [self.prepare_waveform(w) for w in waveforms[start:start + rows]]
      longest = max(max(len(clip) for clip in clips), 1)
      length = -(-longest // pad_multiple) * pad_multiple
      audio = np.zeros((rows, length), np.float32)
      mask = np.zeros((rows, length), bool)
      for row, clip in enumerate(clips):
        audio[row, :len(clip)], mask[row, :len(clip)] = clip, True
      embedded = self._embed_speech_fn(self.variables,
                                       self._sharded({"audio": audio, "audio_mask": mask}))
      outputs.append(np.asarray(embedded)[:len(clips)])
      if progress is not None:
        progress(min(start + rows, len(waveforms)))
    return np.concatenate(outputs) if outputs else np.zeros((0, self.built.embed_dim), np.float32)

  @functools.cached_property
  def _fusion_fn(self):
    model = self.built.model
    return jax.jit(lambda variables, speech, spectrogram: model.apply(
        variables, speech, spectrogram,
        method=lambda module, s, p: module.speech_encoder(s, p, train=False)))

  def embed_features(self, speech: np.ndarray | None = None,
                     spectrogram: np.ndarray | None = None, *,
                     normalize: bool = True) -> np.ndarray:
    """Speech embeddings of precomputed feature vectors (feature-mode models): normalised, or
    with `normalize=False` the fusion encoder's raw output (what a PyTorch port must match)."""
    if self.speech_kind != "features":
      raise ValueError(f"{self.workdir} trained an audio-mode model: give it audio")
    batch = {name: np.asarray(value, np.float32) for name, value in
             (("speech", speech), ("spectrogram", spectrogram)) if value is not None}
    if not normalize:
      return np.asarray(self._fusion_fn(self.variables, batch.get("speech"),
                                        batch.get("spectrogram")))
    return np.asarray(self._embed_speech_fn(self.variables, batch))

  def embed_texts(self, sentences: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """(n, embed_dim) normalised text embeddings from the model's own text tower."""
    if self.built.text_encoder is None:
      raise ValueError(f"{self.workdir} has no text tower: its text embeddings were "
                       "precomputed in the data; embed sentences with that sentence encoder")
    rows = self._rows(batch_size)
    outputs = []
    for start in range(0, len(sentences), rows):
      chunk = list(sentences[start:start + rows])
      tokens = self.built.text_encoder(chunk + [""] * (rows - len(chunk)))
      embedded = self._embed_text_fn(self.variables, self._sharded(tokens))
      outputs.append(np.asarray(embedded)[:len(chunk)])
    return np.concatenate(outputs) if outputs else np.zeros((0, self.built.embed_dim), np.float32)

  # -------------------------------------------------------------- Splits of the config's data.

  def embed_split(self, split: str, *, batch_size: int = 0) -> dict[str, np.ndarray]:
    """Every example of `split` of the config's data, embedded as the evaluators embed it."""
    config = self.config.copy_and_resolve_references()
    batch_size = batch_size or config.eval_batch_size
    config.eval_batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
    split_pipeline = pipeline.for_split(config, split, mesh=self.mesh, train=False,
                                        text_encoder=self.built.text_encoder)
    return split_embedding.embed_split(self.predict_fn, _VariablesState(self.variables),
                                       split_pipeline)


@dataclasses.dataclass
class _VariablesState:
  """What `steps.embed_step` reads of a train state."""

  variables: dict[str, Any]

  @property
  def params(self):
    return self.variables["params"]

  @property
  def batch_stats(self):
    return self.variables["batch_stats"]


jax.tree_util.register_pytree_node(
    _VariablesState, lambda state: ((state.variables,), None),
    lambda _, children: _VariablesState(children[0]))


def load_trained(workdir: str, *, checkpoint: int | str = "best",
                 features_dir: str = "") -> TrainedModel:
  """Rebuilds the model of `workdir` with the variables of `checkpoint` ('best', 'latest', or a
  step). `features_dir` points a feature-mode config at another feature folder."""
  config = workdir_files.read_config(workdir)
  if features_dir:
    config.data.kind, config.data.directory = "features", features_dir
  mesh = data_mesh()
  built = clasp.build(config)
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    state, record = checkpointer.read(checkpoint)
  finally:
    checkpointer.close()
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  return TrainedModel(workdir=workdir, config=config, built=built, variables=variables,
                      step=int(record["step"]), mesh=mesh)


def embed_workdir_split(workdir: str, split_name: str, *, batch_size: int = 0,
                        features_dir: str = "", checkpoint: int | str = "best"
                        ) -> tuple[dict[str, np.ndarray], int]:
  """Embeds a split with a checkpoint of a training workdir; returns (embeddings, step)."""
  trained = load_trained(workdir, checkpoint=checkpoint, features_dir=features_dir)
  return trained.embed_split(split_name, batch_size=batch_size), trained.step
