"""Embeddings and greedy CTC transcripts of audio files with a HuBERT / wav2vec2 checkpoint.

The library half of `python -m clasp_jax.embed speech` and `python -m clasp_jax.transcribe`:
`embed_speech` and `transcribe` take a checkpoint folder (or a loaded checkpoint) and paths,
and return rows in input order plus the files that could not be used.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from clasp_jax.inference import ctc
from clasp_jax.inference import speech_batching
from clasp_jax.inference.speech_batching import ReadFailure
from clasp_jax.models import compilation
from clasp_jax.models import wav2vec2
from clasp_jax.models import wav2vec2_checkpoint

ProgressFn = Callable[[int, int], None]
FailureFn = Callable[[ReadFailure], None]


def _checkpoint(encoder: str | wav2vec2_checkpoint.SpeechCheckpoint,
                dtype) -> wav2vec2_checkpoint.SpeechCheckpoint:
  if isinstance(encoder, wav2vec2_checkpoint.SpeechCheckpoint):
    return encoder
  return wav2vec2_checkpoint.load(encoder, dtype=dtype)


def check_layer(config: wav2vec2.Config, layer: int | None) -> None:
  """--layer indexes transformers' hidden_states (num_hidden_layers + 1 of them, negative from
  the end); None is the last hidden state."""
  if layer is not None:
    num_states = config.num_hidden_layers + 1
    if not -num_states <= layer < num_states:
      raise ValueError(f"--layer must be in [{-num_states}, {num_states - 1}] for a "
                       f"{config.num_hidden_layers}-layer encoder, got {layer}")


def make_embedding_forward(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint, layer: int | None):
  """A jitted (batch, lengths) -> (batch, hidden) mean-pooled embedding function."""
  check_layer(checkpoint.config, layer)

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
                 peak_normalize: bool = True, dtype=jnp.float32, progress: ProgressFn | None = None,
                 on_failure: FailureFn | None = None) -> EmbeddingResult:
  """Embeds audio files with a HuBERT / wav2vec2 checkpoint (folder or loaded).

  With `skip_bad=False` and a bad file, `embeddings` is empty and `failures` lists them all.
  """
  checkpoint = _checkpoint(encoder, dtype)
  forward = make_embedding_forward(checkpoint, layer)
  result = speech_batching.run_batches(checkpoint, paths, forward, batch_size=batch_size,
                                       skip_bad=skip_bad, peak_normalize=peak_normalize,
                                       progress=progress, on_failure=on_failure)
  width = checkpoint.config.hidden_size
  if result.failures and not skip_bad:
    return EmbeddingResult(np.zeros((0, width), np.float32), [], result.failures)
  embeddings = np.stack(result.outputs) if result.outputs else np.zeros((0, width), np.float32)
  return EmbeddingResult(embeddings.astype(np.float32), result.paths, result.failures)


def require_ctc_head(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint) -> None:
  if checkpoint.config.ctc_vocab_size is None:
    raise wav2vec2_checkpoint.CheckpointError(
        f"{checkpoint.path}: no CTC head (lm_head) in this checkpoint; transcription needs a "
        "*ForCTC checkpoint")


def make_transcribe_forward(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint,
                            vocabulary: ctc.CtcVocabulary):
  """A (batch, lengths) -> list of transcripts function around one jitted forward pass."""
  require_ctc_head(checkpoint)

  def best_ids(params, waveform, lengths):
    outputs = checkpoint.model.apply({"params": params}, waveform, lengths)
    # Argmax on the device: only (batch, frames) ids come back to the host.
    return jnp.argmax(outputs["logits"], axis=-1), outputs["frame_mask"]

  best_ids = compilation.jit_transformer_inference(best_ids)

  def forward(batch, lengths):
    best, frame_mask = best_ids(checkpoint.params, jnp.asarray(batch), jnp.asarray(lengths))
    best, frame_mask = np.asarray(best), np.asarray(frame_mask)
    return [vocabulary.decode(row[mask].tolist()) for row, mask in zip(best, frame_mask)]

  return forward


@dataclasses.dataclass
class TranscriptionResult:
  transcripts: list[str]
  paths: list[str]
  failures: list[ReadFailure]


def transcribe(encoder: str | wav2vec2_checkpoint.SpeechCheckpoint, paths: Sequence[str], *,
               batch_size: int = 8, skip_bad: bool = False, peak_normalize: bool = True,
               dtype=jnp.float32, progress: ProgressFn | None = None,
               on_failure: FailureFn | None = None) -> TranscriptionResult:
  """Greedy CTC transcripts of audio files, in input order (a `*ForCTC` checkpoint)."""
  checkpoint = _checkpoint(encoder, dtype)
  require_ctc_head(checkpoint)
  vocabulary = ctc.CtcVocabulary.from_folder(checkpoint.path)
  if checkpoint.config.ctc_vocab_size > len(vocabulary.tokens):
    raise ctc.VocabularyError(f"{checkpoint.path}: CTC head has {checkpoint.config.ctc_vocab_size} "
                              f"outputs but vocab.json only {len(vocabulary.tokens)} tokens")
  forward = make_transcribe_forward(checkpoint, vocabulary)
  result = speech_batching.run_batches(checkpoint, paths, forward, batch_size=batch_size,
                                       skip_bad=skip_bad, peak_normalize=peak_normalize,
                                       progress=progress, on_failure=on_failure)
  if result.failures and not skip_bad:
    return TranscriptionResult([], [], result.failures)
  return TranscriptionResult(result.outputs, result.paths, result.failures)
