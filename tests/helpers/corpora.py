"""A tiny speech-text corpus the tests build: each word of a sentence is a tone of its own.

The audio is a function of the words, so the retrieval task is learnable in a few steps, and
clips differ in length like speech. Built into an array_record dataset like any manifest.
"""

import json
import os

import numpy as np
import soundfile

WORDS = ("red", "green", "blue", "small", "large", "cat", "dog", "bird", "runs", "sleeps",
         "sings", "here", "there", "today", "now", "slowly")
SAMPLE_RATE = 16_000
WORD_SECONDS = 0.12


def _sentence(rng) -> list[str]:
  return list(rng.choice(WORDS, size=int(rng.integers(2, 6)), replace=False))


def _speak(words, rng) -> np.ndarray:
  time = np.arange(int(WORD_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
  envelope = np.hanning(time.size)
  pieces = [0.3 * envelope * np.sin(2 * np.pi * (180 + 60 * WORDS.index(w)) * time)
            for w in words]
  audio = np.concatenate(pieces + [np.zeros(int(0.05 * SAMPLE_RATE))])
  return (audio + 0.01 * rng.standard_normal(audio.size)).astype(np.float32)


def build_tone_corpus(root, sizes=(("train", 96), ("validation", 32), ("test", 32)),
                      seed=0, languages=("en", "de"), odd_clips=()) -> str:
  """Writes WAVs and a manifest under `root`, builds it, returns the dataset folder.

  `odd_clips`: (split, position, audio) clips put at that position among the split's tone
  clips, e.g. clips too short for a speech encoder; with any, the build keeps silent clips.
  """
  from clasp_jax.data import bad_input
  from clasp_jax.data import tfds_builder
  from clasp_jax.data.sources import manifest

  rng = np.random.default_rng(seed)
  rows, seen = [], set()
  os.makedirs(os.path.join(root, "audio"), exist_ok=True)
  odd = {(split, position): audio for split, position, audio in odd_clips}
  for split, count in sizes:
    made = 0
    while made < count:
      words = _sentence(rng)
      text = " ".join(words)
      if text in seen:  # Splits never share a sentence.
        continue
      seen.add(text)
      name = f"{split}_{made}.wav"
      audio = odd.get((split, made))
      soundfile.write(os.path.join(root, "audio", name),
                      _speak(words, rng) if audio is None else audio, SAMPLE_RATE)
      rows.append({"audio": f"audio/{name}", "text": text, "split": split,
                   "language": languages[made % len(languages)],
                   "category": "animal" if {"cat", "dog", "bird"} & set(words) else "other",
                   "id": f"{split}_{made}"})
      made += 1
  manifest_path = os.path.join(root, "manifest.jsonl")
  with open(manifest_path, "w", encoding="utf-8") as stream:
    stream.writelines(json.dumps(row) + "\n" for row in rows)
  limits = bad_input.AudioLimits(silence_peak=-1.0) if odd else bad_input.AudioLimits()
  options = tfds_builder.BuildOptions(name="tones", kind="manifest", num_workers=2,
                                      limits=limits)
  return tfds_builder.build_dataset(manifest.read_examples(manifest_path),
                                    os.path.join(root, "data"), options)
