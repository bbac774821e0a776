"""Archive search: an on-disk index of clip embeddings and exact top-k search over it.

The index is a folder:

  index.json                  format version, dim, dtype, row count, the model that embedded
                              the rows (training workdir and checkpoint step), the data files
  embeddings-<gen>.npy        (n, dim) unit rows, float32 or float16
  entries-<gen>.jsonl         one JSON object per row: path, size, mtime_ns, transcript

Writes are atomic. Each write makes a new generation of the two data files next to the old
ones and then replaces index.json, which names them, with one `os.replace`: a run killed at any
point leaves either the old index or the new one, never a mix. Files of other generations are
deleted after the switch (a reader that already mapped them keeps its copy: POSIX frees an
unlinked file only when its last user closes it).

Incremental updates compare the archive's current files with the entries by size and mtime:
only new and changed files are embedded; unchanged rows are copied over and removed files
dropped. Rows made by another model (workdir or step) are re-embedded, since scores across
models mean nothing.

Search is exact. `Searcher` puts the rows on the devices once, cut into fixed-size blocks
(one compile serves every block; the last is padded and its padding masked out) and split
over a 'data' mesh of all local devices. Each device walks its blocks, scores them against
the queries and merges each block into a running top-k, so device memory beyond the index is
one block's (queries, block) scores. Ties go to the lower row, on one device or many.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = "data"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
STORAGE_DTYPES = ("float32", "float16")
# Data files carry their generation, so a new index is written beside the old one.
_DATA_FILE = re.compile(r"^(embeddings-\d+\.npy|entries-\d+\.jsonl|index\.json\.tmp)$")
# Rows copied per step when an index is rewritten: bounds the host memory an update needs.
_COPY_ROWS = 65536

ProgressFn = Callable[[str], None]


class IndexMissingError(FileNotFoundError):
  """The folder holds no search index (no index.json)."""


class IndexFormatError(ValueError):
  """An index folder whose files disagree with each other or with this code."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """Which model embedded the rows; rows of different models are not comparable."""

  workdir: Optional[str] = None
  step: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class FileStat:
  """What identifies one version of an audio file: absolute path, size and mtime."""

  path: str
  size: int
  mtime_ns: int


@dataclasses.dataclass(frozen=True)
class Entry:
  """One indexed recording (one row of the index)."""

  path: str
  size: int
  mtime_ns: int
  transcript: Optional[str] = None

  @property
  def stat(self) -> FileStat:
    return FileStat(self.path, self.size, self.mtime_ns)


AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm")


def find_audio_files(root: str | os.PathLike,
                     extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[str]:
  """Absolute paths of the audio files under `root`, sorted, so that a re-scan of an
  unchanged archive lists the same files in the same order."""
  extensions = tuple(extension.lower() for extension in extensions)
  found = []
  for folder, subfolders, names in os.walk(os.path.abspath(os.fspath(root))):
    subfolders.sort()
    found.extend(os.path.join(folder, name) for name in sorted(names)
                 if name.lower().endswith(extensions) and not name.startswith("."))
  return found


def stat_files(paths: Iterable[str | os.PathLike]) -> list[FileStat]:
  """Absolute path, size and mtime of each file, first occurrence of a path only."""
  seen = set()
  stats = []
  for path in paths:
    path = os.path.abspath(os.fspath(path))
    if path in seen:
      continue
    seen.add(path)
    info = os.stat(path)
    stats.append(FileStat(path, info.st_size, info.st_mtime_ns))
  return stats


def unit_rows(vectors: np.ndarray, names: Optional[Sequence[str]] = None) -> np.ndarray:
  """(n, d) float32 rows scaled to unit length; a zero or non-finite row is an error."""
  vectors = np.asarray(vectors, np.float32)
  if vectors.ndim != 2:
    raise ValueError(f"embeddings must be (rows, dim), got shape {vectors.shape}")
  norms = np.linalg.norm(vectors, axis=1)
  bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
  if len(bad):
    which = names[bad[0]] if names is not None else f"row {bad[0]}"
    raise ValueError(f"{len(bad)} embedding(s) are zero or not finite, first: {which}")
  return vectors / norms[:, None]


def _check_dtype(dtype: str) -> str:
  dtype = np.dtype(dtype).name
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"index rows are stored as one of {STORAGE_DTYPES}, not {dtype}")
  return dtype


@dataclasses.dataclass
class SearchIndex:
  """Unit embeddings of an archive's recordings with one entry per row.

  Attributes:
    embeddings: (n, dim) in the storage dtype; a read-only memory map once loaded.
    entries: n entries, row order.
    model: the model that made the rows.
  """

  embeddings: np.ndarray
  entries: list[Entry]
  model: ModelInfo = ModelInfo()

  def __post_init__(self):
    if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.entries):
      raise IndexFormatError(f"{len(self.entries)} entries for embeddings of shape "
                             f"{self.embeddings.shape}")
    _check_dtype(self.embeddings.dtype)
    paths = [entry.path for entry in self.entries]
    if len(set(paths)) != len(paths):
      raise IndexFormatError("an index lists each file once; some paths repeat")

  @classmethod
  def build(cls, entries: Sequence[Entry], embeddings: np.ndarray, *, dtype: str = "float32",
            model: ModelInfo = ModelInfo()) -> "SearchIndex":
    """An in-memory index; rows are normalised in float32, then stored as `dtype`."""
    rows = unit_rows(embeddings, [entry.path for entry in entries])
    return cls(rows.astype(_check_dtype(dtype)), list(entries), model)

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]

  @property
  def dtype(self) -> str:
    return self.embeddings.dtype.name

  def __len__(self) -> int:
    return len(self.entries)

  def save(self, folder: str | os.PathLike) -> None:
    """Writes the index atomically (see the module docstring)."""
    chunks = (self.embeddings[start:start + _COPY_ROWS]
              for start in range(0, len(self), _COPY_ROWS))
    write_index(folder, self.entries, chunks, dim=self.dim, dtype=self.dtype, model=self.model)

  @classmethod
  def load(cls, folder: str | os.PathLike, *, mmap: bool = True) -> "SearchIndex":
    """Reads an index; with `mmap` the rows stay on disk until used."""
    # A writer may switch generations between reading index.json and opening its files; the
    # next index.json then names files that exist.
    for attempt in range(3):
      meta = read_meta(folder)
      try:
        return cls._load_files(folder, meta, mmap)
      except FileNotFoundError:
        if attempt == 2 or read_meta(folder) == meta:
          raise
    raise AssertionError("unreachable")

  @classmethod
  def _load_files(cls, folder, meta: dict, mmap: bool) -> "SearchIndex":
    folder = os.fspath(folder)
    embeddings = np.load(os.path.join(folder, meta["embeddings"]),
                         mmap_mode="r" if mmap else None, allow_pickle=False)
    with open(os.path.join(folder, meta["entries"]), encoding="utf-8") as lines:
      entries = [Entry(**json.loads(line)) for line in lines if line.strip()]
    expected = (meta["count"], meta["dim"])
    if embeddings.shape != expected or embeddings.dtype.name != meta["dtype"]:
      raise IndexFormatError(f"{folder}: {meta['embeddings']} holds {embeddings.dtype.name} "
                             f"{embeddings.shape}, index.json says {meta['dtype']} {expected}")
    model = ModelInfo(**meta.get("model", {}))
    return cls(embeddings, entries, model)


def read_meta(folder: str | os.PathLike) -> dict:
  """index.json of an index folder; IndexMissingError when there is none."""
  path = os.path.join(os.fspath(folder), INDEX_FILE)
  try:
    with open(path, encoding="utf-8") as file:
      meta = json.load(file)
  except FileNotFoundError:
    raise IndexMissingError(f"no search index in {os.fspath(folder)!r}: {INDEX_FILE} is "
                            "missing (build the index first)") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise IndexFormatError(f"{path}: format_version {meta.get('format_version')!r}, this code "
                           f"reads {FORMAT_VERSION}")
  return meta


def _fsync_path(path: str) -> None:
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def write_index(folder: str | os.PathLike, entries: Sequence[Entry],
                row_chunks: Iterable[np.ndarray], *, dim: int, dtype: str,
                model: ModelInfo = ModelInfo()) -> None:
  """Writes an index from its entries and its rows given chunk by chunk (already unit length).

  Streaming the rows lets an update copy a large memory-mapped index without holding it.
  index.json is replaced last, with one rename, after every data byte is on disk.
  """
  folder = os.fspath(folder)
  dtype = _check_dtype(dtype)
  os.makedirs(folder, exist_ok=True)
  try:
    generation = int(read_meta(folder).get("generation", 0)) + 1
  except (IndexMissingError, IndexFormatError, ValueError):
    generation = 1
  names = {"embeddings": f"embeddings-{generation:06d}.npy",
           "entries": f"entries-{generation:06d}.jsonl"}

  embeddings_path = os.path.join(folder, names["embeddings"])
  with open(embeddings_path, "wb") as file:
    np.lib.format.write_array_header_1_0(file, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": (len(entries), dim)})
    written = 0
    for chunk in row_chunks:
      chunk = np.ascontiguousarray(chunk, dtype=dtype)
      if chunk.ndim != 2 or chunk.shape[1] != dim:
        raise ValueError(f"row chunk of shape {chunk.shape}, expected (rows, {dim})")
      file.write(chunk.data)
      written += len(chunk)
    if written != len(entries):
      raise ValueError(f"{written} rows for {len(entries)} entries")
    file.flush()
    os.fsync(file.fileno())

  entries_path = os.path.join(folder, names["entries"])
  with open(entries_path, "w", encoding="utf-8") as file:
    for entry in entries:
      file.write(json.dumps(dataclasses.asdict(entry), ensure_ascii=False) + "\n")
    file.flush()
    os.fsync(file.fileno())

  meta = {"format_version": FORMAT_VERSION, "generation": generation, "count": len(entries),
          "dim": dim, "dtype": dtype, "model": dataclasses.asdict(model), **names}
  staging = os.path.join(folder, INDEX_FILE + ".tmp")
  with open(staging, "w", encoding="utf-8") as file:
    json.dump(meta, file, indent=1)
    file.flush()
    os.fsync(file.fileno())
  os.replace(staging, os.path.join(folder, INDEX_FILE))
  _fsync_path(folder)  # The rename itself is durable only once the folder is synced.

  for name in os.listdir(folder):
    if _DATA_FILE.match(name) and name not in names.values():
      try:
        os.remove(os.path.join(folder, name))
      except FileNotFoundError:
        pass


@dataclasses.dataclass(frozen=True)
class PartialBatch:
  """What `embed_audio` returns when some files of a batch could not be embedded (unreadable
  audio): the rows of the others, and which files they are. The skipped files stay out of
  the index, so the next update tries them again.

  Attributes:
    vectors: (kept.sum(), dim) embeddings of the kept files, batch order.
    kept: (batch,) bool, True for each file that has a row in `vectors`.
  """

  vectors: np.ndarray
  kept: np.ndarray


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
  """How the current file list differs from an index.

  Attributes:
    new: files the index does not list.
    changed: listed files whose size or mtime differ (all listed files when the model did).
    removed: paths the index lists that are gone from the file list.
    unchanged: paths whose rows can be kept.
    model_changed: the index was made by another model (or there was no index).
  """

  new: tuple[FileStat, ...]
  changed: tuple[FileStat, ...]
  removed: tuple[str, ...]
  unchanged: tuple[str, ...]
  model_changed: bool = False

  @property
  def to_embed(self) -> tuple[FileStat, ...]:
    return self.changed + self.new

  @property
  def is_noop(self) -> bool:
    return not (self.new or self.changed or self.removed)

  def summary(self) -> str:
    return (f"{len(self.new)} new, {len(self.changed)} changed, {len(self.removed)} removed, "
            f"{len(self.unchanged)} unchanged" +
            (" (other model: every file is re-embedded)" if self.model_changed and
             self.changed else ""))


def plan_update(index: Optional[SearchIndex], files: Sequence[FileStat],
                model: ModelInfo = ModelInfo()) -> UpdatePlan:
  """Which files need embedding and which rows go, given the archive's current files."""
  listed = {entry.path: entry.stat for entry in index.entries} if index is not None else {}
  model_changed = index is not None and index.model != model
  current = {stat.path for stat in files}
  new, changed, unchanged = [], [], []
  for stat in files:
    if stat.path not in listed:
      new.append(stat)
    elif model_changed or listed[stat.path] != stat:
      changed.append(stat)
    else:
      unchanged.append(stat.path)
  removed = tuple(path for path in listed if path not in current)
  return UpdatePlan(tuple(new), tuple(changed), removed, tuple(unchanged), model_changed)


