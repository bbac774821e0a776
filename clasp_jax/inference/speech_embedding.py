"""`python -m clasp_jax.embed speech`: mean-pooled HuBERT / wav2vec2 embeddings of audio files.

  python -m clasp_jax.embed speech --encoder=HF_DIR --input=PATH --output=OUT.npy

PATH is a folder (its audio files, recursively, sorted by path) or a text file with one
audio path per line (relative paths are taken from the list file's folder; blank lines and
lines starting with '#' are ignored). OUT.npy holds one float32 row per embedded file in
input order; OUT.paths.txt beside it names the file of each row. Each clip is decoded to
mono at the checkpoint's sampling rate, peak-normalised as in CLASP (silent clips stay
silent instead of dividing by zero), then preprocessed as its preprocessor_config.json says
(zero-mean unit-variance when `do_normalize`). The embedding is the mean over valid frames
of the last hidden state, or of `hidden_states[--layer]`.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import dataclasses
import os
import sys
import time
from typing import Callable, Iterable, Iterator, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.data import audio_io
from clasp_jax.models import compilation
from clasp_jax.models import precision
from clasp_jax.models import wav2vec2_checkpoint
from clasp_jax.models import wav2vec2

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc",
                    ".au", ".snd", ".w64", ".caf", ".rf64")
# Batches are padded up to a multiple of this many seconds so that jit compiles a handful
# of shapes, not one per clip length.
PAD_MULTIPLE_SECONDS = 1.0


class InputListError(ValueError):
  """--input names nothing usable (missing path, empty folder or list)."""


class ClipTooShortError(Exception):
  """A clip shorter than the encoder's receptive field, which yields no frame at all."""

  def __init__(self, path: str, samples: int, needed: int, sample_rate: int):
    self.path = path
    super().__init__(f"{path}: too short ({samples} samples; the encoder needs at least {needed}, "
                     f"{1000 * needed / sample_rate:.0f} ms at {sample_rate} Hz)")


