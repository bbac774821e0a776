r"""Archive search throughput and latency, against faiss's exact IndexFlatIP in the same run.

  PYTHONPATH=. python benchmarks/search.py                      # 1,000,000 x 768, 1,000 queries
  PYTHONPATH=. python benchmarks/search.py --storage=float16    # rows stored as float16

Builds a random index of unit float32 rows and random unit queries, searches the top-10 of
every query with ours (`clasp_jax.retrieval.search_index.Searcher`, all local devices) and
with faiss-cpu's `IndexFlatIP` (exact, BLAS), timed round-robin so that load from elsewhere
hits both alike, then times single queries. It prints both throughputs (queries/s), their
ratio, the single-query latencies, and whether both return the same top-10: random unit
vectors in 768 dimensions put many scores within float32 rounding of each other near the
10th place, so lists may differ only where float64 scores say the rows tie within --tie_tol.
With --storage=float16 faiss searches the same float16-rounded rows (upcast to float32).
"""

from __future__ import annotations

import logging
import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
import numpy as np

_NUM_ROWS = flags.DEFINE_integer("num_rows", 1_000_000, "Rows in the index.")
_DIM = flags.DEFINE_integer("dim", 768, "Embedding dimension.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 1000, "Queries per batch search.")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_STORAGE = flags.DEFINE_enum("storage", "float32", ("float32", "float16"), "Row storage dtype.")
_BLOCK_ROWS = flags.DEFINE_integer("block_rows", 0, "Rows per block; 0: backend default.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed batch searches of each contender.")
_LATENCY_REPEATS = flags.DEFINE_integer("latency_repeats", 10, "Timed single queries.")
_TIE_TOL = flags.DEFINE_float("tie_tol", 1e-6, "Float64 score gap counted as a tie.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random rows and queries.")


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB.


def unit_rows(rng: np.random.Generator, num: int, dim: int, chunk: int = 65536) -> np.ndarray:
  """(num, dim) random unit float32 rows, built chunk by chunk (no float64 copy of the whole)."""
  out = np.empty((num, dim), np.float32)
  for start in range(0, num, chunk):
    block = rng.standard_normal((min(chunk, num - start), dim), dtype=np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    out[start:start + len(block)] = block
  return out


def compare_top_k(rows: np.ndarray, queries: np.ndarray, ours: np.ndarray, theirs: np.ndarray,
                  tie_tol: float) -> dict[str, int]:
  """Counts queries whose two top-k lists are identical, the same set, or differ only in rows
  that tie (in float64) with the k-th best score; the rest are real disagreements."""
  counts = {"identical": 0, "same_set": 0, "ties_only": 0, "disagree": 0}
  for query, mine, other in zip(queries.astype(np.float64), ours, theirs):
    if np.array_equal(mine, other):
      counts["identical"] += 1
    elif set(mine) == set(other):
      counts["same_set"] += 1
    else:
      differing = np.asarray(sorted(set(mine) ^ set(other)))
      kth = min((rows[mine].astype(np.float64) @ query).min(),
                (rows[other].astype(np.float64) @ query).min())
      gaps = np.abs(rows[differing].astype(np.float64) @ query - kth)
      counts["ties_only" if np.all(gaps <= tie_tol) else "disagree"] += 1
  return counts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # faiss logs at INFO which of its builds it tried; absl would print every line.
  logging.getLogger("faiss").setLevel(logging.WARNING)
  import faiss  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from clasp_jax.common import allocator  # pylint: disable=g-import-not-at-top
  from clasp_jax.retrieval import search_index  # pylint: disable=g-import-not-at-top

  num_rows, dim, num_queries, k = _NUM_ROWS.value, _DIM.value, _NUM_QUERIES.value, _K.value
  from benchmarks.common import cpu_model  # pylint: disable=g-import-not-at-top
  print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); jax {jax.__version__} "
        f"({jax.default_backend()}, {jax.local_device_count()} local device(s)); "
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads); "
        f"{allocator.loaded_allocator()} malloc; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"load average {os.getloadavg()[0]:.1f}")
  rng = np.random.default_rng(_SEED.value)
  start = time.perf_counter()
  rows = unit_rows(rng, num_rows, dim)
  if _STORAGE.value == "float16":
    stored = rows.astype(np.float16)
    rows = stored.astype(np.float32)  # faiss and the check see the same rounded rows.
  else:
    stored = rows
  queries = unit_rows(rng, num_queries, dim)
  print(f"{num_rows:,} x {dim} rows stored as {_STORAGE.value} "
        f"({stored.nbytes / 2**30:.2f} GiB), {num_queries:,} queries, top-{k}; built in "
        f"{time.perf_counter() - start:.1f} s")

  start = time.perf_counter()
  searcher = search_index.Searcher(stored, block_rows=_BLOCK_ROWS.value)
  del stored
  ours_load = time.perf_counter() - start
  start = time.perf_counter()
  flat = faiss.IndexFlatIP(dim)
  flat.add(rows)
  faiss_load = time.perf_counter() - start
  print(f"loaded: ours {ours_load:.1f} s ({searcher.blocks_per_device} blocks of "
        f"{searcher.block} rows per device), faiss {faiss_load:.1f} s; peak RSS "
        f"{peak_rss_gib():.2f} GiB")

  start = time.perf_counter()
  ours_result = searcher.search(queries, k)
  print(f"ours, first batch (with compilation): {time.perf_counter() - start:.2f} s")

  # Round-robin: a burst of load from elsewhere then hits both contenders alike.
  times = {"ours": [], "faiss": []}
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    ours_result = searcher.search(queries, k)
    times["ours"].append(time.perf_counter() - start)
    start = time.perf_counter()
    faiss_scores, faiss_rows = flat.search(queries, k)
    times["faiss"].append(time.perf_counter() - start)
  ours_qps = num_queries / min(times["ours"])
  faiss_qps = num_queries / min(times["faiss"])

  searcher.search(queries[:1], k)  # Compiles the one-query program.
  latency = {"ours": [], "faiss": []}
  for query in queries[:_LATENCY_REPEATS.value]:
    start = time.perf_counter()
    searcher.search(query[None], k)
    latency["ours"].append(time.perf_counter() - start)
    start = time.perf_counter()
    flat.search(query[None], k)
    latency["faiss"].append(time.perf_counter() - start)

  agreement = compare_top_k(rows, queries, ours_result.rows, faiss_rows, _TIE_TOL.value)
  score_error = float(np.max(np.abs(ours_result.scores - faiss_scores)))
  print(f"batch seconds, every run: ours {'/'.join(f'{t:.2f}' for t in times['ours'])}, "
        f"faiss {'/'.join(f'{t:.2f}' for t in times['faiss'])}")
  print(f"throughput (best run): ours {ours_qps:.1f} queries/s, faiss IndexFlatIP "
        f"{faiss_qps:.1f} queries/s, ratio {ours_qps / faiss_qps:.2f}x (target >= 1)")
  print(f"single query, median (best) of {len(latency['ours'])}: ours "
        f"{statistics.median(latency['ours']) * 1e3:.0f} ms "
        f"({min(latency['ours']) * 1e3:.0f} ms), faiss "
        f"{statistics.median(latency['faiss']) * 1e3:.0f} ms "
        f"({min(latency['faiss']) * 1e3:.0f} ms) (target < 1000 ms)")
  print(f"top-{k} vs faiss: {agreement['identical']} identical, {agreement['same_set']} same "
        f"rows in another order, {agreement['ties_only']} differ only by rows tied within "
        f"{_TIE_TOL.value:g} at the {k}th place, {agreement['disagree']} disagree; largest "
        f"score difference {score_error:.2e}")
  print(f"peak resident memory: {peak_rss_gib():.2f} GiB; load average now "
        f"{os.getloadavg()[0]:.1f} (other work on the machine slows both contenders)")
  sys.stdout.flush()
  if agreement["disagree"]:
    sys.exit(1)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clasp_jax.common import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_under_tcmalloc()
  app.run(main)
