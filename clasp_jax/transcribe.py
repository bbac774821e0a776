"""`python -m clasp_jax.transcribe`: greedy CTC transcripts with a HuBERT / wav2vec2 CTC checkpoint.

  python -m clasp_jax.transcribe --encoder=HF_DIR --input=PATH [--output=OUT.tsv]

One line per file, in input order, `PATH<TAB>TRANSCRIPT`, on stdout (or in --output).
This is the first stage of CLASP's ASR-cascade baseline (transcript -> LaBSE -> cosine).
PATH and audio handling are those of `python -m clasp_jax.embed speech`; HF_DIR must hold a
`*ForCTC` checkpoint and its tokenizer (vocab.json, tokenizer_config.json).
"""

from __future__ import annotations

if __name__ == "__main__":  # First: it may restart the process under tcmalloc (allocator.py).
  from clasp_jax.common import allocator
  allocator.reexec_under_tcmalloc()

import dataclasses
import os
import sys
from typing import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.models import compilation
from clasp_jax.inference import ctc
from clasp_jax.inference import speech_embedding
from clasp_jax.models import wav2vec2_checkpoint


def require_ctc_head(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint) -> None:
  if checkpoint.config.ctc_vocab_size is None:
    raise wav2vec2_checkpoint.CheckpointError(
        f"{checkpoint.path}: no CTC head (lm_head) in this checkpoint; transcription needs a "
        "*ForCTC checkpoint")


def make_transcribe_forward(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint,
                            vocabulary: ctc.CtcVocabulary):
  """A (batch, lengths) -> list of transcripts function around one jitted forward pass."""
  require_ctc_head(checkpoint)

  def logits_fn(params, waveform, lengths):
    outputs = checkpoint.model.apply({"params": params}, waveform, lengths)
    # Argmax on the device: only (batch, frames) ids come back to the host.
    return jnp.argmax(outputs["logits"], axis=-1), outputs["frame_mask"]

  logits_fn = compilation.jit_transformer_inference(logits_fn)

  def forward(batch, lengths):
    best, frame_mask = logits_fn(checkpoint.params, jnp.asarray(batch), jnp.asarray(lengths))
    best, frame_mask = np.asarray(best), np.asarray(frame_mask)
    return [vocabulary.decode(row[mask].tolist()) for row, mask in zip(best, frame_mask)]

  return forward


@dataclasses.dataclass
class TranscriptionResult:
  transcripts: list[str]
  paths: list[str]
  failures: list[speech_embedding.ReadFailure]


def transcribe(encoder: str | wav2vec2_checkpoint.SpeechCheckpoint, paths: Sequence[str], *,
               batch_size: int = 8, skip_bad: bool = False, peak_normalize: bool = True,
               dtype=jnp.float32, progress_stream=None) -> TranscriptionResult:
  """Python API of the CLI: greedy CTC transcripts of audio files, in input order."""
  checkpoint = encoder
  if not isinstance(checkpoint, wav2vec2_checkpoint.SpeechCheckpoint):
    checkpoint = wav2vec2_checkpoint.load(encoder, dtype=dtype)
  require_ctc_head(checkpoint)
  vocabulary = ctc.CtcVocabulary.from_folder(checkpoint.path)
  if checkpoint.config.ctc_vocab_size > len(vocabulary.tokens):
    raise ctc.VocabularyError(f"{checkpoint.path}: CTC head has {checkpoint.config.ctc_vocab_size} "
                              f"outputs but vocab.json only {len(vocabulary.tokens)} tokens")
  forward = make_transcribe_forward(checkpoint, vocabulary)
  result = speech_embedding.run_batches(checkpoint, paths, forward, batch_size=batch_size,
                                        skip_bad=skip_bad, peak_normalize=peak_normalize,
                                        verb="transcribed", progress_stream=progress_stream)
  if result.failures and not skip_bad:
    return TranscriptionResult([], [], result.failures)
  return TranscriptionResult(result.outputs, result.paths, result.failures)


def _new_flag_values() -> flags.FlagValues:
  flag_values = flags.FlagValues()
  speech_embedding.define_common_flags(flag_values)
  flags.DEFINE_string("output", None, "Write the PATH<TAB>TRANSCRIPT lines here instead of stdout.",
                      flag_values=flag_values)
  return flag_values


def run(argv: list[str]) -> int:
  """Entry point of `python -m clasp_jax.transcribe`; returns the exit code."""
  program = "transcribe"
  flag_values = _new_flag_values()
  parsed = speech_embedding.parse_flags(flag_values, [program] + list(argv[1:]), __doc__)
  if isinstance(parsed, int):
    return parsed
  try:
    paths = speech_embedding.list_audio_inputs(flag_values.input)
    checkpoint = wav2vec2_checkpoint.load(flag_values.encoder,
                                        dtype=speech_embedding.dtype_from_flag(flag_values.dtype),
                                        precision=flag_values.precision)
    result = transcribe(checkpoint, paths, batch_size=flag_values.batch_size,
                        skip_bad=flag_values.skip_bad, peak_normalize=flag_values.peak_normalize)
  except (speech_embedding.InputListError, wav2vec2_checkpoint.CheckpointError, ValueError,
          OSError) as error:
    print(f"{program}: {error}", file=sys.stderr)
    return 1
  exit_code = speech_embedding.report_failures(result.failures, flag_values.skip_bad, program)
  if exit_code:
    return exit_code
  lines = [f"{path}\t{text}\n" for path, text in zip(result.paths, result.transcripts)]
  if flag_values.output:
    os.makedirs(os.path.dirname(os.path.abspath(flag_values.output)), exist_ok=True)
    with open(flag_values.output, "w", encoding="utf-8") as output_file:
      output_file.writelines(lines)
    print(f"wrote {len(lines)} transcripts to {flag_values.output}", file=sys.stderr)
  else:
    sys.stdout.writelines(lines)
  return 0


if __name__ == "__main__":
  sys.exit(run(sys.argv))