def update_index(folder: str | os.PathLike, paths: Iterable[str | os.PathLike],
                 embed_audio: Callable[[list[str]], np.ndarray], *,
                 model: ModelInfo = ModelInfo(), dtype: Optional[str] = None,
                 transcribe: Optional[Callable[[list[str]], Sequence[Optional[str]]]] = None,
                 batch_size: int = 32, commit_every: int = 0,
                 progress: Optional[ProgressFn] = None) -> tuple[SearchIndex, UpdatePlan]:
  """Brings the index in `folder` up to date with `paths`, embedding only what changed.

  Args:
    folder: the index folder; created when missing.
    paths: the archive's audio files as they are now.
    embed_audio: paths -> (len(paths), dim) embeddings, or a `PartialBatch` when some files
      cannot be embedded; called in batches of `batch_size`.
    model: the model behind `embed_audio`; an index made by another one is re-embedded.
    dtype: storage dtype; None keeps the existing index's (float32 for a new one).
    transcribe: optional paths -> transcripts, called on the same batches.
    batch_size: files per `embed_audio` call.
    commit_every: also commit after at least this many newly embedded rows (0: only at the
      end), so a killed run resumes from its last commit rather than from the start.
    progress: called with one line per commit.

  Returns:
    The written (or untouched) index, memory-mapped, and the plan that was carried out.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  files = stat_files(paths)
  try:
    old = SearchIndex.load(folder)
  except IndexMissingError:
    old = None
  plan = plan_update(old, files, model)
  if old is not None:
    dtype = old.dtype if dtype is None else _check_dtype(dtype)
    if dtype != old.dtype:
      raise ValueError(f"the index in {os.fspath(folder)!r} stores {old.dtype}, asked for "
                       f"{dtype}; write a new index to change the storage dtype")
    if plan.is_noop and old.model == model:
      return old, plan
  dtype = _check_dtype(dtype or "float32")
  if old is None and not plan.to_embed:
    raise ValueError("no audio files to index")

  row_of = {entry.path: row for row, entry in enumerate(old.entries)} if old is not None else {}
  kept_rows = np.asarray([row_of[path] for path in plan.unchanged], np.int64)
  kept_entries = [old.entries[row] for row in kept_rows] if old is not None else []
  dim = old.dim if old is not None else None
  new_entries: list[Entry] = []
  new_rows: list[np.ndarray] = []

  def kept_chunks() -> Iterator[np.ndarray]:
    for start in range(0, len(kept_rows), _COPY_ROWS):
      yield old.embeddings[kept_rows[start:start + _COPY_ROWS]]

  def commit() -> None:
    chunks = itertools.chain(kept_chunks(), new_rows)
    write_index(folder, kept_entries + new_entries, chunks, dim=dim, dtype=dtype, model=model)
    if progress:
      progress(f"index {os.fspath(folder)}: {len(kept_entries) + len(new_entries)} rows "
               f"written ({len(new_entries)}/{len(plan.to_embed)} embedded)")

  since_commit = 0
  for start in range(0, len(plan.to_embed), batch_size):
    batch = plan.to_embed[start:start + batch_size]
    batch_paths = [stat.path for stat in batch]
    embedded = embed_audio(batch_paths)
    if isinstance(embedded, PartialBatch):
      kept = np.asarray(embedded.kept, bool)
      if kept.shape != (len(batch),):
        raise ValueError(f"embed_audio kept {kept.shape} of a batch of {len(batch)} files")
      batch = [stat for stat, keep in zip(batch, kept) if keep]
      batch_paths = [stat.path for stat in batch]
      embedded = embedded.vectors
      if not batch:
        continue
    vectors = unit_rows(embedded, batch_paths)
    if len(vectors) != len(batch) or (dim is not None and vectors.shape[1] != dim):
      raise ValueError(f"embed_audio returned shape {vectors.shape} for {len(batch)} files"
                       + (f" of an index with dim {dim}" if dim is not None else ""))
    dim = vectors.shape[1]
    transcripts = list(transcribe(batch_paths)) if transcribe else [None] * len(batch)
    if len(transcripts) != len(batch):
      raise ValueError(f"transcribe returned {len(transcripts)} texts for {len(batch)} files")
    new_rows.append(vectors.astype(dtype))
    new_entries.extend(Entry(stat.path, stat.size, stat.mtime_ns, text)
                       for stat, text in zip(batch, transcripts))
    since_commit += len(batch)
    if commit_every and since_commit >= commit_every and start + batch_size < len(
        plan.to_embed):
      commit()
      since_commit = 0
  if dim is None:  # Nothing to copy and nothing embedded: no rows to make an index of.
    raise ValueError(f"none of the {len(plan.to_embed)} audio files could be embedded")
  commit()
  return SearchIndex.load(folder), plan


# ----------------------------------------------------------------------------------------------
# Exact top-k search on the devices.
# ----------------------------------------------------------------------------------------------

# Scores inside a block are cut into groups of this many rows. The block's best k rows lie in
# the k groups with the best maxima, so only k * GROUP candidates per query reach top_k
# instead of the whole block: a max-reduction pass replaces most of the selection work.
GROUP = 32


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Best rows first; ties go to the lower row.

  Attributes:
    scores: (queries, min(k, rows)) float32 inner products.
    rows: (queries, min(k, rows)) int64 row numbers of the index.
  """

  scores: np.ndarray
  rows: np.ndarray


