"""Archive search index: exact blocked top-k against NumPy, incremental updates, atomic writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from clasp_jax.retrieval import search_index as si

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def integer_rows(rng, num, dim):
  """Rows of small integers: every score is an exact small integer in any summation order,
  so ties are real ties whatever kernel computes them, and there are many of them."""
  return rng.integers(-2, 3, size=(num, dim)).astype(np.float32)


def tied_archive(seed=0, num=1000, dim=16):
  rng = np.random.default_rng(seed)
  rows = integer_rows(rng, num, dim)
  # Row 0 is all +-2: no other row scores as high against it except its copies.
  rows[0] = 2 * rng.choice([-1, 1], dim)
  # Duplicate recordings: the same clip stored twice, far apart and in other blocks.
  originals = 1 + rng.choice(num // 2 - 1, 40, replace=False)
  rows[num // 2 + originals] = rows[originals]
  rows[num - 1] = rows[0]  # In the ragged last block.
  queries = integer_rows(rng, 13, dim)
  queries[0] = rows[0]  # Its best rows are 0 and num - 1, with the same score.
  return rows, queries


def assert_same(result, reference):
  np.testing.assert_array_equal(result.rows, reference.rows)
  np.testing.assert_array_equal(result.scores, reference.scores)


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("block_rows,k", [
    (64, 1),      # 3 full blocks per device on 8 devices, grouped selection (2 * k * 32 <= 64)
    (64, 7),      # whole-block selection
    (320, 5),     # grouped selection over 10 groups
    (64, 1500),   # k > rows
])
def test_matches_numpy_with_ties_and_duplicates(num_devices, block_rows, k):
  rows, queries = tied_archive()
  searcher = si.Searcher(rows, block_rows=block_rows, devices=jax.devices()[:num_devices],
                         max_queries=8)  # 13 queries: two calls, the second padded.
  assert searcher.blocks_per_device * searcher.block * num_devices > len(rows)  # ragged tail
  result = searcher.search(queries, k)
  reference = si.reference_top_k(rows, queries, k)
  assert result.rows.shape == (len(queries), min(k, len(rows)))
  assert_same(result, reference)
  # The planted duplicate of row 0 follows it: equal score, lower row first.
  np.testing.assert_array_equal(result.rows[0, :2] if k > 1 else result.rows[0], [0, 999][:k])
  if k > 1:
    assert result.scores[0, 0] == result.scores[0, 1]


@pytest.mark.parametrize("block_rows,blocks", [(64, 16), (640, 2)])
def test_ties_at_kth_place_single_device(block_rows, blocks):
  """d = 4: scores in [-16, 16], so the k-th place is shared by many rows in many groups and
  blocks; the lower rows must win (640-row blocks select through 32-row groups for k <= 10)."""
  rows, queries = tied_archive(seed=1, num=1000, dim=4)
  searcher = si.Searcher(rows, block_rows=block_rows, devices=jax.devices()[:1])
  assert searcher.blocks_per_device == blocks
  for k in (1, 3, 10, 100):
    assert_same(searcher.search(queries, k), si.reference_top_k(rows, queries, k))


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("block_rows,k", [(64, 1), (64, 5), (640, 10)])
def test_padding_rows_never_win(num_devices, block_rows, k):
  """Every real score is negative, so a zero padding row would beat them all if unmasked."""
  rng = np.random.default_rng(4)
  rows = 1 + np.abs(integer_rows(rng, 1001, 8))
  rows[-1] = 1  # The best row shares its group (and block) with padding rows.
  queries = -np.ones((2, 8), np.float32)
  searcher = si.Searcher(rows, block_rows=block_rows, devices=jax.devices()[:num_devices])
  assert searcher.blocks_per_device * searcher.block * num_devices > len(rows)
  assert_same(searcher.search(queries, k), si.reference_top_k(rows, queries, k))


@pytest.mark.parametrize("num_devices", [1, 8])
def test_random_unit_rows_match_numpy(num_devices):
  rng = np.random.default_rng(2)
  rows = si.unit_rows(rng.standard_normal((3000, 96)))
  duplicates = rng.choice(3000, 50, replace=False)
  rows[duplicates[25:]] = rows[duplicates[:25]]
  queries = si.unit_rows(rng.standard_normal((20, 96)))
  queries[:5] = rows[duplicates[:5]]  # Queries whose best hit has a duplicate.
  searcher = si.Searcher(rows, block_rows=256, devices=jax.devices()[:num_devices])
  result = searcher.search(queries, 10)
  reference = si.reference_top_k(rows, queries, 10)
  # Two kernels round a float32 dot product differently in the last bit, so near-ties may
  # swap; anything else must agree.
  np.testing.assert_allclose(result.scores, reference.scores, atol=2e-6)
  differ = result.rows != reference.rows
  gaps = np.abs(np.diff(reference.scores, axis=1))
  near_tie = np.zeros_like(differ)
  near_tie[:, 1:] |= gaps < 2e-6
  near_tie[:, :-1] |= gaps < 2e-6
  assert not np.any(differ & ~near_tie), np.argwhere(differ & ~near_tie)
  # Identical rows score identically, wherever they sit in their blocks.
  for query, original in enumerate(duplicates[:5]):
    twin = duplicates[25 + query]
    assert list(result.rows[query, :2]) == sorted([original, twin])
    assert result.scores[query, 0] == result.scores[query, 1]


@pytest.mark.parametrize("num_devices", [1, 8])
def test_float16_storage(num_devices):
  rng = np.random.default_rng(3)
  entries = [si.Entry(f"/archive/{i}.wav", 1, 1) for i in range(700)]
  index = si.SearchIndex.build(entries, rng.standard_normal((700, 32)), dtype="float16")
  assert index.embeddings.dtype == np.float16
  queries = si.unit_rows(rng.standard_normal((9, 32)))
  searcher = si.Searcher(index.embeddings, block_rows=128, devices=jax.devices()[:num_devices])
  assert searcher.blocks.dtype == np.float16  # Half the device memory; upcast per block.
  result = searcher.search(queries, 10)
  reference = si.reference_top_k(index.embeddings.astype(np.float32), queries, 10)
  np.testing.assert_allclose(result.scores, reference.scores, atol=2e-6)
  np.testing.assert_array_equal(result.rows, reference.rows)
  # Exact ties survive float16 storage too.
  ints = integer_rows(rng, 700, 16)
  ints[650] = ints[3]
  searcher = si.Searcher(ints.astype(np.float16), block_rows=64,
                         devices=jax.devices()[:num_devices])
  assert_same(searcher.search(ints[[3, 4]], 20), si.reference_top_k(ints, ints[[3, 4]], 20))


def test_small_and_empty_indexes():
  rows = np.eye(3, 8, dtype=np.float32)
  searcher = si.Searcher(rows)  # 3 rows over 8 devices: most devices hold only padding
  result = searcher.search(rows[[2]], 10)
  np.testing.assert_array_equal(result.rows, [[2, 0, 1]])
  np.testing.assert_array_equal(result.scores, [[1, 0, 0]])
  empty = si.Searcher(np.zeros((0, 8), np.float32))
  assert empty.search(rows, 5).rows.shape == (3, 0)
  with pytest.raises(ValueError, match="k must be positive"):
    searcher.search(rows, 0)
  with pytest.raises(ValueError, match=r"queries must be \(n, 8\)"):
    searcher.search(np.zeros((1, 7)), 1)


# ------------------------------------------------------------------------------------------
# Storage and incremental updates.
# ------------------------------------------------------------------------------------------


def fake_embedding(path, dim=8):
  """A deterministic stand-in for the audio tower: the file's bytes seed the vector."""
  with open(path, "rb") as file:
    seed = int.from_bytes(file.read()[:8].ljust(8, b"\0"), "little")
  return np.random.default_rng(seed).standard_normal(dim)


