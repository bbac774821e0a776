r"""Hard-protocol retrieval speed and memory, side by side with references measured in the same run.

  PYTHONPATH=. python benchmarks/retrieval.py                  # speed: N = 11,411, d = 768
  PYTHONPATH=. python benchmarks/retrieval.py --mode=scale     # 500,000 speech x 1,000 queries

Speed mode times, on the same random paired embeddings (with the paper's 355 duplicate texts
planted): the bare float32 matrix product of the full N x N shape in NumPy and in JAX (the
floor: any evaluation has to compute those scores), a NumPy vectorised reference (full matrix,
then both directions' ranks), ours (`clasp_jax.retrieval.scoring`, both directions in one blocked walk,
with and without the tie counts that tie skipping needs), and the original per-pair cosine
loop timed on --loop_rows rows and extrapolated to N rows. It prints seconds and ratios and
checks that our ranks equal the NumPy reference's.

Scale mode builds 500,000 clip embeddings and 1,000 text queries paired with random clips,
scores both directions, checks a sample of ranks against NumPy and prints the peak resident
memory of the process (`resource.getrusage`), which must stay under 4 GB.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clasp_jax.retrieval import metrics as metrics_lib
from clasp_jax.retrieval import scoring

_MODE = flags.DEFINE_enum("mode", "speed", ("speed", "scale"), "What to measure.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 11411, "Speed mode: pairs (the paper's test set).")
_DIM = flags.DEFINE_integer("dim", 768, "Embedding dimension.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Speed mode: timed runs; the best is reported.")
_LOOP_ROWS = flags.DEFINE_integer("loop_rows", 3, "Speed mode: rows of the per-pair loop timed.")
_LOOP = flags.DEFINE_enum("loop", "auto", ("auto", "torch", "numpy"),
                          "Speed mode: the per-pair loop's arithmetic; auto: torch if installed "
                          "(the authors' library), else NumPy.")
_NUM_SPEECH = flags.DEFINE_integer("num_speech", 500_000, "Scale mode: clips in the archive.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 1000, "Scale mode: text queries.")
_CHECK_QUERIES = flags.DEFINE_integer("check_queries", 20,
                                      "Scale mode: queries re-ranked with NumPy as a check.")
_BLOCK = flags.DEFINE_integer("block", 0, "Tile size (rows and columns); 0: backend default.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random embeddings.")


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB.


def unit_rows(rng: np.random.Generator, num: int, dim: int, chunk: int = 65536) -> np.ndarray:
  """(num, dim) random unit rows, built chunk by chunk so no float64 copy of the whole exists."""
  out = np.empty((num, dim), np.float32)
  for start in range(0, num, chunk):
    block = rng.standard_normal((min(chunk, num - start), dim), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    out[start:start + len(block)] = block
  return out


def noisy_copy(rng: np.random.Generator, rows: np.ndarray, noise: float) -> np.ndarray:
  """Unit rows near `rows`, so gold items rank high but not always first."""
  scale = np.float32(noise / np.sqrt(rows.shape[1]))  # A float64 scalar would promote to f64.
  out = rows + scale * rng.standard_normal(rows.shape, dtype=np.float32)
  out /= np.linalg.norm(out, axis=1, keepdims=True)
  assert out.dtype == np.float32, out.dtype
  return out


def best_times(contenders: dict, repeats: int):
  """Best seconds of each contender over `repeats` round-robin rounds, and its last result."""
  times = {name: [] for name in contenders}
  results = {}
  for _ in range(repeats):
    for name, fn in contenders.items():
      start = time.perf_counter()
      results[name] = fn()
      times[name].append(time.perf_counter() - start)
  return times, [min(times[name]) for name in contenders], results


def blocking() -> scoring.Blocking:
  return scoring.make_blocking(_BLOCK.value, _BLOCK.value)


def numpy_reference(zspeech: np.ndarray, ztext: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both directions' ranks from the full matrix, vectorised."""
  scores = zspeech @ ztext.T  # (n, d) @ (d, n) -> (n, n)
  gold = np.diagonal(scores)
  speech_ranks = 1 + np.sum(scores > gold[:, None], axis=1)
  text_ranks = 1 + np.sum(scores > gold[None, :], axis=0)
  return speech_ranks, text_ranks