def default_block_rows(platform: Optional[str] = None) -> int:
  """Rows per block: on a CPU a block's (queries, block) scores should stay in cache; an
  accelerator wants larger products to keep its matrix unit busy."""
  platform = platform or jax.default_backend()
  return 1024 if platform == "cpu" else 16384


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _merge_block(top_scores: jax.Array, top_rows: jax.Array, scores: jax.Array,
                 first_row: jax.Array, count: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Merges one block's (queries, block) scores into the running top-k.

  The running entries come first in the concatenation and hold lower rows than the block, and
  the block's candidates are in row order, so `lax.top_k`, which prefers the lower position
  among equal values, breaks every tie towards the lower row.
  """
  queries, block = scores.shape
  if block % GROUP == 0 and 2 * k * GROUP <= block:
    groups = block // GROUP
    rows = first_row + jnp.arange(block, dtype=jnp.int32)
    masked = jnp.where(rows < count, scores, -jnp.inf)  # Padding rows never win.
    group_best = masked.reshape(queries, groups, GROUP).max(axis=2)  # (q, groups)
    _, chosen = lax.top_k(group_best, k)  # (q, k), best group first
    chosen = jnp.sort(chosen, axis=1)  # Row order again, for the tie rule above.
    positions = (chosen[:, :, None] * GROUP +
                 jnp.arange(GROUP, dtype=jnp.int32)).reshape(queries, k * GROUP)
    candidate_rows = first_row + positions  # (q, k * GROUP)
    candidates = jnp.take_along_axis(scores, positions, axis=1)
    candidates = jnp.where(candidate_rows < count, candidates, -jnp.inf)
  else:
    candidate_rows = jnp.broadcast_to(first_row + jnp.arange(block, dtype=jnp.int32),
                                      (queries, block))
    candidates = jnp.where(candidate_rows < count, scores, -jnp.inf)
  merged_scores = jnp.concatenate([top_scores, candidates], axis=1)
  merged_rows = jnp.concatenate([top_rows, candidate_rows], axis=1)
  best, where = lax.top_k(merged_scores, k)
  return best, jnp.take_along_axis(merged_rows, where, axis=1)


class Searcher:
  """Exact inner-product top-k over fixed rows, blocked and split over the local devices.

  Rows are laid out as (devices, blocks, dim, block): device j holds the contiguous rows
  [j * R, (j + 1) * R), R = blocks * block, each block transposed so that the score product
  is a plain (q, d) @ (d, block). Contiguous row ranges keep device order equal to row order,
  which the final merge's tie rule relies on.
  """

  def __init__(self, embeddings: np.ndarray, *, block_rows: int = 0,
               devices: Optional[Sequence[jax.Device]] = None,
               compute_dtype: str = "float32", max_queries: int = 1024):
    """
    Args:
      embeddings: (n, dim) rows, any float dtype (kept on the devices as given; a memory
        map is read block by block).
      block_rows: rows per block, at most; 0: `default_block_rows()`.
      devices: the devices to split the rows over; default: all local devices.
      compute_dtype: dtype of the score product; float32 (exact for float32 and float16
        rows) upcasts each block on the fly.
      max_queries: queries per device call; more are searched in several calls.
    """
    if embeddings.ndim != 2:
      raise ValueError(f"embeddings must be (rows, dim), got shape {embeddings.shape}")
    if len(embeddings) >= 2**31:
      raise ValueError("row numbers are int32 on the devices: at most 2**31 - 1 rows")
    self.count, self.dim = embeddings.shape
    self.compute_dtype = jnp.dtype(compute_dtype)
    self.max_queries = max_queries
    devices = list(devices) if devices is not None else jax.local_devices()
    self.mesh = Mesh(np.asarray(devices), (AXIS,))
    num_devices = len(devices)
    per_device = max(1, math.ceil(self.count / num_devices))
    block_rows = block_rows or default_block_rows(devices[0].platform)
    self.block = min(_round_up(block_rows, GROUP), _round_up(per_device, GROUP))
    self.blocks_per_device = math.ceil(per_device / self.block)
    rows_per_device = self.block * self.blocks_per_device
    storage = embeddings.dtype

    def shard(index: tuple[slice, ...]) -> np.ndarray:
      device = index[0].start or 0
      out = np.zeros((1, self.blocks_per_device, self.dim, self.block), storage)
      for block in range(self.blocks_per_device):
        start = device * rows_per_device + block * self.block
        rows = embeddings[start:min(start + self.block, self.count)]
        out[0, block, :, :len(rows)] = rows.T
      return out

    shape = (num_devices, self.blocks_per_device, self.dim, self.block)
    self.blocks = jax.make_array_from_callback(shape, NamedSharding(self.mesh, P(AXIS)), shard)
    self._count = jnp.int32(self.count)

  @functools.cached_property
  def _search_fn(self):
    block, blocks_per_device = self.block, self.blocks_per_device
    compute_dtype = self.compute_dtype

    def per_device(queries, blocks, count, *, k):
      # queries (q, d) on every device; blocks (1, blocks, d, block): this device's rows.
      first_row = lax.axis_index(AXIS) * (blocks_per_device * block)
      queries = queries.astype(compute_dtype)
      init = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
              jnp.full((queries.shape[0], k), -1, jnp.int32))

      def step(index, top):
        rows = blocks[0, index].astype(compute_dtype)  # (d, block)
        scores = jnp.matmul(queries, rows, precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)  # (q, d) @ (d, block) -> (q, block)
        return _merge_block(*top, scores, first_row + index * block, count, k)

      top_scores, top_rows = lax.fori_loop(0, blocks_per_device, step, init)
      # Device order is row order, so the lower row also wins ties across devices.
      all_scores = lax.all_gather(top_scores, AXIS, axis=1, tiled=True)  # (q, devices * k)
      all_rows = lax.all_gather(top_rows, AXIS, axis=1, tiled=True)
      best, where = lax.top_k(all_scores, k)
      return best, jnp.take_along_axis(all_rows, where, axis=1)

    def search(queries, blocks, count, k):
      mapped = jax.shard_map(functools.partial(per_device, k=k), mesh=self.mesh,
                             in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()),
                             check_vma=False)
      return mapped(queries, blocks, count)

    return jax.jit(search, static_argnums=3)

  def _bucket(self, num_queries: int) -> int:
    """Queries are padded to a power of two (at most max_queries) to bound recompiles."""
    return min(self.max_queries, 1 << max(0, num_queries - 1).bit_length())

  def search(self, queries: np.ndarray, k: int) -> SearchResult:
    """Top-k rows by inner product for each query row (normalise queries for cosine)."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be (n, {self.dim}), got shape {queries.shape}")
    if k <= 0:
      raise ValueError(f"k must be positive, got {k}")
    k = min(k, self.count)
    scores = np.zeros((len(queries), k), np.float32)
    rows = np.zeros((len(queries), k), np.int64)
    if k == 0:
      return SearchResult(scores, rows)
    replicated = NamedSharding(self.mesh, P())
    pending = []
    for start in range(0, len(queries), self.max_queries):
      chunk = queries[start:start + self.max_queries]
      padded = np.zeros((self._bucket(len(chunk)), self.dim), np.float32)
      padded[:len(chunk)] = chunk
      # Dispatch every chunk before reading any back: the devices never wait on the host.
      pending.append((start, len(chunk), self._search_fn(
          jax.device_put(padded, replicated), self.blocks, self._count, k)))
    for start, size, (chunk_scores, chunk_rows) in pending:
      scores[start:start + size] = np.asarray(chunk_scores)[:size]
      rows[start:start + size] = np.asarray(chunk_rows)[:size]
    return SearchResult(scores, rows)


def reference_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> SearchResult:
  """Dense NumPy twin of `Searcher.search`: full float32 score matrix, stable sort."""
  scores = np.asarray(queries, np.float32) @ np.asarray(embeddings, np.float32).T  # (q, n)
  k = min(k, scores.shape[1])
  # A stable sort of the negated scores keeps equal scores in row order.
  rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return SearchResult(np.take_along_axis(scores, rows, axis=1), rows.astype(np.int64))