class RecordingEmbedder:
  def __init__(self, fail_after_calls=None):
    self.calls = []
    self.fail_after_calls = fail_after_calls

  def __call__(self, paths):
    if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
      raise RuntimeError("embedding run killed")
    self.calls.append(list(paths))
    return np.stack([fake_embedding(path) for path in paths])

  @property
  def embedded(self):
    return [path for call in self.calls for path in call]


def write_clip(path, payload: bytes, mtime_ns=None):
  with open(path, "wb") as file:
    file.write(payload)
  if mtime_ns is not None:
    os.utime(path, ns=(mtime_ns, mtime_ns))
  return str(path)


def make_archive(folder, num=6):
  folder.mkdir(exist_ok=True)
  return [write_clip(folder / f"clip{i}.wav", f"clip-{i}".encode(), 10**18 + i)
          for i in range(num)]


def test_update_embeds_only_new_and_changed_files(tmp_path):
  paths = make_archive(tmp_path / "audio")
  folder = tmp_path / "index"
  model = si.ModelInfo("/runs/clasp", 1000)
  embedder = RecordingEmbedder()
  index, plan = si.update_index(folder, paths, embedder, model=model, batch_size=4,
                                transcribe=lambda ps: [os.path.basename(p) for p in ps])
  assert len(plan.new) == 6 and not plan.changed and not plan.removed
  assert embedder.embedded == paths and [len(call) for call in embedder.calls] == [4, 2]
  assert [entry.path for entry in index.entries] == paths
  assert index.entries[2].transcript == "clip2.wav"
  np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1, rtol=1e-6)
  meta = json.loads((folder / "index.json").read_text())
  assert (meta["dim"], meta["dtype"], meta["count"]) == (8, "float32", 6)
  assert meta["model"] == {"workdir": "/runs/clasp", "step": 1000}
  before = np.array(index.embeddings)

  # Nothing changed: nothing embedded, nothing written.
  embedder = RecordingEmbedder()
  again, plan = si.update_index(folder, paths, embedder, model=model)
  assert plan.is_noop and embedder.calls == [] and len(plan.unchanged) == 6
  assert json.loads((folder / "index.json").read_text())["generation"] == meta["generation"]

  # clip1: rewritten at the same size; clip2: only touched; clip3 removed; clip6 added.
  write_clip(paths[1], b"CLIP-1", 10**18 + 50)
  os.utime(paths[2], ns=(10**18 + 99, 10**18 + 99))
  os.remove(paths[3])
  added = write_clip(tmp_path / "audio" / "clip6.wav", b"clip-6-new", 10**18 + 6)
  current = [paths[0], paths[1], paths[2], paths[4], paths[5], added]
  embedder = RecordingEmbedder()
  index, plan = si.update_index(folder, current, embedder, model=model)
  assert [stat.path for stat in plan.new] == [added]
  assert [stat.path for stat in plan.changed] == [paths[1], paths[2]]
  assert plan.removed == (paths[3],)
  assert plan.unchanged == (paths[0], paths[4], paths[5])
  assert embedder.embedded == [paths[1], paths[2], added]
  assert [entry.path for entry in index.entries] == [paths[0], paths[4], paths[5], paths[1],
                                                      paths[2], added]
  np.testing.assert_array_equal(index.embeddings[:3], before[[0, 4, 5]])  # copied, not redone
  np.testing.assert_allclose(index.embeddings[3], si.unit_rows(
      fake_embedding(paths[1])[None])[0], rtol=1e-6)
  assert index.entries[4].mtime_ns == 10**18 + 99
  assert index.entries[0].transcript == "clip0.wav"  # Kept with its row.
  # Only the current generation's files remain.
  assert sorted(os.listdir(folder)) == sorted(
      ["index.json", "embeddings-000002.npy", "entries-000002.jsonl"])

  # Another checkpoint: every row is re-embedded.
  embedder = RecordingEmbedder()
  index, plan = si.update_index(folder, current, embedder, model=si.ModelInfo("/runs/clasp", 2000))
  assert plan.model_changed and len(plan.changed) == 6 and sorted(embedder.embedded) == sorted(
      current)
  assert index.model == si.ModelInfo("/runs/clasp", 2000)

  # Every file gone: an empty index, still searchable.
  index, plan = si.update_index(folder, [], RecordingEmbedder(),
                                model=si.ModelInfo("/runs/clasp", 2000))
  assert len(index) == 0 and len(plan.removed) == 6 and index.dim == 8