def cosine_loop_rows(zspeech: np.ndarray, ztext: np.ndarray, rows: int,
                     library: str) -> float:
  """Seconds per row of the original evaluation: one cosine call per (speech, text) pair.

  The authors' notebooks were PyTorch, so 'torch' calls torch's cosine_similarity per pair as
  they did; 'numpy' is the same loop with NumPy arithmetic.
  """
  if library == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    speech = torch.from_numpy(zspeech)
    text = torch.from_numpy(ztext)
    cosine = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))
  else:
    speech, text = zspeech, ztext
    cosine = lambda a, b: float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
  start = time.perf_counter()
  for i in range(rows):
    row = [cosine(speech[i], text[j]) for j in range(len(text))]
  del row
  return (time.perf_counter() - start) / rows


def loop_library() -> str:
  if _LOOP.value != "auto":
    return _LOOP.value
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    return "torch"
  except ImportError:
    return "numpy"


def speed() -> None:
  num, dim = _NUM_ITEMS.value, _DIM.value
  rng = np.random.default_rng(_SEED.value)
  zspeech = unit_rows(rng, num, dim)
  ztext = noisy_copy(rng, zspeech, 8.0)  # Gold cosine ~0.12: ranks spread out.
  # The paper's test set repeats 355 texts; identical texts embed identically.
  originals = rng.choice(num, 355, replace=False)
  duplicates = rng.choice(np.setdiff1d(np.arange(num), originals), 355, replace=False)
  ztext[duplicates] = ztext[originals]
  keys = np.arange(num)
  repeats = _REPEATS.value
  print(f"backend {jax.default_backend()} ({jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind}), N = {num}, d = {dim}, best of {repeats}, "
        f"{allocator.loaded_allocator()} malloc")

  jax_dot = jax.jit(lambda a, b: jax.lax.dot_general(
      a, b, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST))
  speech_device, text_device = jnp.asarray(zspeech), jnp.asarray(ztext)

  def ours(count_ties):
    return scoring.score_both_ways(zspeech, ztext, keys, keys, count_ties=count_ties,
                                   blocking=blocking())

  jax_dot(speech_device, text_device).block_until_ready()
  start = time.perf_counter()
  ours(False)
  first_call = time.perf_counter() - start
  ours(True)  # Compiles the tie-counting walk outside the timing.
  # Round-robin repeats: a burst of load from elsewhere then hits every contender alike.
  times, (numpy_matmul, jax_matmul, numpy_time, ours_time, ties_time), results = best_times({
      "numpy_matmul": lambda: zspeech @ ztext.T,
      "jax_matmul": lambda: jax_dot(speech_device, text_device).block_until_ready(),
      "numpy_reference": lambda: numpy_reference(zspeech, ztext),
      "ours": lambda: ours(False),
      "ours_ties": lambda: ours(True),
  }, repeats)
  del speech_device, text_device
  floor = min(numpy_matmul, jax_matmul)
  numpy_speech_ranks, numpy_text_ranks = results["numpy_reference"]
  speech_counts, text_counts = results["ours"]
  speech_tied, _ = results["ours_ties"]

  library = loop_library()
  loop_row = cosine_loop_rows(zspeech, ztext, _LOOP_ROWS.value, library)
  loop_total = loop_row * num

  speech_mismatch = int(np.sum(speech_counts.ranks != numpy_speech_ranks))
  text_mismatch = int(np.sum(text_counts.ranks != numpy_text_ranks))
  table = [
      ("bare matmul, NumPy", numpy_matmul),
      ("bare matmul, JAX", jax_matmul),
      ("NumPy vectorised reference, both directions", numpy_time),
      ("ours, both directions", ours_time),
      ("ours, both directions + tie counts", ties_time),
      (f"per-pair cosine loop, {library} ({_LOOP_ROWS.value} rows, extrapolated)", loop_total),
  ]
  print(f"{'':54s} {'seconds':>10s} {'x floor':>8s}")
  for name, seconds in table:
    print(f"{name:54s} {seconds:10.3f} {seconds / floor:8.2f}")
  print(f"ours, first call (with compilation): {first_call:.3f} s; every run (s): " +
        ", ".join(f"{name} " + "/".join(f"{t:.2f}" for t in runs) for name, runs in times.items()))
  print(f"per-pair loop: {loop_row:.3f} s a row, {loop_total / 3600:.2f} h in all; "
        f"ours is {loop_total / ours_time:,.0f}x faster")
  print(f"ours vs NumPy reference: {ours_time / numpy_time:.2f}x the time "
        f"({'faster' if ours_time < numpy_time else 'SLOWER'}); "
        f"{ours_time / floor:.2f}x the bare matmul floor (target <= 1.5)")
  planted = np.zeros(num, bool)
  planted[originals] = planted[duplicates] = True
  differing = speech_counts.ranks != numpy_speech_ranks
  print(f"ranks differing from NumPy: speech->text {speech_mismatch}, "
        f"text->speech {text_mismatch} of {num}; speech->text at planted duplicates: "
        f"{int(np.sum(differing & planted))}, NumPy's rank higher there: "
        f"{int(np.sum(differing & planted & (numpy_speech_ranks > speech_counts.ranks)))}")
  full = zspeech @ ztext.T  # (n, d) @ (d, n) -> (n, n), NumPy's scores once more.
  numpy_ties = int(np.sum(full[originals, originals] == full[originals, duplicates]))
  del full
  print(f"planted duplicate texts seen as exact ties: ours "
        f"{int(np.sum(speech_tied.ties[originals] >= 1))}/355, NumPy's full product "
        f"{numpy_ties}/355 (its kernel rounds identical columns apart by position)")
  for direction, counts in (("speech_to_text", speech_counts), ("text_to_speech", text_counts)):
    summary = metrics_lib.metrics_from_ranks(counts.ranks)
    print(f"{direction}: hits@1 {summary['hits@1']:.4f} mrr {summary['mrr']:.4f} "
          f"mean rank {summary['mean_rank']:.1f}")


