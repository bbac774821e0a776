"""Speech towers side by side with their references, both measured in this process.

  PYTHONPATH=. python benchmarks/speech_towers.py [--repeats=5] [--only=spectrogram|hubert]

(a) Spectrograms: CLASP's amplitude_to_db(|stft|) with librosa defaults for 64 clips of
    4 s at 22,050 Hz, as a librosa per-file loop against one batched, jitted JAX call
    (result fetched to host memory). Target: JAX at least 5x faster.
(b) A base-size HuBERT forward (HubertConfig() defaults: 12 layers, hidden 768, random
    weights shared by both sides) on a batch of 8 clips of 4 s at 16 kHz: Flax (jitted)
    against transformers' PyTorch model under torch.no_grad(). Target: at least 1x.

JAX runs on one CPU device. (Splitting the batch over several forced host devices did not
help: on this XLA:CPU the per-device programs of a shard_map ran one after the other, and
the SPMD-partitioned spectrogram did more total work than the plain one.) Each side runs
once to warm up (compilation, caches), then both run in turn `--repeats` times, so that
load from other processes hits them alike; the median is reported. Ratio = reference time /
JAX time, so above 1 means JAX is faster.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per side after one warm-up run.")
_ONLY = flags.DEFINE_enum("only", None, ["spectrogram", "hubert"], "Run one benchmark only.")
_CLIPS = flags.DEFINE_integer("clips", 64, "Clips in the spectrogram benchmark.")
_HUBERT_BATCH = flags.DEFINE_integer("hubert_batch", 8, "Clips per HuBERT forward.")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "Length of every clip.")


def report(name: str, reference_name: str, medians: dict[str, float], target: float) -> float:
  """Prints the timings and the ratio reference / JAX; returns the ratio."""
  reference, jax_seconds = medians[reference_name], medians["JAX"]
  ratio = reference / jax_seconds
  print(f"{name}: {reference_name} {reference * 1e3:.1f} ms | JAX {jax_seconds * 1e3:.1f} ms | "
        f"ratio {ratio:.2f}x (target >= {target:g}x: {'met' if ratio >= target else 'NOT met'})",
        flush=True)
  for other, seconds in medians.items():
    if other not in (reference_name, "JAX"):
      print(f"    {other}: {seconds * 1e3:.1f} ms (ratio {reference / seconds:.2f}x)", flush=True)
  return ratio


def spectrogram_benchmark(repeats: int) -> float:
  import librosa  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import spectrogram  # pylint: disable=g-import-not-at-top

  sample_rate = 22_050
  clips = (0.1 * np.random.RandomState(0).randn(_CLIPS.value, int(_SECONDS.value * sample_rate))
           ).astype(np.float32)
  lengths = np.full((clips.shape[0],), clips.shape[1], np.int32)
  # librosa.stft and amplitude_to_db defaults, as CLASP called them.
  front_end = spectrogram.FrontEnd(sample_rate=sample_rate)

  def librosa_loop():
    return [librosa.amplitude_to_db(np.abs(librosa.stft(clip))) for clip in clips]

  def jax_batch():
    images, _ = front_end(clips, lengths)
    return np.asarray(images)

  from benchmarks.common import interleaved_medians  # pylint: disable=g-import-not-at-top
  expected, got = librosa_loop()[-1], jax_batch()[-1]
  assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-2, "front-end disagrees"
  medians = interleaved_medians({"librosa loop": librosa_loop, "JAX": jax_batch}, repeats)
  return report(f"(a) spectrogram, {clips.shape[0]} clips x {_SECONDS.value:g} s @ 22.05 kHz",
                "librosa loop", medians, target=5.0)


def hubert_benchmark(repeats: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import compilation  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import wav2vec2_checkpoint  # pylint: disable=g-import-not-at-top
  from clasp_jax.models import wav2vec2  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch_model = transformers.HubertModel(transformers.HubertConfig()).eval()
  config = wav2vec2.Config.from_hf_dict(torch_model.config.to_dict(), with_ctc_head=False)
  params = wav2vec2_checkpoint.convert_state_dict(
      {name: tensor.numpy() for name, tensor in torch_model.state_dict().items()}, config)
  model = wav2vec2.Model(config)
  waveform = np.random.RandomState(0).randn(_HUBERT_BATCH.value, int(_SECONDS.value * 16_000)
                                            ).astype(np.float32)
  torch_waveform = torch.from_numpy(waveform)
  def last_hidden_state(params, waveform):
    return model.apply({"params": params}, waveform)["last_hidden_state"]

  # The same XLA options as the embed / transcribe CLIs (clasp_jax/models/compilation.py).
  forward = compilation.jit_transformer_inference(last_hidden_state)
  plain_forward = jax.jit(last_hidden_state)
  torch_name = f"PyTorch {torch.__version__} ({torch.get_num_threads()} threads)"

  def torch_forward():
    with torch.no_grad():
      return torch_model(torch_waveform).last_hidden_state.numpy()

  def jax_forward():
    return np.asarray(forward(params, jnp.asarray(waveform)))

  def plain_jax_forward():
    return np.asarray(plain_forward(params, jnp.asarray(waveform)))

  from benchmarks.common import interleaved_medians  # pylint: disable=g-import-not-at-top
  difference = np.abs(jax_forward() - torch_forward()).max()
  assert difference < 1e-3, f"Flax and PyTorch disagree by {difference}"
  medians = interleaved_medians({torch_name: torch_forward, "JAX": jax_forward,
                                 "JAX, default XLA options": plain_jax_forward}, repeats)
  return report(f"(b) HuBERT-base forward, batch {waveform.shape[0]} x {_SECONDS.value:g} s "
                "@ 16 kHz", torch_name, medians, target=1.0)


def main(argv):
  del argv
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"{allocator.loaded_allocator()} malloc", flush=True)
  if _ONLY.value in (None, "spectrogram"):
    spectrogram_benchmark(_REPEATS.value)
  if _ONLY.value in (None, "hubert"):
    hubert_benchmark(_REPEATS.value)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clasp_jax.common import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_under_tcmalloc()
  app.run(main)
