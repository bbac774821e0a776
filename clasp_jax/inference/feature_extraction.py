"""Feature splits from built speech-text datasets: the precomputed inputs of feature-mode training.

The library half of `python -m clasp_jax.extract`. Each usable clip of a split gives one row of
every field of a feature split (`clasp_jax/data/features.py`), in stored order:

  speech       the HuBERT / wav2vec2 checkpoint's hidden states at `layer` (default: the last
               hidden state, as the paper) mean-pooled over the clip's frames
  spectrogram  the spectrogram front-end + CNN of a trained audio-mode workdir, as that
               workdir computes it; (N, 0) without one (only config.model.mode=speech can
               train on such a split: the trainer says so for the other modes)
  text         the sentence encoder's embedding of the clip's sentence
  category, language, sentences.json, and info.json with an "extraction" record (encoders,
  settings, the bad clips skipped)

Both speech branches run in one jitted function (`SpeechFeatures`), the same tower code as an
audio-mode model (`models/speech_tower.py`), on batches of clips of similar length padded to a
whole second (`speech_batching.pad_batch`) and split over this process's devices; a padded clip
gives the rows of the clip alone.

Work is cut into chunks of `chunk_size` examples in stored order; process p of P computes chunks
p, p + P, ... and saves each, when finished, by an atomic rename into OUTPUT/.SPLIT.partial/,
beside the settings of the run (plan.json). A restarted run with the same settings skips the
saved chunks and recomputes the others with the same batches, so the result equals an
uninterrupted run's to the bit. Once every chunk is saved, process 0 writes OUTPUT/SPLIT/ beside
its final place, renames it there, and removes the partial folder.

Bad clips follow the data policy (`data/bad_input.py`): a clip shorter than the speech
encoder's receptive field (no frame to pool) or silent (peak at or below
`AudioLimits.silence_peak`; datasets built with looser limits hold such clips) is skipped and
counted, or stops the run under `strict`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from clasp_jax.common.mesh import DATA_AXIS, data_mesh
from clasp_jax.data import audio_io, bad_input, features, pipeline, text_prep
from clasp_jax.data.tfds_builder import INT16_SCALE
from clasp_jax.inference import speech
from clasp_jax.inference.speech_batching import PAD_MULTIPLE_SECONDS, pad_batch
from clasp_jax.models import compilation
from clasp_jax.models import speech_tower
from clasp_jax.models import text_tower as text_tower_lib
from clasp_jax.models import wav2vec2
from clasp_jax.models import wav2vec2_checkpoint

TOO_SHORT = "too_short"
PLAN_FILE = "plan.json"
# Fields of a saved chunk besides the feature rows: kept examples and the bad clips skipped.
_LABELS = ("sentence", "category", "language", "source")


class BadClipError(bad_input.BadInputError):
  """A clip of a built dataset that yields no usable features; `kind` says why."""

  KINDS = (TOO_SHORT, bad_input.SILENT)


class PlanMismatchError(ValueError):
  """An unfinished extraction in the output folder was made with other settings."""


# ------------------------------------------------------------------------ Speech features.

@dataclasses.dataclass
class SpectrogramEncoder:
  """The spectrogram branch (front-end + CNN) of a trained audio-mode workdir."""

  settings: speech_tower.Settings
  variables: dict[str, Any]  # {"params": {"spectrogram_encoder": ...}, "batch_stats": {...}}
  peak_normalize: bool  # as the workdir's input pipeline fed it
  workdir: str
  step: int

  @property
  def output_dim(self) -> int:
    return self.settings.spectrogram.output_dim


def load_spectrogram_encoder(workdir: str, checkpoint: int | str = "best") -> SpectrogramEncoder:
  """The spectrogram encoder of `workdir` at `checkpoint`, with its BatchNorm statistics."""
  from clasp_jax.inference import workdir as workdir_lib  # The whole model: only needed here.
  trained = workdir_lib.load_trained(workdir, checkpoint=checkpoint)
  model = trained.built.model
  if model.speech_kind != "audio" or model.mode == "speech":
    raise ValueError(f"{workdir} has no spectrogram encoder: it trained a "
                     f"{model.speech_kind}-mode model in fusion mode {model.mode!r}; give the "
                     "workdir of an audio-mode run (speech=audio) with mode joint or spectrogram")
  variables = jax.device_get(trained.variables)
  name = "spectrogram_encoder"
  return SpectrogramEncoder(
      settings=model.speech_tower or speech_tower.Settings(),
      variables={"params": {name: variables["params"][name]},
                 "batch_stats": {name: variables["batch_stats"].get(name, {})}},
      peak_normalize=pipeline.pipeline_config(trained.config, train=False).peak_normalize,
      workdir=workdir, step=trained.step)


def peak_divisor(clip: np.ndarray, source_peak: float | None) -> np.float32:
  """What `audio_io.peak_normalize(clip, source_peak=...)` divides `clip` by."""
  peak = audio_io.peak(clip) if source_peak is None else float(source_peak)
  return np.float32(max(peak, 1e-6))


class SpeechFeatures:
  """(16 kHz clips, their source peaks) -> {'speech': (n, ssl_dim), 'spectrogram': (n, p)}.

  The SSL encoder reads each clip divided by its peak when `peak_normalize` (as CLASP did),
  then standardised when its preprocessor config says `do_normalize`; the spectrogram encoder
  reads it as its workdir's input pipeline fed it. Rows come back in input order; clips are
  sorted by length into batches of `batch_size` rows (rounded up to whole devices).
  """

  def __init__(self, checkpoint: wav2vec2_checkpoint.SpeechCheckpoint, *, layer: int | None,
               spectrogram: SpectrogramEncoder | None, peak_normalize: bool = True,
               batch_size: int = 16, devices: Sequence[jax.Device] | None = None,
               dtype: Any = jnp.float32, precision: str = "highest"):
    speech.check_layer(checkpoint.config, layer)
    if checkpoint.preprocessing.sampling_rate != speech_tower.SAMPLE_RATE:
      raise ValueError(f"{checkpoint.path} expects {checkpoint.preprocessing.sampling_rate} Hz "
                       f"audio; built datasets hold {speech_tower.SAMPLE_RATE} Hz")
    num_states = checkpoint.config.num_hidden_layers + 1
    # The tower pools hidden_states[k] for k >= 0; --layer counts from the end when negative.
    settings = speech_tower.Settings(
        ssl=dataclasses.replace(checkpoint.config, ctc_vocab_size=None),
        layer=None if layer is None else layer % num_states,
        normalize_audio=checkpoint.preprocessing.do_normalize)
    towers = {"speech": speech_tower.AudioSpeechTower(settings, mode="speech",
                                                      precision=precision, dtype=dtype)}
    # A *ForCTC checkpoint's head is no part of the features.
    variables = {"speech": {"params": {"ssl_encoder": {
        name: value for name, value in checkpoint.params.items() if name != "lm_head"}}}}
    if spectrogram is not None:
      towers["spectrogram"] = speech_tower.AudioSpeechTower(
          spectrogram.settings, mode="spectrogram", precision=precision, dtype=dtype)
      variables["spectrogram"] = spectrogram.variables
    self.peak_normalize = {"speech": peak_normalize,
                           "spectrogram": spectrogram is not None and spectrogram.peak_normalize}
    self.dims = {"speech": checkpoint.config.hidden_size,
                 "spectrogram": spectrogram.output_dim if spectrogram is not None else 0}
    self.min_samples = wav2vec2.receptive_field(checkpoint.config)
    self.pad_multiple = max(self.min_samples,
                            int(PAD_MULTIPLE_SECONDS * speech_tower.SAMPLE_RATE))
    mesh = data_mesh(jax.local_devices() if devices is None else devices)
    self.mesh = mesh
    self.rows = -(-batch_size // mesh.size) * mesh.size
    self._by_row = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    self._variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))

    def forward(variables, audio, lengths, divisors):
      mask = wav2vec2.lengths_to_mask(lengths, audio.shape[1])
      return {name: tower.apply(variables[name], audio / divisors[name][:, None],
                                mask)[name].astype(jnp.float32)
              for name, tower in towers.items()}

    self._forward = compilation.jit_transformer_inference(forward)

  def __call__(self, clips: Sequence[np.ndarray], source_peaks: Sequence[float | None], *,
               progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Feature rows of `clips` in input order; `progress(n)` hears of each batch of n done."""
    outputs = {name: np.zeros((len(clips), dim), np.float32) for name, dim in self.dims.items()}
    order = np.argsort([len(clip) for clip in clips], kind="stable")
    in_flight: collections.deque = collections.deque()

    def collect():
      indices, result = in_flight.popleft()
      for name, rows in result.items():
        outputs[name][indices] = np.asarray(rows)[:len(indices)]
      if progress is not None:
        progress(len(indices))

    for start in range(0, len(order), self.rows):
      indices = order[start:start + self.rows]
      audio, lengths = pad_batch([clips[i] for i in indices], self.rows, self.pad_multiple)
      divisors = {}
      for name, normalize in self.peak_normalize.items():
        divisors[name] = np.ones((self.rows,), np.float32)  # Filler rows divide by 1.
        if normalize:
          divisors[name][:len(indices)] = [peak_divisor(clips[i], source_peaks[i])
                                           for i in indices]
      batch = jax.device_put((audio, lengths, divisors), self._by_row)
      # Dispatch is asynchronous: the next batch is padded while this one runs.
      in_flight.append((indices, self._forward(self._variables, *batch)))
      if len(in_flight) > 2:
        collect()
    while in_flight:
      collect()
    return outputs