def list_audio_inputs(input_path: str | os.PathLike) -> list[str]:
  """Audio paths named by --input: a folder's audio files, or the lines of a list file."""
  input_path = os.fspath(input_path)
  if os.path.isdir(input_path):
    paths = []
    for root, folders, files in os.walk(input_path):
      folders.sort()
      paths.extend(os.path.join(root, name) for name in files
                   if name.lower().endswith(AUDIO_EXTENSIONS))
    paths.sort()
    if not paths:
      raise InputListError(
          f"{input_path}: folder holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return paths
  if not os.path.exists(input_path):
    raise InputListError(f"{input_path}: no such file or folder")
  base = os.path.dirname(os.path.abspath(input_path))
  paths = []
  with open(input_path, encoding="utf-8") as list_file:
    for line in list_file:
      line = line.strip()
      if line and not line.startswith("#"):
        paths.append(line if os.path.isabs(line) else os.path.join(base, line))
  if not paths:
    raise InputListError(f"{input_path}: list file names no audio paths")
  return paths


@dataclasses.dataclass
class ReadFailure:
  path: str
  message: str


def read_clips(paths: Iterable[str], sample_rate: int, min_samples: int,
               prepare: Callable[[np.ndarray], np.ndarray]
               ) -> Iterator[tuple[str, np.ndarray | ReadFailure]]:
  """Yields (path, prepared waveform) or (path, ReadFailure) in order, never raising per file."""
  for path in paths:
    try:
      waveform, _, _ = audio_io.read_audio(path, sample_rate)
      if waveform.shape[0] < min_samples:
        raise ClipTooShortError(path, waveform.shape[0], min_samples, sample_rate)
      yield path, prepare(waveform)
    except (audio_io.AudioReadError, ClipTooShortError) as error:
      yield path, ReadFailure(path, str(error))


def pad_batch(waveforms: Sequence[np.ndarray], batch_size: int, pad_multiple: int):
  """Right-pads clips into (batch_size, length) with length a multiple of `pad_multiple`.

  Missing rows (a short last batch) are zero-length, so every batch has one shape per length
  bucket and jit never recompiles for the tail.
  """
  longest = max(waveform.shape[0] for waveform in waveforms)
  length = -(-longest // pad_multiple) * pad_multiple
  batch = np.zeros((batch_size, length), np.float32)
  lengths = np.zeros((batch_size,), np.int32)
  for row, waveform in enumerate(waveforms):
    batch[row, :waveform.shape[0]] = waveform
    lengths[row] = waveform.shape[0]
  return batch, lengths


class Progress:
  """A progress line on stderr at most every `interval` seconds."""

  def __init__(self, total: int, verb: str, interval: float = 5.0, stream=None):
    self.total, self.verb, self.interval = total, verb, interval
    self.stream = sys.stderr if stream is None else stream
    self.start = self.last = time.monotonic()

  def update(self, done: int, force: bool = False):
    now = time.monotonic()
    if force or now - self.last >= self.interval:
      rate = done / max(now - self.start, 1e-9)
      print(f"{self.verb} {done}/{self.total} files ({rate:.1f} files/s)", file=self.stream,
            flush=True)
      self.last = now


@dataclasses.dataclass
class BatchRunResult:
  """Outputs per good file in input order, and the failures met."""

  paths: list[str]
  outputs: list
  failures: list[ReadFailure]


def run_batches(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint, paths: Sequence[str],
                forward: Callable[[np.ndarray, np.ndarray], list], *, batch_size: int,
                skip_bad: bool, peak_normalize: bool, verb: str,
                progress_stream=None) -> BatchRunResult:
  """Reads, batches and runs `forward(batch, lengths) -> per-row outputs` over all paths.

  Without `skip_bad` the model stops at the first bad file, but the remaining files are
  still read so that every bad file is reported at once.
  """
  preprocessing = checkpoint.preprocessing

  def prepare(waveform):
    if peak_normalize:
      waveform = audio_io.peak_normalize(waveform)
    return preprocessing.apply(waveform)

  min_samples = wav2vec2.receptive_field(checkpoint.config)
  pad_multiple = max(min_samples, int(PAD_MULTIPLE_SECONDS * preprocessing.sampling_rate))
  result = BatchRunResult([], [], [])
  pending_paths, pending_clips = [], []
  progress = Progress(len(paths), verb, stream=progress_stream)

  def flush():
    if pending_clips and (skip_bad or not result.failures):
      batch, lengths = pad_batch(pending_clips, batch_size, pad_multiple)
      result.outputs.extend(forward(batch, lengths)[:len(pending_clips)])
      result.paths.extend(pending_paths)
    pending_paths.clear()
    pending_clips.clear()

  for done, (path, clip) in enumerate(read_clips(paths, preprocessing.sampling_rate, min_samples,
                                                 prepare), start=1):
    if isinstance(clip, ReadFailure):
      result.failures.append(clip)
      print(f"error: {clip.message}", file=progress_stream or sys.stderr, flush=True)
    else:
      pending_paths.append(path)
      pending_clips.append(clip)
      if len(pending_clips) == batch_size:
        flush()
    progress.update(done)
  flush()
  progress.update(len(paths), force=True)
  return result


def make_embedding_forward(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint, layer: int | None):
  """A jitted (batch, lengths) -> (batch, hidden) mean-pooled embedding function."""
  if layer is not None:
    num_states = checkpoint.config.num_hidden_layers + 1
    if not -num_states <= layer < num_states:
      raise ValueError(f"--layer must be in [{-num_states}, {num_states - 1}] for a "
                       f"{checkpoint.config.num_hidden_layers}-layer encoder, got {layer}")

  def embed(params, waveform, lengths):
    outputs = checkpoint.model.apply({"params": params}, waveform, lengths,
                                     output_hidden_states=layer is not None)
    if layer is None:
      return outputs["pooled"]
    return wav2vec2.masked_mean(outputs["hidden_states"][layer], outputs["frame_mask"])

  embed = compilation.jit_transformer_inference(embed)

  def forward(batch, lengths):
    return list(np.asarray(embed(checkpoint.params, jnp.asarray(batch), jnp.asarray(lengths)),
                           np.float32))

  return forward


@dataclasses.dataclass
class EmbeddingResult:
  embeddings: np.ndarray  # (files, hidden) float32, rows in input order
  paths: list[str]  # the file of each row
  failures: list[ReadFailure]  # unreadable or too-short files, in input order


def embed_speech(encoder: str | wav2vec2_checkpoint.SpeechCheckpoint, paths: Sequence[str], *,
                 layer: int | None = None, batch_size: int = 8, skip_bad: bool = False,
                 peak_normalize: bool = True, dtype=jnp.float32,
                 progress_stream=None) -> EmbeddingResult:
  """Python API of the CLI: embeds audio files with a HuBERT / wav2vec2 checkpoint.

  With `skip_bad=False` and a bad file, `embeddings` is empty and `failures` lists them all.
  """
  checkpoint = encoder
  if not isinstance(checkpoint, wav2vec2_checkpoint.SpeechCheckpoint):
    checkpoint = wav2vec2_checkpoint.load(encoder, dtype=dtype)
  forward = make_embedding_forward(checkpoint, layer)
  result = run_batches(checkpoint, paths, forward, batch_size=batch_size, skip_bad=skip_bad,
                       peak_normalize=peak_normalize, verb="embedded",
                       progress_stream=progress_stream)
  width = checkpoint.config.hidden_size
  if result.failures and not skip_bad:
    return EmbeddingResult(np.zeros((0, width), np.float32), [], result.failures)
  embeddings = np.stack(result.outputs) if result.outputs else np.zeros((0, width), np.float32)
  return EmbeddingResult(embeddings.astype(np.float32), result.paths, result.failures)


def define_common_flags(flag_values: flags.FlagValues) -> None:
  """Flags shared by `embed speech` and `transcribe`."""
  flags.DEFINE_string("encoder", None, "Hugging Face checkpoint folder (config.json + "
                      "model.safetensors or pytorch_model.bin, preprocessor_config.json).",
                      flag_values=flag_values)
  flags.DEFINE_string("input", None, "A folder of audio files (searched recursively) or a text "
                      "file with one audio path per line.", flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 8, "Clips per forward pass.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_bool("skip_bad", False, "Skip unreadable or too-short files (and print how many) "
                    "instead of failing.", flag_values=flag_values)
  flags.DEFINE_bool("peak_normalize", True, "Divide each clip by its peak magnitude first, as "
                    "CLASP did (silent clips are left silent).", flag_values=flag_values)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the encoder.",
                    flag_values=flag_values)
  flags.DEFINE_enum("precision", "highest", list(precision.NAMES),
                    "Matmul precision on GPU/TPU; 'highest' matches PyTorch float32, 'default' "
                    "rounds to tf32/bf16 (no effect on CPU).", flag_values=flag_values)


def parse_flags(flag_values: flags.FlagValues, argv: list[str], doc: str) -> list[str] | int:
  """Parses argv into `flag_values`; returns an exit code instead when done or on a bad flag."""
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull", "-help") for arg in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + flag_values.get_help(include_special_flags=False))
    return 0
  try:
    remaining = flag_values(argv)
  except flags.Error as error:
    print(f"{argv[0]}: {error}\nrun with --help for the flags", file=sys.stderr)
    return 2
  if len(remaining) > 1:
    print(f"{argv[0]}: unexpected arguments {remaining[1:]}", file=sys.stderr)
    return 2
  missing = [name for name in ("encoder", "input") if getattr(flag_values, name) is None]
  if missing:
    print(f"{argv[0]}: missing required flag(s): " + ", ".join(f"--{name}" for name in missing),
          file=sys.stderr)
    return 2
  return remaining


def dtype_from_flag(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def report_failures(failures: list[ReadFailure], skip_bad: bool, program: str) -> int:
  """Prints the closing line about bad files; returns the exit code they imply."""
  if not failures:
    return 0
  if skip_bad:
    print(f"skipped {len(failures)} bad file(s)", file=sys.stderr)
    return 0
  print(f"{program}: {len(failures)} bad file(s), nothing written; "
        "rerun with --skip_bad to skip them", file=sys.stderr)
  return 1


def _new_flag_values() -> flags.FlagValues:
  flag_values = flags.FlagValues()
  define_common_flags(flag_values)
  flags.DEFINE_string("output", None, "Where to write the (files, hidden) float32 .npy; the row "
                      "paths go to the same name with .paths.txt.", flag_values=flag_values)
  flags.DEFINE_integer("layer", None, "Mean-pool transformers' hidden_states[LAYER] instead of the "
                       "last hidden state: 0 is the transformer input, N the output of layer N "
                       "(before the final layer norm of pre-LN models); negative counts from "
                       "the end.",
                       flag_values=flag_values)
  return flag_values


def paths_file_for(output: str) -> str:
  """OUT.npy -> OUT.paths.txt: the file of each embedding row."""
  return output[:-len(".npy")] + ".paths.txt"


def run(argv: list[str]) -> int:
  """Entry point of `python -m clasp_jax.embed speech`; returns the exit code."""
  program = "embed speech"
  flag_values = _new_flag_values()
  parsed = parse_flags(flag_values, [program] + list(argv[1:]), __doc__)
  if isinstance(parsed, int):
    return parsed
  if flag_values.output is None:
    print(f"{program}: missing required flag: --output", file=sys.stderr)
    return 2
  try:
    paths = list_audio_inputs(flag_values.input)
    checkpoint = wav2vec2_checkpoint.load(flag_values.encoder,
                                        dtype=dtype_from_flag(flag_values.dtype),
                                        precision=flag_values.precision)
    result = embed_speech(checkpoint, paths, layer=flag_values.layer,
                          batch_size=flag_values.batch_size, skip_bad=flag_values.skip_bad,
                          peak_normalize=flag_values.peak_normalize)
  except (InputListError, wav2vec2_checkpoint.CheckpointError, ValueError, OSError) as error:
    print(f"{program}: {error}", file=sys.stderr)
    return 1
  exit_code = report_failures(result.failures, flag_values.skip_bad, program)
  if exit_code:
    return exit_code
  if not result.paths:
    print(f"{program}: no file could be embedded", file=sys.stderr)
    return 1
  output = flag_values.output
  if not output.endswith(".npy"):
    output += ".npy"  # np.save would add it anyway; keep the printed name and paths file in step.
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.save(output, result.embeddings)
  with open(paths_file_for(output), "w", encoding="utf-8") as paths_file:
    paths_file.writelines(path + "\n" for path in result.paths)
  print(f"wrote {result.embeddings.shape[0]} x {result.embeddings.shape[1]} embeddings to {output}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(run(sys.argv))
