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

import sys

import jax.numpy as jnp

from clasp_jax.common import cli
from clasp_jax.inference import speech
from clasp_jax.inference import speech_batching
from clasp_jax.models import precision
from clasp_jax.models import wav2vec2_checkpoint

# Expected failures of a speech command, each reported in one line with exit 1.
ERRORS = (speech_batching.InputListError, wav2vec2_checkpoint.CheckpointError, ValueError,
          OSError)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def define_speech_flags(flag_values: cli.FlagValues) -> None:
  """Flags shared by `embed speech` and `transcribe`."""
  flag_values.DEFINE_string("encoder", None, "Hugging Face checkpoint folder (config.json + "
                            "model.safetensors or pytorch_model.bin, preprocessor_config.json).")
  flag_values.DEFINE_string("input", None, "A folder of audio files (searched recursively) or a "
                            "text file with one audio path per line.")
  flag_values.DEFINE_integer("batch_size", 8, "Clips per forward pass.", lower_bound=1)
  flag_values.DEFINE_bool("skip_bad", False, "Skip unreadable or too-short files (and print how "
                          "many) instead of failing.")
  flag_values.DEFINE_bool("peak_normalize", True, "Divide each clip by its peak magnitude at "
                          "the source rate, before resampling, as CLASP did (silent clips are "
                          "left silent).")
  flag_values.DEFINE_enum("dtype", "float32", list(_DTYPES), "Compute dtype of the encoder.")
  flag_values.DEFINE_enum("precision", "highest", list(precision.NAMES),
                          "Matmul precision on GPU/TPU; 'highest' matches PyTorch float32, "
                          "'default' rounds to tf32/bf16 (no effect on CPU).")


FLAGS = cli.FlagValues()
define_speech_flags(FLAGS)
cli.define_npy_output(FLAGS, "files", "; OUT.paths.txt beside it names each row's file")
FLAGS.DEFINE_integer("layer", None, "Mean-pool transformers' hidden_states[LAYER] instead of the "
                     "last hidden state: 0 is the transformer input, N the output of layer N "
                     "(before the final layer norm of pre-LN models); negative counts from "
                     "the end.")


def load_speech_inputs(flag_values: cli.FlagValues):
  """The checkpoint and the paths the shared flags name, and the run's keyword arguments."""
  paths = speech_batching.list_audio_inputs(flag_values.input)
  checkpoint = wav2vec2_checkpoint.load(flag_values.encoder, dtype=_DTYPES[flag_values.dtype],
                                        precision=flag_values.precision)
  options = dict(batch_size=flag_values.batch_size, skip_bad=flag_values.skip_bad,
                 peak_normalize=flag_values.peak_normalize,
                 on_failure=lambda failure: cli.report_error(failure.message))
  return checkpoint, paths, options


def check_failures(failures: list[speech_batching.ReadFailure], skip_bad: bool) -> None:
  """Says how many bad files were skipped, or fails the run when they were not to be."""
  if failures and skip_bad:
    print(f"skipped {len(failures)} bad file(s)", file=sys.stderr)
  elif failures:
    raise cli.UsageError(f"{len(failures)} bad file(s), nothing written; rerun with --skip_bad "
                         "to skip them")


def paths_file_for(output: str) -> str:
  """OUT.npy -> OUT.paths.txt: the file of each embedding row."""
  return output[:-len(".npy")] + ".paths.txt"


def main() -> None:
  cli.npy_output(FLAGS)
  checkpoint, paths, options = load_speech_inputs(FLAGS)
  result = speech.embed_speech(checkpoint, paths, layer=FLAGS.layer,
                               progress=cli.Progress(len(paths), "files", verb="embedded"),
                               **options)
  check_failures(result.failures, FLAGS.skip_bad)
  if not result.paths:
    raise cli.UsageError("no file could be embedded")
  cli.save_npy(FLAGS.output, result.embeddings)
  with open(paths_file_for(FLAGS.output), "w", encoding="utf-8") as paths_file:
    paths_file.writelines(path + "\n" for path in result.paths)
  print(f"wrote {result.embeddings.shape[0]} x {result.embeddings.shape[1]} embeddings to "
        f"{FLAGS.output}", file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
  """Entry point of `python -m clasp_jax.embed speech`; returns the exit code."""
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__,
                 required=("encoder", "input", "output"), errors=ERRORS)


if __name__ == "__main__":
  sys.exit(run())
