"""Clips per second of `extract`'s speech path against the original CLASP authors' way.

  PYTHONPATH=. python benchmarks/extract.py [--clips=16] [--batch_size=8] [--repeats=1]

Both sides make the speech and spectrogram features of the same clips (4 to 8 s of noise-
modulated tones, written as 16 kHz WAV files), in one process:

- extract: `feature_extraction.SpeechFeatures` as `python -m clasp_jax.extract` runs it: a
  base-size random HuBERT (HubertConfig() defaults: 12 layers, hidden 768, saved with
  save_pretrained and loaded as the command loads it) mean-pooled, and the on-device log-mel
  front-end + spectrogram CNN (the default config's, at random), on batches sorted by length,
  jitted. The files are decoded (soundfile, as the built datasets hold them) inside the timing.
- authors: per file, `librosa.load(path, sr=16000)`, x / max|x|, the feature extractor, and
  transformers' PyTorch HubertModel (the same weights) under torch.no_grad(), last hidden state
  mean-pooled; then `librosa.load(path)` at 22,050 Hz, `amplitude_to_db(|stft|)` with librosa's
  defaults drawn by `librosa.display.specshow` (log-frequency axis) into a PNG and read back
  as a BGR array, as their spectrogram notebook did (`--noauthors_image` stops at the dB
  array). Their EfficientNet-B7 on that image is left out (torchvision is not installed), in
  their favour: extract's time includes its spectrogram CNN.

Each side runs once to warm up (compilation), then both in turn `--repeats` times; the median
is reported. Ratio = authors' time / extract's time (above 1: extract is faster). Target: 3x.
Other work on the machine slows both sides; the load average is printed. On a quiet 2-core
CPU the two sides spend nearly all their time in the same HuBERT FLOPs (ratios 1.1-1.3x);
batches pay off where they run in parallel (GPU, TPU).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

_CLIPS = flags.DEFINE_integer("clips", 16, "Clips per run (4 to 8 s each).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Clips per forward pass of extract.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per side after one warm-up run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the clips' lengths and sounds.")
_AUTHORS_IMAGE = flags.DEFINE_bool("authors_image", True, "Render the authors' spectrogram "
                                   "into a PNG and read it back, as they did.")

SAMPLE_RATE = 16_000


def write_clips(folder: str, count: int, seed: int) -> list[str]:
  """`count` WAV files of 4 to 8 s: tones with a syllable-rate envelope, plus noise."""
  import soundfile  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  paths = []
  for index in range(count):
    time = np.arange(int(rng.uniform(4.0, 8.0) * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * time)
    audio = 0.3 * envelope * np.sin(2 * np.pi * rng.uniform(100, 400) * time)
    audio += 0.02 * rng.standard_normal(time.size)
    path = os.path.join(folder, f"clip_{index:03d}.wav")
    soundfile.write(path, audio.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    paths.append(path)
  return paths


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import librosa  # pylint: disable=g-import-not-at-top
  import librosa.display  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import soundfile  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from benchmarks.common import cpu_model, interleaved_medians  # pylint: disable=g-import-not-at-top
  from clasp_jax.inference import feature_extraction  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import speech_tower  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import spectrogram_encoder  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import wav2vec2_checkpoint  # pylint: disable=g-import-not-at-top

  print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        "(other work on the machine slows both sides)", flush=True)
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{allocator.loaded_allocator()} malloc", flush=True)

  folder = tempfile.mkdtemp(prefix="clasp_extract_benchmark_")
  paths = write_clips(folder, _CLIPS.value, _SEED.value)
  torch.manual_seed(0)
  torch_model = transformers.HubertModel(transformers.HubertConfig()).eval()
  hubert_dir = os.path.join(folder, "hubert")
  torch_model.save_pretrained(hubert_dir)
  feature_extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
  feature_extractor.save_pretrained(hubert_dir)

  # The spectrogram branch of the default config (80-bin log-mel, the EfficientNet-style CNN).
  settings = speech_tower.Settings()
  tower = speech_tower.AudioSpeechTower(settings, mode="spectrogram")
  audio = np.zeros((1, SAMPLE_RATE), np.float32)
  variables = jax.jit(lambda key: tower.init(key, audio, audio != 0))(jax.random.key(0))
  spectrogram = feature_extraction.SpectrogramEncoder(
      settings=settings, variables=jax.device_get(dict(variables)), peak_normalize=False,
      workdir="", step=0)
  features = feature_extraction.SpeechFeatures(
      wav2vec2_checkpoint.load(hubert_dir), layer=None, spectrogram=spectrogram,
      batch_size=_BATCH_SIZE.value)

  results = {}  # The last run of each side, compared below.

  def extract():
    clips = [soundfile.read(path, dtype="float32")[0] for path in paths]
    results["extract"] = features(clips, [None] * len(clips))

  def authors():
    rows = {"speech": [], "spectrogram": []}
    for path in paths:
      waveform, _ = librosa.load(path, sr=16_000)
      waveform = waveform / np.max(np.abs(waveform))
      inputs = feature_extractor(waveform, sampling_rate=16_000, return_tensors="pt")
      with torch.no_grad():
        hidden = torch_model(inputs.input_values).last_hidden_state
      rows["speech"].append(hidden[0].mean(0).numpy())
      waveform, sample_rate = librosa.load(path)  # 22,050 Hz, librosa's default
      decibels = librosa.amplitude_to_db(np.abs(librosa.stft(waveform)))
      if _AUTHORS_IMAGE.value:
        figure = pyplot.figure()
        librosa.display.specshow(decibels, sr=sample_rate, x_axis="time", y_axis="log")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        pyplot.close(figure)
        buffer.seek(0)
        # cv2.imread's BGR order, raw 0-255 values, as the authors fed them on.
        decibels = np.asarray(Image.open(buffer).convert("RGB"), np.float32)[..., ::-1]
      rows["spectrogram"].append(decibels)
    results["authors"] = rows

  medians = interleaved_medians({"authors": authors, "extract": extract}, _REPEATS.value)
  difference = np.abs(results["extract"]["speech"] - np.stack(results["authors"]["speech"])).max()
  assert difference < 1e-3, f"extract's HuBERT rows and PyTorch's differ by {difference}"
  count = len(paths)
  ratio = medians["authors"] / medians["extract"]
  print(f"{count} clips of 4-8 s: extract {count / medians['extract']:.2f} clips/s "
        f"(batch {features.rows}) | authors' per-file loop {count / medians['authors']:.2f} "
        f"clips/s | ratio {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); "
        f"largest HuBERT row difference {difference:.1e}", flush=True)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clasp_jax.common import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_under_tcmalloc()
  app.run(main)
