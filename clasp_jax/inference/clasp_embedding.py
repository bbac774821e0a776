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
--checkpoint picks 'best' (the default), 'latest' or a step.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import sys

from clasp_jax.common import cli
from clasp_jax.common import workdir as workdir_files
from clasp_jax.inference import speech_batching, speech_embedding, text_embedding

FLAGS = cli.FlagValues()
FLAGS.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints/).")
FLAGS.DEFINE_string("input", None, "An audio folder or list file; with --text, a text file.")
cli.define_npy_output(FLAGS, "rows", "; OUT.paths.txt beside it names the audio rows' files")
FLAGS.DEFINE_bool("text", False, "Embed sentences with the model's text tower instead.")
FLAGS.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
FLAGS.DEFINE_integer("batch_size", 16, "Clips or sentences per forward pass.", lower_bound=1)
FLAGS.DEFINE_bool("skip_bad", False, "Skip unreadable files (and say how many) instead of "
                  "failing.")

ERRORS = (speech_batching.InputListError, workdir_files.WorkdirError, FileNotFoundError,
          ValueError, OSError)


def _embed_audio(trained) -> None:
  from clasp_jax.data import audio_io
  paths = speech_batching.list_audio_inputs(FLAGS.input)
  good_paths, waveforms, failures = [], [], []
  for path in paths:
    try:
      waveforms.append(audio_io.load_audio(path, audio_io.TARGET_SAMPLE_RATE))
      good_paths.append(path)
    except audio_io.UnusableInputError as error:
      failures.append(speech_batching.ReadFailure(path, str(error)))
      cli.report_error(str(error))
  speech_embedding.check_failures(failures, FLAGS.skip_bad)
  if not waveforms:
    raise cli.UsageError("no file could be embedded")
  embeddings = trained.embed_waveforms(
      waveforms, batch_size=FLAGS.batch_size,
      progress=cli.Progress(len(waveforms), "files", verb="embedded"))
  cli.save_npy(FLAGS.output, embeddings)
  with open(speech_embedding.paths_file_for(FLAGS.output), "w", encoding="utf-8") as stream:
    stream.writelines(path + "\n" for path in good_paths)
  return embeddings


def main() -> None:
  cli.npy_output(FLAGS)
  from clasp_jax.inference import workdir as workdir_lib
  from clasp_jax.trainer.checkpointing import parse_checkpoint_choice
  try:
    checkpoint = parse_checkpoint_choice(FLAGS.checkpoint)
  except ValueError as error:
    raise cli.FlagError(str(error)) from None
  if FLAGS.text:  # Read the input before the model: a bad file fails fast.
    sentences = text_embedding.read_sentences(FLAGS.input)
  trained = workdir_lib.load_trained(FLAGS.workdir, checkpoint=checkpoint)
  print(f"{FLAGS.workdir}: checkpoint of step {trained.step}", file=sys.stderr)
  if FLAGS.text:
    embeddings = trained.embed_texts(sentences, batch_size=FLAGS.batch_size)
    cli.save_npy(FLAGS.output, embeddings)
  else:
    embeddings = _embed_audio(trained)
  print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} embeddings to {FLAGS.output}",
        file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
  """Entry point of `python -m clasp_jax.embed clasp`; returns the exit code."""
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__,
                 required=("workdir", "input", "output"), errors=ERRORS)


if __name__ == "__main__":
  sys.exit(run())
