"""The paper's ASR-cascade baseline: greedy CTC transcript -> sentence encoder -> cosine.

Speech is represented by the sentence embedding of its own transcript, so retrieval compares
text with text; the paper reports it next to CLASP (HuBERT-CTC and wav2vec2-CTC into LaBSE).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import numpy as np

from clasp_jax.data import audio_io
from clasp_jax.data import text_prep
from clasp_jax.inference import ctc
from clasp_jax.inference import speech
from clasp_jax.inference.speech_batching import PAD_MULTIPLE_SECONDS, pad_batch
from clasp_jax.models import text_tower
from clasp_jax.models import wav2vec2, wav2vec2_checkpoint


def transcribe_waveforms(checkpoint: wav2vec2_checkpoint.SpeechCheckpoint,
                         waveforms: Sequence[np.ndarray], *, batch_size: int = 8,
                         peak_normalize: bool = True,
                         source_peaks: Sequence[float | None] | None = None) -> list[str]:
  """Greedy CTC transcripts of 16 kHz mono float waveforms, in order.

  Preprocessing is the checkpoint's own (as `python -m clasp_jax.transcribe` applies it);
  clips shorter than the convolutional receptive field are zero-padded up to it. With
  `source_peaks` (each clip's peak before it was resampled, None where unknown) peak
  normalisation divides by those, as the authors did.
  """
  speech.require_ctc_head(checkpoint)
  vocabulary = ctc.CtcVocabulary.from_folder(checkpoint.path)
  forward = speech.make_transcribe_forward(checkpoint, vocabulary)
  min_samples = wav2vec2.receptive_field(checkpoint.config)
  pad_multiple = max(min_samples, int(PAD_MULTIPLE_SECONDS *
                                      checkpoint.preprocessing.sampling_rate))

  peaks = list(source_peaks) if source_peaks is not None else [None] * len(waveforms)

  def prepare(waveform: np.ndarray, source_peak: float | None) -> np.ndarray:
    if peak_normalize:
      waveform = audio_io.peak_normalize(waveform, source_peak=source_peak)
    waveform = checkpoint.preprocessing.apply(waveform)
    if waveform.shape[0] < min_samples:
      waveform = np.pad(waveform, (0, min_samples - waveform.shape[0]))
    return waveform

  transcripts: list[str] = []
  for start in range(0, len(waveforms), batch_size):
    clips = [prepare(w, p) for w, p in zip(waveforms[start:start + batch_size],
                                           peaks[start:start + batch_size])]
    batch, lengths = pad_batch(clips, batch_size, pad_multiple)
    transcripts.extend(forward(batch, lengths)[:len(clips)])
  return transcripts


def cascade_embeddings(split, *, speech_encoder: str, text_encoder: str, batch_size: int = 8,
                       progress: Callable[[str], None] | None = None,
                       text_preparation: str = "paper"
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Embeddings of a built speech-text split (clasp_jax.data.reader) for the evaluators.

  `text_preparation` (text_prep.PREPARATIONS) prepares both sides before the sentence encoder:
  under 'paper' the transcripts are lowercased (CTC vocabularies are upper case, LaBSE is
  cased) and each reference text gets its source's rule (Common Voice lower case without
  punctuation), as the authors did.
  Returns the mapping ('speech' = embedded transcripts, 'text' = embedded references, plus
  category, language, source and text_id of the prepared references) and the prepared
  transcripts in split order.
  """
  transcript_rule = text_prep.transcript_rule(text_preparation)
  progress = progress or (lambda line: print(line, file=sys.stderr))
  checkpoint = wav2vec2_checkpoint.load(speech_encoder)
  transcripts, texts, labels = [], [], {"category": [], "language": [], "source": []}
  sources = []
  count = len(split)
  for start in range(0, count, 64):
    records = split.read(range(start, min(start + 64, count)))
    waveforms = [np.asarray(r["audio"], np.float32) / 32768.0 for r in records]
    transcripts.extend(transcribe_waveforms(
        checkpoint, waveforms, batch_size=batch_size,
        source_peaks=[r.get("source_peak") for r in records]))
    texts.extend(r["text"] for r in records)
    sources.extend(r.get("source", "") for r in records)
    for field, values in labels.items():
      values.extend(r.get(field, "") for r in records)
    progress(f"transcribed {len(transcripts)}/{count} clips")
  transcripts = [text_prep.prepare(transcript, transcript_rule) for transcript in transcripts]
  texts = text_prep.prepare_by_source(texts, sources, text_preparation)
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