def test_files_an_embedder_sets_aside_stay_out_and_are_tried_again(tmp_path):
  paths = make_archive(tmp_path / "audio")
  folder = tmp_path / "index"
  broken = {paths[1], paths[4]}
  calls = []

  def embed_some(batch):
    calls.append(list(batch))
    kept = np.array([path not in broken for path in batch])
    rows = [fake_embedding(path) for path in batch if path not in broken]
    return si.PartialBatch(np.stack(rows) if rows else np.zeros((0, 8)), kept)

  transcribed = []
  index, _ = si.update_index(folder, paths, embed_some, batch_size=2,
                             transcribe=lambda batch: transcribed.extend(batch) or
                             [os.path.basename(p) for p in batch])
  assert [entry.path for entry in index.entries] == [p for p in paths if p not in broken]
  assert transcribed == [p for p in paths if p not in broken]  # Only kept files.
  np.testing.assert_allclose(index.embeddings[1], si.unit_rows(
      fake_embedding(paths[2])[None])[0], rtol=1e-6)  # Rows stay with their files.
  assert index.entries[1].transcript == "clip2.wav"

  broken.discard(paths[4])  # Readable now: the next update embeds it, and only the skipped.
  calls.clear()
  index, plan = si.update_index(folder, paths, embed_some, batch_size=2)
  assert [stat.path for stat in plan.new] == [paths[1], paths[4]]
  assert calls == [[paths[1], paths[4]]]
  assert len(index) == 5 and paths[4] in [entry.path for entry in index.entries]

  broken.update(paths)  # Nothing readable and no index yet: a clear error, no index.
  with pytest.raises(ValueError, match="none of the 6 audio files could be embedded"):
    si.update_index(tmp_path / "other", paths, embed_some)
  assert not (tmp_path / "other" / "index.json").exists()


