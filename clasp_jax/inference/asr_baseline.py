"""The paper's ASR-cascade baseline: greedy CTC transcript -> sentence encoder -> cosine.

Speech is represented by the sentence embedding of its own transcript, so retrieval compares
text with text; the paper reports it next to CLASP (HuBERT-CTC and wav2vec2-CTC into LaBSE).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import numpy as np

from clasp_jax.data import audio_io
from clasp_jax.inference import ctc
from clasp_jax.models import text_tower
from clasp_jax import transcribe
from clasp_jax.models import wav2vec2, wav2vec2_checkpoint
from clasp_jax.inference.speech_embedding import PAD_MULTIPLE_SECONDS, pad_batch


def transcribe_waveforms(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint,
                         waveforms: Sequence[np.ndarray], *, batch_size: int = 8,
                         peak_normalize: bool = True) -> list[str]:
  """Greedy CTC transcripts of 16 kHz mono float waveforms, in order.

  Preprocessing is the checkpoint's own (as `python -m clasp_jax.transcribe` applies it);
  clips shorter than the convolutional receptive field are zero-padded up to it.
  """
  transcribe.require_ctc_head(checkpoint)
  vocabulary = ctc.CtcVocabulary.from_folder(checkpoint.path)
  forward = transcribe.make_transcribe_forward(checkpoint, vocabulary)
  min_samples = wav2vec2.receptive_field(checkpoint.config)
  pad_multiple = max(min_samples, int(PAD_MULTIPLE_SECONDS *
                                      checkpoint.preprocessing.sampling_rate))

  def prepare(waveform: np.ndarray) -> np.ndarray:
    if peak_normalize:
      waveform = audio_io.peak_normalize(waveform)
    waveform = checkpoint.preprocessing.apply(waveform)
    if waveform.shape[0] < min_samples:
      waveform = np.pad(waveform, (0, min_samples - waveform.shape[0]))
    return waveform

  transcripts: list[str] = []
  for start in range(0, len(waveforms), batch_size):
    clips = [prepare(w) for w in waveforms[start:start + batch_size]]
    batch, lengths = pad_batch(clips, batch_size, pad_multiple)
    transcripts.extend(forward(batch, lengths)[:len(clips)])
  return transcripts


def cascade_embeddings(split, *, speech_encoder: str, text_encoder: str, batch_size: int = 8,
                       progress: Callable[[str], None] | None = None
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Embeddings of a built speech-text split (clasp_jax.data.reader) for the evaluators.

  Returns the mapping ('speech' = embedded transcripts, 'text' = embedded references, plus
  category, language, source and text_id) and the transcripts in split order.
  """
  progress = progress or (lambda line: print(line, file=sys.stderr))
  checkpoint = wav2vec2_checkpoint.load(speech_encoder)
  transcripts, texts, labels = [], [], {"category": [], "language": [], "source": []}
  count = len(split)
  for start in range(0, count, 64):
    records = split.read(range(start, min(start + 64, count)))
    waveforms = [np.asarray(r["audio"], np.float32) / 32768.0 for r in records]
    transcripts.extend(transcribe_waveforms(checkpoint, waveforms, batch_size=batch_size))
    texts.extend(r["text"] for r in records)
    for field, values in labels.items():
      values.extend(r.get(field, "") for r in records)
    progress(f"transcribed {len(transcripts)}/{count} clips")
  tower = text_tower.load(text_encoder)
  embeddings = {
      "speech": tower.embed(transcripts),
      "text": tower.embed(texts),
      "text_id": np.unique(np.asarray(texts, dtype=str), return_inverse=True)[1].astype(np.int64),
  }
  for field, values in labels.items():
    if any(values):
      embeddings[field] = np.asarray(values, dtype=str)
  return embeddings, transcripts
