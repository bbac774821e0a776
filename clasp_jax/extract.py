r"""Extracts a feature split from a built speech-text dataset: what feature-mode training reads.

  python -m clasp_jax.extract --data=DATASET[,DATASET...] --split=train \
      --speech_encoder=HF_DIR [--layer=L] [--spectrogram_encoder=WORKDIR] \
      --text_encoder=SENTENCE_DIR --output=FEATURE_DIR

Writes FEATURE_DIR/SPLIT/ in the format of clasp_jax/data/features.py (speech.npy,
spectrogram.npy, text.npy, category.npy, language.npy, sentences.json, info.json), one row per
usable clip in stored order; extract train, validation and test into the same FEATURE_DIR and
train on them with

  python -m clasp_jax.train --config=configs/base.py:paper,features=FEATURE_DIR --workdir=W

- speech: the HuBERT / wav2vec2 checkpoint HF_DIR (config.json + weights +
  preprocessor_config.json; a *ForCTC head is left out), its last hidden state, or
  transformers' hidden_states[L] with --layer=L (negative: from the end), mean-pooled over the
  clip's frames, as the paper. Each clip is divided by its peak before resampling when
  --peak_normalize (the authors' loader), then standardised when the checkpoint asks.
- spectrogram: the spectrogram front-end + CNN of a trained audio-mode workdir
  (--spectrogram_encoder, its --checkpoint), fed as that workdir's input pipeline fed it.
  Without one, spectrogram.npy is (N, 0): such a split trains with
  --config.model.mode=speech only (the trainer refuses the other modes with that advice).
- text: each clip's sentence through the sentence-transformers folder SENTENCE_DIR, prepared
  by its source as --text_preparation says (paper: Common Voice lower case without
  punctuation, as the authors embedded it); sentences.json keeps the sentences as stored.

Clips are batched by length over this host's devices; with --distributed (or
CLASP_DISTRIBUTED=1, see clasp_jax/common/distributed.py) every process takes its share of the
chunks. Each finished chunk of --chunk_size clips is saved in FEATURE_DIR/.SPLIT.partial/; run
the same command again after an interruption and it resumes there, without redoing saved
chunks, to the result an uninterrupted run writes. Bad clips (too short for the speech
encoder, silent) are skipped and counted, or stop the run with --strict.
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import os
import sys

from clasp_jax.common import cli

_DTYPES = ("float32", "bfloat16")

FLAGS = cli.FlagValues()
FLAGS.DEFINE_list("data", None, "Built speech-text dataset folder(s) (python -m "
                  "clasp_jax.data.build / data.synthesize), concatenated in this order.")
FLAGS.DEFINE_string("split", None, "The split to extract: train, validation or test.")
FLAGS.DEFINE_string("speech_encoder", None, "Hugging Face HuBERT / wav2vec2 checkpoint folder.")
FLAGS.DEFINE_integer("layer", None, "Mean-pool transformers' hidden_states[LAYER] instead of "
                     "the last hidden state: 0 is the transformer input, N the output of layer "
                     "N; negative counts from the end.")
FLAGS.DEFINE_string("spectrogram_encoder", "", "A training workdir of an audio-mode model whose "
                    "spectrogram front-end + CNN make the spectrogram features; '' writes none "
                    "(spectrogram.npy is (N, 0)).")
FLAGS.DEFINE_string("checkpoint", "best", "With --spectrogram_encoder: 'best', 'latest' or a "
                    "step number.")
FLAGS.DEFINE_string("text_encoder", None, "sentence-transformers folder (LaBSE).")
FLAGS.DEFINE_enum("text_preparation", "paper", ["paper", "as_is"],
                  "paper: each sentence prepared by its source as the authors did (Common "
                  "Voice lower case without punctuation); as_is: unchanged.")
FLAGS.DEFINE_string("output", None, "The feature folder; the split lands in OUTPUT/SPLIT/.")
FLAGS.DEFINE_integer("batch_size", 16, "Clips per speech forward pass (rounded up to a "
                     "multiple of the local device count).", lower_bound=1)
FLAGS.DEFINE_integer("text_batch_size", 64, "Sentences per text forward pass.", lower_bound=1)
FLAGS.DEFINE_integer("chunk_size", 512, "Clips per saved chunk: the work an interrupted run "
                     "redoes at most, per process.", lower_bound=1)
FLAGS.DEFINE_bool("peak_normalize", True, "Divide each clip by its peak at the source rate "
                  "before the speech encoder, as CLASP did (silent clips are not divided by 0).")
FLAGS.DEFINE_bool("strict", False, "Stop at the first bad clip instead of skipping and "
                  "counting it.")
FLAGS.DEFINE_enum("dtype", "float32", list(_DTYPES), "Compute dtype of the speech encoders.")
FLAGS.DEFINE_enum("precision", "highest", ["highest", "high", "default"],
                  "Matmul precision on GPU/TPU; 'highest' matches PyTorch float32 (no effect "
                  "on CPU).")
FLAGS.DEFINE_bool("distributed", os.environ.get("CLASP_DISTRIBUTED", "") == "1",
                  "Start JAX's multi-process runtime first; each process extracts its share.")


def _log(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _plan(num_examples: int) -> dict:
  """Every setting that shapes the result (a resumed run must match them)."""
  absolute = lambda path: os.path.abspath(path) if path else ""
  return {
      "data": [absolute(path) for path in FLAGS.data], "split": FLAGS.split,
      "num_examples": num_examples, "chunk_size": FLAGS.chunk_size,
      "batch_size": FLAGS.batch_size, "speech_encoder": absolute(FLAGS.speech_encoder),
      "layer": FLAGS.layer, "spectrogram_encoder": absolute(FLAGS.spectrogram_encoder),
      "checkpoint": FLAGS.checkpoint if FLAGS.spectrogram_encoder else "",
      "text_encoder": absolute(FLAGS.text_encoder), "text_preparation": FLAGS.text_preparation,
      "peak_normalize": FLAGS.peak_normalize, "dtype": FLAGS.dtype,
      "precision": FLAGS.precision,
  }


def main() -> None:
  for flag in ("speech_encoder", "text_encoder", "spectrogram_encoder"):
    if FLAGS[flag].value and not os.path.isdir(FLAGS[flag].value):
      raise cli.UsageError(f"--{flag} {FLAGS[flag].value}: no such folder")
  if FLAGS.distributed:
    from clasp_jax.common import distributed
    try:
      distributed.initialize_from_environment()
    except ValueError as error:
      raise cli.UsageError(str(error)) from None

  # Imported after the checks, so that bad input is reported before JAX starts.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from clasp_jax.data import bad_input  # pylint: disable=g-import-not-at-top
  from clasp_jax.data import reader  # pylint: disable=g-import-not-at-top
  from clasp_jax.inference import feature_extraction as extraction  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import text_tower  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import wav2vec2_checkpoint  # pylint: disable=g-import-not-at-top
  from clasp_jax.trainer.checkpointing import parse_checkpoint_choice  # pylint: disable=g-import-not-at-top

  try:
    split = reader.open_split(FLAGS.data, FLAGS.split)
  except (FileNotFoundError, ValueError) as error:
    raise cli.UsageError(f"--data: {error}") from None
  job = extraction.ChunkedJob(output=FLAGS.output, split_name=FLAGS.split,
                              num_examples=len(split), chunk_size=FLAGS.chunk_size,
                              plan=_plan(len(split)))
  try:
    job.start()
  except (FileExistsError, extraction.PlanMismatchError) as error:
    raise cli.UsageError(str(error)) from None

  dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
  checkpoint = wav2vec2_checkpoint.load(FLAGS.speech_encoder, dtype=dtype,
                                        precision=FLAGS.precision)
  spectrogram = None
  if FLAGS.spectrogram_encoder:
    spectrogram = extraction.load_spectrogram_encoder(
        FLAGS.spectrogram_encoder, parse_checkpoint_choice(FLAGS.checkpoint))
  speech_features = extraction.SpeechFeatures(
      checkpoint, layer=FLAGS.layer, spectrogram=spectrogram,
      peak_normalize=FLAGS.peak_normalize, batch_size=FLAGS.batch_size, dtype=dtype,
      precision=FLAGS.precision)
  tower = text_tower.load(FLAGS.text_encoder, precision=FLAGS.precision)
  policy = bad_input.BadInputPolicy(strict=FLAGS.strict)
  extract_chunk = extraction.ChunkExtractor(
      split, FLAGS.split, speech_features, tower, policy,
      text_preparation=FLAGS.text_preparation, text_batch_size=FLAGS.text_batch_size)
  process_index, process_count = jax.process_index(), jax.process_count()
  _log(f"extracting {FLAGS.split} ({len(split)} clips in {job.num_chunks} chunks; process "
       f"{process_index} of {process_count}, {speech_features.mesh.size} "
       f"{jax.default_backend()} device(s)): speech {speech_features.dims['speech']}-d, "
       f"spectrogram {speech_features.dims['spectrogram']}-d, text {tower.embedding_dim}-d")
  try:
    extraction.run_chunks(job, extract_chunk, process_index=process_index,
                          process_count=process_count, log=_log,
                          progress=cli.Progress(0, "clips", verb="extracted"))
  except bad_input.BadInputError as error:
    raise cli.UsageError(f"{error}; --strict stops at the first bad clip (without it, bad "
                         "clips are skipped and counted)") from None
  if process_count > 1:  # Every process's chunks are saved before process 0 joins them.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("clasp_jax.extract: chunks saved")
  if process_index != 0:
    return
  record = extraction.assemble(job, {
      "speech_encoder": FLAGS.speech_encoder, "layer": FLAGS.layer,
      "spectrogram_encoder": FLAGS.spectrogram_encoder or None,
      "spectrogram_step": spectrogram.step if spectrogram is not None else None,
      "text_encoder": FLAGS.text_encoder, "text_preparation": FLAGS.text_preparation,
      "peak_normalize": FLAGS.peak_normalize, "data": list(FLAGS.data)})
  skipped = {kind: count for kind, count in record["skipped"].items() if count}
  if skipped:
    _log(f"skipped {sum(skipped.values())} bad clip(s): "
         + ", ".join(f"{kind} {count}" for kind, count in skipped.items()))
  _log(f"wrote {job.final_dir}: {len(split) - sum(skipped.values())} rows")


def run(argv: list[str] | None = None) -> int:
  """Entry point of `python -m clasp_jax.extract`; returns the exit code."""
  from clasp_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  return cli.run(main, argv, flag_values=FLAGS, doc=__doc__,
                 required=("data", "split", "speech_encoder", "text_encoder", "output"),
                 errors=(hf_checkpoint.CheckpointError, ValueError, OSError))


if __name__ == "__main__":
  sys.exit(run())
