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
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.common import cli
from clasp_jax.common import workdir as workdir_files
from clasp_jax.common.mesh import data_mesh
from clasp_jax.data import audio_io, features, pipeline
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

  @functools.cached_property
  def _towers_fn(self):
    model = self.built.model

    def towers(variables, batch):
      out = model.apply(variables, batch["audio"], batch["audio_mask"],
                        method=lambda module, audio, mask: module.audio_tower(audio, mask))
      speech = out["speech"]
      return speech, out.get("spectrogram", jnp.zeros((speech.shape[0], 0), speech.dtype))

    return jax.jit(towers)

  def tower_features(self, split: str, *, batch_size: int = 0) -> features.FeatureSplit:
    """`split` as a feature split (clasp_jax/data/features.py): per clip, the vectors the
    audio towers hand the fusion encoder ('speech': the pooled SSL frames, 'spectrogram': the
    CNN's output, (N, 0) without that branch) and the text vector the model is trained
    against; so the fusion encoder can train in feature mode over these (frozen) towers, as
    the paper trained it over precomputed features. In stored order, with a progress line;
    one process."""
    if self.speech_kind != "audio":
      raise ValueError(f"{self.workdir} is a feature-mode model: it has no audio towers")
    config = self.config.copy_and_resolve_references()
    batch_size = batch_size or config.eval_batch_size
    config.eval_batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
    split_pipeline = pipeline.for_split(config, split, mesh=self.mesh, train=False,
                                        text_encoder=self.built.text_encoder)
    fields = {"speech": [], "spectrogram": [], "text": [], "order": []}
    hosts = {"category": [], "language": [], "text": [], "source": []}
    progress = cli.Progress(len(split_pipeline.source), f"{split} clips",
                            verb="through the towers:")
    for batch in split_pipeline.iterate():
      speech, spectrogram, text, valid, order = jax.device_get(
          self._towers_fn(self.variables, batch.arrays) + (
              batch.arrays["text"], batch.arrays["valid"], batch.arrays["example_index"]))
      valid = np.asarray(valid).astype(bool)
      for name, values in (("speech", speech), ("spectrogram", spectrogram), ("text", text),
                           ("order", order)):
        fields[name].append(np.asarray(values)[valid])
      for name in hosts:
        hosts[name].extend(np.asarray(batch.host[name])[valid].astype(str).tolist())
      progress.update(len(hosts["text"]))
    stored = np.argsort(np.concatenate(fields.pop("order")), kind="stable")
    arrays = {name: np.concatenate(values)[stored].astype(np.float32)
              for name, values in fields.items()}
    hosts = {name: [values[i] for i in stored] for name, values in hosts.items()}
    labels = {}
    for name in ("category", "language"):
      labels[name] = sorted(set(hosts[name]))
      arrays[name] = np.searchsorted(labels[name], hosts[name]).astype(np.int32)
    sources = sorted(set(hosts["source"]))
    return features.FeatureSplit(arrays=arrays, categories=labels["category"],
                                 languages=labels["language"],
                                 source=sources[0] if len(sources) == 1 else "",
                                 sentences=hosts["text"])

  # -------------------------------------------------------------- The auxiliary CTC head.

  @property
  def ctc_vocabulary(self) -> str:
    """The characters of the model's CTC head ('' when it has none)."""
    return str(self.config.model.speech.get("ctc_vocabulary", "") or "")

  @functools.cached_property
  def _ctc_ids_fn(self):
    model = self.built.model

    def greedy(variables, batch):
      _, _, out = model.apply(variables, batch, train=False)
      return jnp.argmax(out["ctc/logits"], axis=-1), out["ssl/frame_mask"]

    return jax.jit(greedy)

  def transcribe_split(self, split: str, *, batch_size: int = 0
                       ) -> tuple[list[str], list[str]]:
    """(greedy CTC transcripts, reference sentences) of every clip of `split`, in the
    evaluators' order (one process)."""
    vocabulary = self.ctc_vocabulary
    if not vocabulary:
      raise ValueError(f"{self.workdir} trained no CTC head (config.model.speech.ctc_vocabulary)")
    tokens = clasp.ctc_tokens(vocabulary)
    config = self.config.copy_and_resolve_references()
    batch_size = batch_size or config.eval_batch_size
    config.eval_batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
    split_pipeline = pipeline.for_split(config, split, mesh=self.mesh, train=False,
                                        text_encoder=self.built.text_encoder)
    transcripts, references, order = [], [], []
    for batch in split_pipeline.iterate():
      ids, frame_mask = jax.device_get(self._ctc_ids_fn(self.variables, batch.arrays))
      valid = np.asarray(jax.device_get(batch.arrays["valid"]))
      order.extend(np.asarray(jax.device_get(batch.arrays["example_index"]))[valid.astype(bool)])
      for row in np.flatnonzero(valid):
        frames = ids[row][frame_mask[row].astype(bool)]
        # Greedy CTC: merge repeats, then drop blanks (id 0).
        merged = [int(t) for i, t in enumerate(frames) if i == 0 or t != frames[i - 1]]
        transcripts.append(" ".join("".join(tokens[t] for t in merged if t).split()))
        references.append(str(batch.host["text"][row]))
    stored = np.argsort(order, kind="stable")  # Stored order, as embed_split returns rows.
    return [transcripts[i] for i in stored], [references[i] for i in stored]


def character_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Character edits (insertions, deletions, substitutions) over reference characters."""
  edits = total = 0
  for hypothesis, reference in zip(hypotheses, references):
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, start=1):
      current = [i] + [0] * len(hypothesis)
      for j, h in enumerate(hypothesis, start=1):
        current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
      previous = current
    edits += previous[-1]
    total += len(reference)
  return edits / max(total, 1)


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