# ------------------------------------------------------------------------ One chunk.

@dataclasses.dataclass
class ChunkExtractor:
  """Reads a chunk of a split and computes its rows; bad clips go to `policy`."""

  split: Any  # reader.SpeechTextSplit or ConcatenatedSplit
  split_name: str
  speech_features: SpeechFeatures
  text_tower: text_tower_lib.TextTower
  policy: bad_input.BadInputPolicy
  text_preparation: str = "paper"
  text_batch_size: int = 64
  limits: bad_input.AudioLimits = bad_input.AudioLimits()

  def bad_clip(self, clip: np.ndarray, where: str) -> BadClipError | None:
    if clip.shape[0] < self.speech_features.min_samples:
      return BadClipError(where, TOO_SHORT, f"{clip.shape[0]} samples; the speech encoder "
                          f"needs at least {self.speech_features.min_samples}")
    peak = audio_io.peak(clip)
    if peak <= self.limits.silence_peak:
      return BadClipError(where, bad_input.SILENT,
                          f"peak {peak:.2e} <= {self.limits.silence_peak:.0e}")
    return None

  def __call__(self, indices: np.ndarray,
               progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """The chunk's arrays: kept `index` and their rows and labels, `skipped_index` and
    `skipped_kind`. Raises BadClipError at the first bad clip under a strict policy."""
    kept, clips, peaks, labels = [], [], [], {field: [] for field in _LABELS}
    skipped, kinds = [], []
    for index, record in zip(indices, self.split.read(indices)):
      clip = np.asarray(record["audio"], np.float32) / INT16_SCALE
      error = self.bad_clip(clip, f"{self.split_name} example {index} (id {record['id']})")
      if error is not None:
        self.policy.reject(error)
        skipped.append(index)
        kinds.append(error.kind)
        continue
      kept.append(index)
      clips.append(clip)
      peaks.append(record.get("source_peak"))
      labels["sentence"].append(record["text"])
      for field in ("category", "language", "source"):
        labels[field].append(record[field])
    if progress is not None and skipped:
      progress(len(skipped))
    arrays = self.speech_features(clips, peaks, progress=progress)
    sentences = text_prep.prepare_by_source(labels["sentence"], labels["source"],
                                            self.text_preparation)
    arrays["text"] = self.text_tower.embed(sentences, batch_size=self.text_batch_size,
                                           mesh=self.speech_features.mesh)
    arrays.update({field: np.asarray(values, dtype=str) for field, values in labels.items()})
    arrays.update(index=np.asarray(kept, np.int64), skipped_index=np.asarray(skipped, np.int64),
                  skipped_kind=np.asarray(kinds, dtype=str))
    return arrays


# ------------------------------------------------------------------------ Chunks on disk.

@dataclasses.dataclass
class ChunkedJob:
  """The chunks of one split's extraction and where they are saved.

  `plan` holds every setting that shapes the result; a saved chunk is only reused by a run
  with the same plan.
  """

  output: str  # the feature folder; the split lands in output/split_name
  split_name: str
  num_examples: int
  chunk_size: int
  plan: dict[str, Any]

  @property
  def final_dir(self) -> str:
    return os.path.join(self.output, self.split_name)

  @property
  def partial_dir(self) -> str:
    return os.path.join(self.output, f".{self.split_name}.partial")

  @property
  def num_chunks(self) -> int:
    return -(-self.num_examples // self.chunk_size)

  def chunk_indices(self, chunk: int) -> np.ndarray:
    return np.arange(chunk * self.chunk_size,
                     min((chunk + 1) * self.chunk_size, self.num_examples), dtype=np.int64)

  def chunk_path(self, chunk: int) -> str:
    return os.path.join(self.partial_dir, f"chunk-{chunk:06d}.npz")

  def is_saved(self, chunk: int) -> bool:
    return os.path.exists(self.chunk_path(chunk))

  def start(self) -> None:
    """Makes the partial folder with the plan, or checks the plan of the one found there."""
    if os.path.exists(os.path.join(self.final_dir, "info.json")):
      raise FileExistsError(f"{self.final_dir} already holds an extracted split; delete it to "
                            "extract again")
    os.makedirs(self.partial_dir, exist_ok=True)
    plan_path = os.path.join(self.partial_dir, PLAN_FILE)
    if os.path.exists(plan_path):
      with open(plan_path, encoding="utf-8") as f:
        found = json.load(f)
      differences = sorted(key for key in set(found) | set(self.plan)
                           if found.get(key) != self.plan.get(key))
      if differences:
        raise PlanMismatchError(
            f"{self.partial_dir} holds an unfinished extraction with other settings "
            f"({', '.join(f'{key}: {found.get(key)!r} there, {self.plan.get(key)!r} now' for key in differences)}); "
            "rerun with its settings to resume, or delete the folder to start over")
      return
    _atomic_write(plan_path, lambda f: f.write(json.dumps(self.plan, indent=2).encode()))

  def chunks_of(self, process_index: int, process_count: int) -> list[int]:
    return list(range(process_index, self.num_chunks, process_count))

  def save(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
    _atomic_write(self.chunk_path(chunk), lambda f: np.savez(f, **arrays))

  def load(self, chunk: int) -> dict[str, np.ndarray]:
    with np.load(self.chunk_path(chunk), allow_pickle=False) as saved:
      return {name: saved[name] for name in saved.files}


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
  """Writes `path` through a temporary file and a rename: a killed run leaves no partial file
  under the final name (a stray temporary is overwritten by the next attempt)."""
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, path)


def run_chunks(job: ChunkedJob, extract: Callable[..., dict[str, np.ndarray]], *,
               process_index: int = 0, process_count: int = 1,
               log: Callable[[str], None] = lambda line: None,
               progress: Callable[[int, int], None] | None = None) -> int:
  """Computes and saves this process's chunks that are not saved yet; returns how many.

  `extract(indices, progress=advance)` computes one chunk; `progress(done, total)` follows the
  clips of the chunks this run computes.
  """
  mine = job.chunks_of(process_index, process_count)
  pending = [chunk for chunk in mine if not job.is_saved(chunk)]
  if len(pending) < len(mine):
    log(f"resuming: {len(mine) - len(pending)} of the {len(mine)} chunks of this process are "
        f"already extracted, {len(pending)} to go")
  total = sum(len(job.chunk_indices(chunk)) for chunk in pending)
  done = 0

  def advance(count: int) -> None:
    nonlocal done
    done += count
    if progress is not None:
      progress(done, total)

  for chunk in pending:
    job.save(chunk, extract(job.chunk_indices(chunk), progress=advance))
  return len(pending)


def assemble(job: ChunkedJob, extraction: dict[str, Any]) -> dict[str, Any]:
  """Writes the feature split from the saved chunks (all of them must be there), removes the
  partial folder, and returns the info.json record of the extraction (with the skips)."""
  missing = [chunk for chunk in range(job.num_chunks) if not job.is_saved(chunk)]
  if missing:
    raise FileNotFoundError(f"{job.partial_dir}: chunks {missing} are not extracted yet")
  chunks = [job.load(chunk) for chunk in range(job.num_chunks)]
  joined = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}
  if not len(joined["index"]):
    raise ValueError(f"none of the {job.num_examples} clips of {job.split_name} is usable; "
                     "see the skipped clips above")
  categories = sorted(set(joined["category"].tolist()))
  languages = sorted(set(joined["language"].tolist()))
  sources = sorted(set(joined["source"].tolist()))
  arrays = {name: joined[name] for name in features.FEATURE_FIELDS}
  arrays["category"] = np.searchsorted(categories, joined["category"]).astype(np.int32)
  arrays["language"] = np.searchsorted(languages, joined["language"]).astype(np.int32)
  # A feature split has one source; a concatenation of several keeps them in the record.
  split = features.FeatureSplit(arrays, categories, languages,
                                source=sources[0] if len(sources) == 1 else "",
                                sentences=joined["sentence"].tolist())
  skipped = collections.Counter(joined["skipped_kind"].tolist())
  record = dict(extraction, sources=sources, num_examples_read=job.num_examples,
                skipped={kind: int(skipped[kind]) for kind in BadClipError.KINDS},
                skipped_examples=joined["skipped_index"].tolist())
  assembling = os.path.join(job.output, f".{job.split_name}.assembling")
  shutil.rmtree(assembling, ignore_errors=True)  # What a run killed while assembling left.
  features.write_feature_split(assembling, split)
  info_path = os.path.join(assembling, "info.json")
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  info["extraction"] = record
  with open(info_path, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2, ensure_ascii=False)
  os.replace(assembling, job.final_dir)
  shutil.rmtree(job.partial_dir)
  return record