def test_find_audio_files(tmp_path):
  for name in ("b/2.FLAC", "b/1.wav", "a.mp3", "notes.txt", ".hidden.wav", "c/d/e.ogg"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"x")
  found = si.find_audio_files(tmp_path)
  assert found == [str(tmp_path / name) for name in ("a.mp3", "b/1.wav", "b/2.FLAC",
                                                     "c/d/e.ogg")]


def test_float16_index_roundtrip_and_dtype_is_kept(tmp_path):
  paths = make_archive(tmp_path / "audio", 3)
  index, _ = si.update_index(tmp_path / "index", paths, RecordingEmbedder(), dtype="float16")
  assert index.dtype == "float16" and isinstance(index.embeddings, np.memmap)
  paths.append(write_clip(tmp_path / "audio" / "more.wav", b"more"))
  index, _ = si.update_index(tmp_path / "index", paths, RecordingEmbedder())
  assert index.dtype == "float16" and len(index) == 4
  with pytest.raises(ValueError, match="stores float16"):
    si.update_index(tmp_path / "index", paths, RecordingEmbedder(), dtype="float32")


def test_killed_embedding_run_resumes_from_last_commit(tmp_path):
  paths = make_archive(tmp_path / "audio", 10)
  folder = tmp_path / "index"
  with pytest.raises(RuntimeError, match="killed"):
    si.update_index(folder, paths, RecordingEmbedder(fail_after_calls=3), batch_size=2,
                    commit_every=4)
  assert len(si.SearchIndex.load(folder)) == 4  # Committed after calls 2, not after 3.
  embedder = RecordingEmbedder()
  index, plan = si.update_index(folder, paths, embedder, batch_size=2)
  assert embedder.embedded == paths[4:] and len(plan.unchanged) == 4 and len(index) == 10


def test_missing_index_is_a_clear_error(tmp_path):
  with pytest.raises(si.IndexMissingError, match="no search index in .*index.json is missing"):
    si.SearchIndex.load(tmp_path)
  with pytest.raises(ValueError, match="no audio files to index"):
    si.update_index(tmp_path / "index", [], RecordingEmbedder())


CRASHING_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from clasp_jax.retrieval import search_index as si

    folder, where = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    entries = [si.Entry(f"/new/{i}.wav", i, i) for i in range(300)]
    rows = si.unit_rows(np.random.default_rng(1).standard_normal((300, 8)))

    def chunks():
      yield rows[:100]
      if where == "rows":
        die()  # Half of the new embeddings written.
      yield rows[100:]

    real_replace = os.replace
    def replace(source, target):
      if where == "commit" and os.path.basename(target) == "index.json":
        die()  # Every data file on disk, index.json not yet switched.
      real_replace(source, target)
    os.replace = replace
    si.write_index(folder, entries, chunks(), dim=8, dtype="float32")
""")


@pytest.mark.parametrize("where", ["rows", "commit"])
def test_index_survives_a_killed_write(tmp_path, where):
  folder = tmp_path / "index"
  old = si.SearchIndex.build([si.Entry("/old/a.wav", 1, 2, "hello"), si.Entry("/old/b.wav", 3, 4)],
                             np.eye(2, 8), model=si.ModelInfo("/runs/x", 7))
  old.save(folder)
  environment = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  process = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(folder), where],
                           env=environment, capture_output=True, text=True, timeout=120)
  assert process.returncode == -signal.SIGKILL, process.stderr
  assert len(os.listdir(folder)) > 3  # The dead writer's files are still lying there...
  survived = si.SearchIndex.load(folder)  # ...but the index is the old one, whole.
  assert survived.entries == old.entries and survived.model == old.model
  np.testing.assert_array_equal(survived.embeddings, old.embeddings)
  # The next write takes over and sweeps the leftovers away.
  si.SearchIndex.build([si.Entry("/new/c.wav", 5, 6)], np.ones((1, 8))).save(folder)
  assert [entry.path for entry in si.SearchIndex.load(folder).entries] == ["/new/c.wav"]
  assert len(os.listdir(folder)) == 3
