"""`python -m clasp_jax.embed clasp`: embeddings from a trained CLASP workdir.

  python -m clasp_jax.embed clasp --workdir=W --input=PATH --output=OUT.npy
  python -m clasp_jax.embed clasp --workdir=W --text --input=SENTENCES.txt --output=OUT.npy

Audio (the default): PATH is a folder of audio files (searched recursively) or a text file
with one audio path per line; any common format and sample rate is read, mixed to mono and
resampled to 16 kHz, then prepared as the training pipeline prepares clips (16-bit precision,
cropped to the config's max_duration_s, peak-normalised when the config says so) and embedded
by the audio-mode model. One L2-normalised row per file; OUT.paths.txt names the rows.
With --text, every line of the UTF-8 file is one sentence, embedded by the model's text tower.
The rows are what the trainer's evaluators score for the same clips and sentences.
--checkpoint picks 'best' (default), 'latest' or a step.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from clasp_jax.inference import speech_embedding, text_embedding


def _new_flag_values() -> flags.FlagValues:
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints/).",
                      flag_values=flag_values)
  flags.DEFINE_string("input", None, "Audio folder or list file; with --text, a text file.",
                      flag_values=flag_values)
  flags.DEFINE_string("output", None, "Where to write the (rows, dim) float32 .npy.",
                      flag_values=flag_values)
  flags.DEFINE_bool("text", False, "Embed sentences with the model's text tower instead.",
                    flag_values=flag_values)
  flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.",
                      flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 16, "Clips or sentences per forward pass.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_bool("skip_bad", False, "Skip unreadable files (and say how many) instead of "
                    "failing.", flag_values=flag_values)
  return flag_values


def _write(output: str, embeddings, paths=None) -> None:
  import numpy as np
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  partial = output + ".partial.npy"  # Renamed into place: never a truncated .npy.
  np.save(partial, embeddings)
  os.replace(partial, output)
  if paths is not None:
    with open(speech_embedding.paths_file_for(output), "w", encoding="utf-8") as stream:
      stream.writelines(path + "\n" for path in paths)
  print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {output}",
        file=sys.stderr)


def _embed_audio(trained, flag_values, program: str) -> int:
  from clasp_jax.data import audio_io
  paths = speech_embedding.list_audio_inputs(flag_values.input)
  good_paths, waveforms, failures = [], [], []
  for path in paths:
    try:
      waveforms.append(audio_io.load_audio(path, audio_io.TARGET_SAMPLE_RATE))
      good_paths.append(path)
    except audio_io.UnusableInputError as error:
      failures.append(speech_embedding.ReadFailure(path, str(error)))
      print(f"{program}: {path}: {error}", file=sys.stderr)
  exit_code = speech_embedding.report_failures(failures, flag_values.skip_bad, program)
  if exit_code:
    return exit_code
  if not waveforms:
    print(f"{program}: no file could be embedded", file=sys.stderr)
    return 1
  progress = speech_embedding.Progress(len(waveforms), "embedded")
  embeddings = trained.embed_waveforms(waveforms, batch_size=flag_values.batch_size,
                                       progress=progress.update)
  _write(flag_values.output, embeddings, good_paths)
  return 0


def run(argv: list[str]) -> int:
  """Entry point of `python -m clasp_jax.embed clasp`; returns the exit code."""
  program = "embed clasp"
  flag_values = _new_flag_values()
  if any(arg in ("-h", "--help", "--helpshort", "--helpfull", "-help") for arg in argv[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + flag_values.get_help(include_special_flags=False))
    return 0
  try:
    remaining = flag_values([program] + list(argv[1:]))
  except flags.Error as error:
    print(f"{program}: {error}\nrun with --help for the flags", file=sys.stderr)
    return 2
  missing = [name for name in ("workdir", "input", "output") if not flag_values[name].value]
  if len(remaining) > 1 or missing:
    problem = (f"unexpected arguments {remaining[1:]}" if len(remaining) > 1 else
               "missing required flag(s): " + ", ".join(f"--{name}" for name in missing))
    print(f"{program}: {problem}", file=sys.stderr)
    return 2
  if not flag_values.output.endswith(".npy"):
    print(f"{program}: --output {flag_values.output}: must end in .npy", file=sys.stderr)
    return 2

  from clasp_jax.inference import workdir as workdir_lib
  from clasp_jax.trainer.checkpointing import parse_checkpoint_choice
  try:
    trained = workdir_lib.load_trained(flag_values.workdir,
                                       checkpoint=parse_checkpoint_choice(flag_values.checkpoint))
    print(f"{program}: {flag_values.workdir}, checkpoint of step {trained.step}",
          file=sys.stderr)
    if flag_values.text:
      sentences = text_embedding.read_sentences(flag_values.input)
      _write(flag_values.output, trained.embed_texts(sentences,
                                                     batch_size=flag_values.batch_size))
      return 0
    return _embed_audio(trained, flag_values, program)
  except (speech_embedding.InputListError, text_embedding.UsageError, FileNotFoundError,
          ValueError, OSError) as error:
    print(f"{program}: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(run(sys.argv))