def scale() -> None:
  num_speech, num_queries, dim = _NUM_SPEECH.value, _NUM_QUERIES.value, _DIM.value
  rng = np.random.default_rng(_SEED.value)
  print(f"backend {jax.default_backend()} ({jax.device_count()} device(s)), "
        f"{num_speech} clips x {num_queries} text queries, d = {dim}")
  start = time.perf_counter()
  zspeech = unit_rows(rng, num_speech, dim)
  gold = rng.choice(num_speech, num_queries, replace=False)
  ztext = noisy_copy(rng, zspeech[gold], 6.0)  # Gold cosine ~0.16: a few clips outrank it.
  print(f"embeddings built in {time.perf_counter() - start:.1f} s; speech alone is "
        f"{zspeech.nbytes / 2**30:.2f} GiB, a full score matrix would be "
        f"{num_speech * num_queries * 4 / 2**30:.2f} GiB (and N x N "
        f"{num_speech ** 2 * 4 / 2**40:.2f} TiB); peak RSS so far {peak_rss_gib():.2f} GiB")
  start = time.perf_counter()
  speech_counts, text_counts = scoring.score_both_ways(
      zspeech, ztext, np.arange(num_speech), gold, count_ties=True, blocking=blocking(),
      progress=lambda line: print(line, flush=True))
  elapsed = time.perf_counter() - start
  print(f"scored both directions in {elapsed:.1f} s")
  mismatches = 0
  checked = rng.choice(num_queries, min(_CHECK_QUERIES.value, num_queries), replace=False)
  for query in checked:
    scores = zspeech @ ztext[query]  # (n, d) @ (d,) -> (n,)
    want = 1 + int(np.sum(scores > scores[gold[query]]))
    near = int(np.sum(np.abs(scores - scores[gold[query]]) < 1e-6)) - 1
    mismatches += not want - near <= text_counts.ranks[query] <= want + near
  print(f"text->speech ranks checked against NumPy: {len(checked) - mismatches}/{len(checked)} "
        "agree (up to float32 near-ties)")
  for direction, counts in (("speech_to_text", speech_counts), ("text_to_speech", text_counts)):
    summary = metrics_lib.metrics_from_ranks(counts.ranks[counts.is_query])
    print(f"{direction}: {int(counts.is_query.sum())} queries, hits@1 {summary['hits@1']:.4f} "
          f"mrr {summary['mrr']:.4f} mean rank {summary['mean_rank']:.1f}")
  peak = peak_rss_gib()
  print(f"peak resident memory: {peak:.2f} GiB ({peak * 2**30 / 1e9:.2f} GB; "
        f"target < 4 GB: {'met' if peak * 2**30 < 4e9 else 'NOT met'})")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  speed() if _MODE.value == "speed" else scale()
  sys.stdout.flush()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clasp_jax.common import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_under_tcmalloc()
  app.run(main)
