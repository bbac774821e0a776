"""Blocked on-device scoring: where each query's gold candidate ranks, without the N x N matrix.

The paper's hard protocol scores every speech clip against every text (11,411 x 11,411 in the
paper, and a million-clip archive is the use case). Holding that matrix costs N x N memory, so
this module walks it in (block_rows, block_cols) tiles: each tile is one matrix product on the
device, compared at once against the gold scores of its rows and of its columns, and thrown
away. One walk serves both retrieval directions: a tile's rows count towards speech->text and
its columns towards text->speech. Memory on the host grows with N x d (the embeddings); on the
device with the chunk of rows and columns that is resident, never with N x N.

Gold sets. Every speech row and every text column carries a key; the gold set of a speech query
is every text with the same key, and vice versa. Keys = row indices give the plain paired
protocol, keys = text ids make a duplicate text count as a hit, and keys = text ids across two
language pools give the cross-lingual protocol. The gold score is the best score in the gold
set, and the paper's rank rule applies: rank = 1 + the number of candidates scoring strictly
higher than it. Candidates in the gold set can never score strictly higher than their maximum,
so the tile loop needs no masks; ties with gold-set members are removed afterwards from the
pair scores, and zero rows padded onto the last chunk score exactly 0 and are removed from the
counts on the host.

Exact ties. Identical embeddings (duplicate texts through a frozen text tower) must tie
exactly. A dot product's rounding depends on the kernel that computes it, and some kernels even
round by position (NumPy's full product breaks 22 of the 355 planted duplicate ties in
benchmarks/retrieval.py). So the gold scores come out of matrix products of exactly the walk's
tile shape, gold pairs packed on the tiles' diagonals, and an optimisation barrier keeps XLA
from fusing or slicing either product; a gold score computed any other way would differ from
its duplicate's score in the last bit. For the plain paired protocol (row i's gold is column i)
those gold tiles are the walk's own diagonal tiles: they are counted there and skipped in the
walk, so the matrix is computed exactly once.

Devices. With several devices, each resident row chunk is split over the mesh axis 'data'; the
column chunk is replicated, column counts are summed with `psum` and row counts gathered, all
inside `jax.shard_map`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXIS = "data"
# Gold pairs beyond this multiple of the corpus size mean the keys are not text ids but
# something coarse (a category, a constant); scoring them would be quadratic.
MAX_PAIRS_PER_ITEM = 64

ProgressFn = Callable[[str], None]


class TooManyPairsError(ValueError):
  """Keys repeat so often that the gold pairs alone would be quadratic in the corpus."""


@dataclasses.dataclass(frozen=True)
class Blocking:
  """How the score matrix is cut (upper bounds: `fit_tiles` balances them to the data).

  Attributes:
    block_rows: speech rows per tile (one matrix product), at most.
    block_cols: text columns per tile, at most.
    chunk_rows: speech rows resident on each device at a time (a multiple of block_rows).
    chunk_cols: text columns resident (replicated) at a time (a multiple of block_cols).
    pair_batch: tiles of gold pairs scored per device call.
    align: balanced tile sizes are rounded up to a multiple of this (vector width).
  """

  block_rows: int = 512
  block_cols: int = 512
  chunk_rows: int = 32768
  chunk_cols: int = 32768
  pair_batch: int = 8
  align: int = 8

  def __post_init__(self):
    for name in ("block_rows", "block_cols", "chunk_rows", "chunk_cols", "pair_batch", "align"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.chunk_rows % self.block_rows or self.chunk_cols % self.block_cols:
      raise ValueError(f"chunks ({self.chunk_rows}, {self.chunk_cols}) must be multiples of "
                       f"blocks ({self.block_rows}, {self.block_cols})")


def default_blocking(platform: Optional[str] = None) -> Blocking:
  """Tile sizes that keep each backend's matrix unit busy.

  On a CPU a 512 x 512 x 768 tile already runs the matrix product at full speed with its
  operands in cache, and small tiles keep the gold-pair tiles of duplicate and cross-lingual
  gold sets cheap (about one per tile row); an accelerator wants larger tiles to amortise each
  loop step.
  """
  platform = platform or jax.default_backend()
  if platform == "cpu":
    return Blocking()
  return Blocking(block_rows=4096, block_cols=4096, chunk_rows=131072, chunk_cols=131072,
                  align=128)


def make_blocking(block_rows: int = 0, block_cols: int = 0, chunk_rows: int = 0,
                  chunk_cols: int = 0, platform: Optional[str] = None) -> Blocking:
  """Backend defaults for every size given as 0; chunks rounded up to whole blocks."""
  default = default_blocking(platform)
  sizes = {"block_rows": block_rows, "block_cols": block_cols, "chunk_rows": chunk_rows,
           "chunk_cols": chunk_cols}
  for name, value in sizes.items():
    if value < 0:
      raise ValueError(f"{name} must not be negative, got {value}")
    sizes[name] = value or getattr(default, name)
  for chunk, block in (("chunk_rows", "block_rows"), ("chunk_cols", "block_cols")):
    sizes[chunk] = -(-sizes[chunk] // sizes[block]) * sizes[block]
  return Blocking(**sizes, align=default.align)


def fit_tiles(count: int, block: int, chunk: int, align: int,
              tile: Optional[int] = None) -> tuple[int, int, int]:
  """(tile, chunk size, number of chunks) covering `count` items with little padding.

  The paper's 11,411 items in 1024-wide tiles would pad to 12,288 and waste 16% of the
  products; balancing the chunks, then the tiles within a chunk, keeps padding to a few rows.
  A given `tile` is kept as is (to match the other side of the matrix).
  """
  chunks = max(1, math.ceil(count / chunk))
  per_chunk = math.ceil(count / chunks)
  if tile is None:
    tiles = max(1, math.ceil(per_chunk / block))
    tile = min(block, -(-math.ceil(per_chunk / tiles) // align) * align)
  return tile, tile * max(1, math.ceil(per_chunk / tile)), chunks


@dataclasses.dataclass(frozen=True)
class GoldCounts:
  """Where each query's gold set lands among its candidates.

  Attributes:
    gold_score: (n,) float32 best score in the query's gold set; NaN where the gold set is
      empty (the item is no query in this direction).
    above: (n,) int64 candidates outside the gold set scoring strictly higher.
    ties: (n,) int64 candidates outside the gold set scoring exactly the gold score.
  """

  gold_score: np.ndarray
  above: np.ndarray
  ties: np.ndarray

  @property
  def is_query(self) -> np.ndarray:
    return ~np.isnan(self.gold_score)

  @property
  def ranks(self) -> np.ndarray:
    """The paper's rank: 1 + candidates strictly above; meaningless where not `is_query`."""
    return 1 + self.above

  @property
  def tied_at_top(self) -> np.ndarray:
    """Queries whose top score is shared by the gold set and some other candidate."""
    return self.is_query & (self.above == 0) & (self.ties > 0)


def default_mesh() -> Mesh:
  """A 1-D mesh over every device, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def _data_size(mesh: Mesh) -> int:
  """Devices along 'data'; other mesh axes (a model axis) just hold replicas."""
  if AXIS not in mesh.axis_names:
    raise ValueError(f"the mesh needs an axis named {AXIS!r}, it has {mesh.axis_names}")
  return mesh.shape[AXIS]


def _dot_tile(rows: jax.Array, cols: jax.Array) -> jax.Array:
  """(br, d) @ (d, bc) -> (br, bc) in full float32.

  The barriers keep XLA from fusing the product with its producers (the walk's slices) or its
  consumers, or from slicing it, so every call site runs the same standalone kernel and rounds
  each score the same way.
  """
  rows, cols = lax.optimization_barrier((rows, cols))
  scores = lax.dot_general(rows, cols, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
  return lax.optimization_barrier(scores)


def _tile_counts(scores: jax.Array, gold: jax.Array, axis: int, count_ties: bool) -> jax.Array:
  """(k, n) candidates above (and tied with) `gold` along `axis`; gold broadcasts along it."""
  above = jnp.sum(scores > gold, axis=axis, dtype=jnp.int32)
  if not count_ties:
    return above[None]
  return jnp.stack([above, jnp.sum(scores == gold, axis=axis, dtype=jnp.int32)])


def _tile_walk(rows, cols, row_gold, col_gold, first_row_block, first_col_block, *,
               block_rows: int, block_cols: int, count_rows: bool, count_cols: bool,
               count_ties: bool, skip_diagonal: bool):
  """Counts over every (row block, column block) tile of one device's rows and all columns.

  Args:
    rows: (R, d) this device's speech rows, R a multiple of block_rows.
    cols: (C, d) text columns, C a multiple of block_cols.
    row_gold: (R,) gold score per row (+inf for rows that are not queries).
    col_gold: (C,) gold score per column.
    first_row_block, first_col_block: global tile indices of rows[0] and cols[0].
    skip_diagonal: leave out tiles whose global row and column tile indices are equal (the
      gold-pair pass has counted them).
  Returns:
    row_counts: (k, R) int32, col_counts: (k, C) int32 partial over this device's rows; k is 2
    (above, ties) when count_ties else 1 (above).
  """
  dim = rows.shape[1]
  kinds = 2 if count_ties else 1
  row_blocks = rows.reshape(-1, block_rows, dim)
  col_blocks = cols.reshape(-1, block_cols, dim)
  row_gold_blocks = row_gold.reshape(-1, block_rows)
  col_gold_blocks = col_gold.reshape(-1, block_cols)
  no_row_counts = jnp.zeros((kinds, block_rows), jnp.int32)
  no_col_counts = jnp.zeros((kinds, block_cols), jnp.int32)

  def over_row_blocks(col_totals, row_inputs):
    row_index, row_block, row_block_gold = row_inputs

    def over_col_blocks(row_totals, col_inputs):
      col_index, col_block, col_block_gold = col_inputs

      def counted():
        scores = _dot_tile(row_block, col_block)  # (br, d) @ (d, bc) -> (br, bc)
        return ((_tile_counts(scores, row_block_gold[:, None], 1, count_ties)
                 if count_rows else no_row_counts),
                (_tile_counts(scores, col_block_gold[None, :], 0, count_ties)
                 if count_cols else no_col_counts))

      if skip_diagonal:
        row_part, col_part = lax.cond(first_row_block + row_index == first_col_block + col_index,
                                      lambda: (no_row_counts, no_col_counts), counted)
      else:
        row_part, col_part = counted()
      return row_totals + row_part, col_part

    row_totals, col_parts = lax.scan(
        over_col_blocks, no_row_counts,
        (jnp.arange(col_blocks.shape[0]), col_blocks, col_gold_blocks))
    # (num_col_blocks, k, bc) -> (k, C)
    return col_totals + jnp.moveaxis(col_parts, 0, 1).reshape(kinds, -1), row_totals

  col_totals, row_parts = lax.scan(
      over_row_blocks, jnp.zeros((kinds, cols.shape[0]), jnp.int32),
      (jnp.arange(row_blocks.shape[0]), row_blocks, row_gold_blocks))
  row_counts = jnp.moveaxis(row_parts, 0, 1).reshape(kinds, -1)  # (k, R)
  return row_counts, col_totals


@functools.lru_cache(maxsize=32)
def _compiled_walk(mesh: Mesh, block_rows: int, block_cols: int, count_rows: bool,
                   count_cols: bool, count_ties: bool, skip_diagonal: bool):
  """The tile walk spread over `mesh`: rows split over 'data', columns replicated."""

  def per_device(rows, cols, row_gold, col_gold, first_row_block, first_col_block):
    local_blocks = rows.shape[0] // block_rows
    row_counts, col_counts = _tile_walk(
        rows, cols, row_gold, col_gold,
        first_row_block + lax.axis_index(AXIS) * local_blocks, first_col_block,
        block_rows=block_rows, block_cols=block_cols, count_rows=count_rows,
        count_cols=count_cols, count_ties=count_ties, skip_diagonal=skip_diagonal)
    # Every device saw all columns against its own rows: sum the column counts, and gather the
    # row counts so the result is replicated and every process can read it.
    return (lax.all_gather(row_counts, AXIS, axis=1, tiled=True),
            lax.psum(col_counts, AXIS))

  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(AXIS, None), P(None, None), P(AXIS), P(None), P(), P()),
      out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded)


@functools.lru_cache(maxsize=32)
def _compiled_pair_scores(mesh: Mesh, count_kinds: int):
  """Scores of gold pairs, packed on the diagonals of tiles shaped like the walk's tiles.

  With count_kinds > 0 the tiles are the walk's diagonal tiles of the plain paired protocol
  (row i's gold is column i), and each tile is also counted against its own diagonal:
  (above[, ties]) per row and per column, so the walk can skip it.
  """

  def per_device(row_tiles, col_tiles):
    # row_tiles (t, br, d), col_tiles (t, bc, d): pair p of tile t is row p against column p.
    def one_tile(_, tile):
      row_tile, col_tile = tile
      scores = _dot_tile(row_tile, col_tile)  # (br, d) @ (d, bc) -> (br, bc)
      size = min(scores.shape)
      diagonal = jnp.diagonal(scores[:size, :size])
      if not count_kinds:
        return None, (diagonal,)
      count_ties = count_kinds == 2
      return None, (diagonal, _tile_counts(scores, diagonal[:, None], 1, count_ties),
                    _tile_counts(scores, diagonal[None, :], 0, count_ties))
    _, outputs = lax.scan(one_tile, None, (row_tiles, col_tiles))
    return tuple(lax.all_gather(output, AXIS, axis=0, tiled=True) for output in outputs)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded)


def _put(host: np.ndarray, mesh: Mesh, spec: P) -> jax.Array:
  """Host array -> global device array; every process holds the same full host array."""
  sharding = NamedSharding(mesh, spec)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _padded(host: np.ndarray, start: int, size: int, fill: float = 0.0) -> np.ndarray:
  """Rows [start, start + size) of `host`, filled past its end; a view when nothing to fill."""
  part = host[start:start + size]
  if part.shape[0] == size:
    return np.ascontiguousarray(part)
  out = np.full((size,) + host.shape[1:], fill, dtype=host.dtype)
  out[:part.shape[0]] = part
  return out


def gold_pairs(speech_keys: np.ndarray, text_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Every (speech row, text column) whose keys are equal, as two index arrays."""
  speech_keys = np.asarray(speech_keys)
  text_keys = np.asarray(text_keys)
  text_order = np.argsort(text_keys, kind="stable")
  sorted_text_keys = text_keys[text_order]
  starts = np.searchsorted(sorted_text_keys, speech_keys, side="left")
  stops = np.searchsorted(sorted_text_keys, speech_keys, side="right")
  matches = stops - starts
  num_pairs = int(matches.sum())
  limit = MAX_PAIRS_PER_ITEM * max(len(speech_keys), len(text_keys), 1)
  if num_pairs > limit:
    raise TooManyPairsError(f"{num_pairs} gold pairs for {len(speech_keys)} speech and "
                     f"{len(text_keys)} texts: the keys repeat too often to be text ids")
  pair_speech = np.repeat(np.arange(len(speech_keys)), matches)
  # Position of each pair inside its speech row's run of matching texts.
  offsets = np.arange(num_pairs) - np.repeat(np.cumsum(matches) - matches, matches)
  pair_text = text_order[np.repeat(starts, matches) + offsets]
  return pair_speech, pair_text


def pair_scores(zspeech: np.ndarray, ztext: np.ndarray, pair_speech: np.ndarray,
                pair_text: np.ndarray, *, mesh: Mesh, tile_rows: int, tile_cols: int,
                tiles_per_device: int = 8, count_kinds: int = 0
                ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
  """Scores zspeech[pair_speech] . ztext[pair_text], rounded exactly like the walk's.

  tile_rows x tile_cols must be the walk's tile: the pairs sit on the diagonals of products of
  exactly that shape, so each score comes out of the same kernel as its competitors'.
  Returns (num_pairs,) float32 scores and, with count_kinds (1: above, 2: above and ties) for
  the plain paired protocol, (k, num_pairs) int counts of each pair's tile row and column.
  """
  per_tile = min(tile_rows, tile_cols)
  num_devices = _data_size(mesh)
  tiles_needed = max(1, math.ceil(len(pair_speech) / per_tile))
  tiles_per_call = min(tiles_per_device, math.ceil(tiles_needed / num_devices)) * num_devices
  pairs_per_call = per_tile * tiles_per_call
  dim = zspeech.shape[1]
  fn = _compiled_pair_scores(mesh, count_kinds)
  scores = np.empty(len(pair_speech), np.float32)
  row_counts = np.zeros((count_kinds, len(pair_speech)), np.int64) if count_kinds else None
  col_counts = np.zeros((count_kinds, len(pair_speech)), np.int64) if count_kinds else None
  for start in range(0, len(pair_speech), pairs_per_call):
    speech_index = pair_speech[start:start + pairs_per_call]
    text_index = pair_text[start:start + pairs_per_call]
    count = len(speech_index)
    row_tiles = np.zeros((tiles_per_call, tile_rows, dim), np.float32)
    col_tiles = np.zeros((tiles_per_call, tile_cols, dim), np.float32)
    # Pair p goes to tile p // per_tile, diagonal position p % per_tile.
    tile_of = np.arange(count) // per_tile
    slot_of = np.arange(count) % per_tile
    row_tiles[tile_of, slot_of] = zspeech[speech_index]
    col_tiles[tile_of, slot_of] = ztext[text_index]
    outputs = fn(_put(row_tiles, mesh, P(AXIS)), _put(col_tiles, mesh, P(AXIS)))
    scores[start:start + count] = np.asarray(outputs[0]).reshape(-1)[:count]
    if count_kinds:
      # (t, k, tile) -> (k, t * tile), the pair order.
      row_counts[:, start:start + count] = np.moveaxis(
          np.asarray(outputs[1]), 1, 0).reshape(count_kinds, -1)[:, :count]
      col_counts[:, start:start + count] = np.moveaxis(
          np.asarray(outputs[2]), 1, 0).reshape(count_kinds, -1)[:, :count]
  return scores, row_counts, col_counts


def _gold_from_pairs(num_items: int, pair_item: np.ndarray, scores: np.ndarray):
  """Best pair score per item (NaN where none) and how many of its pairs reach it."""
  gold = np.full(num_items, -np.inf, np.float32)
  np.maximum.at(gold, pair_item, scores)
  reaching = np.zeros(num_items, np.int64)
  np.add.at(reaching, pair_item, scores == gold[pair_item])
  gold[reaching == 0] = np.nan
  return gold, reaching


def score_both_ways(zspeech: np.ndarray, ztext: np.ndarray, speech_keys: np.ndarray,
                    text_keys: np.ndarray, *, speech_to_text: bool = True,
                    text_to_speech: bool = True, count_ties: bool = True,
                    mesh: Optional[Mesh] = None, blocking: Optional[Blocking] = None,
                    progress: Optional[ProgressFn] = None
                    ) -> tuple[Optional[GoldCounts], Optional[GoldCounts]]:
  """Gold counts of every speech query among all texts and every text query among all speech.

  Args:
    zspeech: (R, d) float32 speech embeddings (the candidates of text queries).
    ztext: (C, d) float32 text embeddings (the candidates of speech queries).
    speech_keys: (R,) integer keys; text_keys: (C,) keys. Equal keys mark gold pairs.
    speech_to_text / text_to_speech: which directions to count.
    count_ties: also count exact ties with the gold score (needed for tie skipping).
    mesh: devices to spread the rows over; defaults to every device.
    blocking: tile and chunk sizes; defaults to `default_blocking()`.
    progress: called with a one-line status after each resident chunk.
  Returns:
    (speech_to_text counts over speech rows, text_to_speech counts over text columns), None for
    a direction not asked for.
  """
  zspeech = np.asarray(zspeech, dtype=np.float32)
  ztext = np.asarray(ztext, dtype=np.float32)
  if zspeech.ndim != 2 or ztext.ndim != 2 or zspeech.shape[1] != ztext.shape[1]:
    raise ValueError(f"need (R, d) speech and (C, d) text, got {zspeech.shape} and {ztext.shape}")
  if len(speech_keys) != len(zspeech) or len(text_keys) != len(ztext):
    raise ValueError("one key per speech row and per text row is needed")
  mesh = mesh or default_mesh()
  blocking = blocking or default_blocking()
  num_speech, num_text = len(zspeech), len(ztext)

  num_devices = _data_size(mesh)
  # Rows are split over the devices, so each device's share is what the tiles must cover.
  tile_rows, rows_per_device, num_row_chunks = fit_tiles(
      math.ceil(num_speech / num_devices), blocking.block_rows, blocking.chunk_rows,
      blocking.align)
  chunk_rows = rows_per_device * num_devices
  # A square matrix with square tiles keeps one tile size on both sides, so that row block k
  # and column block k cover the same items (see `diagonal` below).
  same_tile = tile_rows if (num_speech == num_text and
                            blocking.block_rows == blocking.block_cols) else None
  tile_cols, chunk_cols, num_col_chunks = fit_tiles(num_text, blocking.block_cols,
                                                    blocking.chunk_cols, blocking.align,
                                                    tile=same_tile)

  kinds = 2 if count_ties else 1
  pair_speech, pair_text = gold_pairs(speech_keys, text_keys)
  # The plain paired protocol (gold of row i is column i) packs its gold pairs exactly into
  # the walk's diagonal tiles: count those tiles in the pair pass and skip them in the walk,
  # so the whole matrix is computed once.
  diagonal = (num_speech == num_text and tile_rows == tile_cols and
              np.array_equal(pair_speech, np.arange(num_speech)) and
              np.array_equal(pair_text, np.arange(num_text)))
  scores, diagonal_row_counts, diagonal_col_counts = pair_scores(
      zspeech, ztext, pair_speech, pair_text, mesh=mesh, tile_rows=tile_rows,
      tile_cols=tile_cols, tiles_per_device=blocking.pair_batch,
      count_kinds=kinds if diagonal else 0)
  speech_gold, speech_reaching = _gold_from_pairs(num_speech, pair_speech, scores)
  text_gold, text_reaching = _gold_from_pairs(num_text, pair_text, scores)

  walk = _compiled_walk(mesh, tile_rows, tile_cols, speech_to_text, text_to_speech, count_ties,
                        diagonal)
  # Non-queries get +inf: nothing scores above or equal to it, so they add no counts.
  speech_threshold = np.where(np.isnan(speech_gold), np.inf, speech_gold).astype(np.float32)
  text_threshold = np.where(np.isnan(text_gold), np.inf, text_gold).astype(np.float32)
  speech_counts = diagonal_row_counts if diagonal else np.zeros((kinds, num_speech), np.int64)
  text_counts = diagonal_col_counts if diagonal else np.zeros((kinds, num_text), np.int64)

  def col_chunk(index):
    start = index * chunk_cols
    return (_put(_padded(ztext, start, chunk_cols), mesh, P(None, None)),
            _put(_padded(text_threshold, start, chunk_cols, np.inf), mesh, P(None)))

  resident_cols = col_chunk(0) if num_col_chunks == 1 else None
  started = time.perf_counter()
  for row_index in range(num_row_chunks):
    row_start = row_index * chunk_rows
    rows = _put(_padded(zspeech, row_start, chunk_rows), mesh, P(AXIS, None))
    row_gold = _put(_padded(speech_threshold, row_start, chunk_rows, np.inf), mesh, P(AXIS))
    num_rows = max(0, min(chunk_rows, num_speech - row_start))
    for col_index in range(num_col_chunks):
      cols, col_gold = resident_cols or col_chunk(col_index)
      col_start = col_index * chunk_cols
      num_cols = max(0, min(chunk_cols, num_text - col_start))
      row_part, col_part = walk(rows, cols, row_gold, col_gold,
                                np.int32(row_start // tile_rows), np.int32(col_start // tile_cols))
      if speech_to_text:
        speech_counts[:, row_start:row_start + num_rows] += np.asarray(row_part)[:, :num_rows]
      if text_to_speech:
        text_counts[:, col_start:col_start + num_cols] += np.asarray(col_part)[:, :num_cols]
    if progress is not None:
      done = (row_index + 1) / num_row_chunks
      elapsed = time.perf_counter() - started
      progress(f"scored {min(row_start + chunk_rows, num_speech)}/{num_speech} speech rows "
               f"against {num_text} texts ({100 * done:.0f}%, {elapsed:.1f} s, "
               f"~{elapsed / done - elapsed:.0f} s left)")

  # Zero rows padded onto the last chunks score exactly 0 against everything.
  padded_speech = num_row_chunks * chunk_rows - num_speech
  padded_text = num_col_chunks * chunk_cols - num_text

  def finish(counts, gold, reaching, padded):
    above = counts[0] - padded * (gold < 0)
    if count_ties:
      # Raw ties include the gold-set members that reach the gold score.
      ties = counts[1] - padded * (gold == 0) - reaching
    else:
      ties = np.zeros_like(above)
    is_query = ~np.isnan(gold)
    return GoldCounts(gold_score=gold, above=np.where(is_query, above, 0),
                      ties=np.where(is_query, ties, 0))

  return (finish(speech_counts, speech_gold, speech_reaching, padded_text)
          if speech_to_text else None,
          finish(text_counts, text_gold, text_reaching, padded_speech)
          if text_to_speech else None)


def sample_candidates(query_keys: np.ndarray, candidate_keys: np.ndarray, num_candidates: int,
                      seed: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The soft protocol's candidate lists: one gold candidate plus random others per query.

  Each query's first candidate is the first pool item sharing its key; the other
  num_candidates - 1 are drawn uniformly without replacement from the rest of the pool.
  Returns (queries (q,) indices of items that have a gold candidate, candidates (q, K)).
  """
  query_keys = np.asarray(query_keys)
  candidate_keys = np.asarray(candidate_keys)
  pool = len(candidate_keys)
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be at least 1, got {num_candidates}")
  if num_candidates > pool:
    raise ValueError(f"{num_candidates} candidates asked for but the pool holds {pool}")
  order = np.argsort(candidate_keys, kind="stable")
  position = np.searchsorted(candidate_keys[order], query_keys)
  position = np.minimum(position, pool - 1)
  has_gold = candidate_keys[order][position] == query_keys
  queries = np.flatnonzero(has_gold)
  gold = order[position[queries]]
  rng = np.random.default_rng(seed)
  candidates = np.empty((len(queries), num_candidates), np.int64)
  candidates[:, 0] = gold
  for row, gold_index in enumerate(gold):
    others = rng.choice(pool - 1, num_candidates - 1, replace=False)
    candidates[row, 1:] = others + (others >= gold_index)  # Skip over the gold index.
  return queries, candidates


@functools.lru_cache(maxsize=8)
def _compiled_listed_scores(mesh: Mesh):
  """Scores of each query against its own candidate list, split over 'data' by query."""

  def per_device(queries, candidates):
    # (q, d) . (q, k, d) -> (q, k); gold and others come out of the same product.
    scores = jnp.einsum("qd,qkd->qk", queries, candidates, precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    return lax.all_gather(scores, AXIS, axis=0, tiled=True)

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(),
                          check_vma=False)
  return jax.jit(sharded)


def score_listed(zquery: np.ndarray, zcandidate: np.ndarray, query_keys: np.ndarray,
                 candidate_keys: np.ndarray, candidate_lists: np.ndarray, queries: np.ndarray,
                 *, mesh: Optional[Mesh] = None, chunk_bytes: int = 64 << 20) -> GoldCounts:
  """Gold counts of queries ranked only among their own candidate lists (soft protocol).

  Args:
    zquery: (n, d) query embeddings; zcandidate: (m, d) candidate pool.
    query_keys, candidate_keys: keys; a listed candidate with the query's key is gold.
    candidate_lists: (q, K) pool indices per scored query; queries: (q,) their item indices.
  Returns:
    GoldCounts over all n items; items not in `queries` are marked as no query.
  """
  mesh = mesh or default_mesh()
  num_devices = _data_size(mesh)
  num_lists, num_candidates = candidate_lists.shape
  dim = zquery.shape[1]
  per_call = max(num_devices, (chunk_bytes // (num_candidates * dim * 4)) // num_devices *
                 num_devices)
  fn = _compiled_listed_scores(mesh)
  gold = np.full(len(zquery), np.nan, np.float32)
  above = np.zeros(len(zquery), np.int64)
  ties = np.zeros(len(zquery), np.int64)
  for start in range(0, num_lists, per_call):
    lists = candidate_lists[start:start + per_call]
    items = queries[start:start + per_call]
    count = len(items)
    query_block = np.zeros((per_call, dim), np.float32)
    query_block[:count] = zquery[items]
    candidate_block = np.zeros((per_call, num_candidates, dim), np.float32)
    candidate_block[:count] = zcandidate[lists]
    scores = np.asarray(fn(_put(query_block, mesh, P(AXIS)),
                           _put(candidate_block, mesh, P(AXIS))))[:count]
    in_gold = candidate_keys[lists] == query_keys[items][:, None]  # (q, K)
    best = np.max(np.where(in_gold, scores, -np.inf), axis=1)
    others = ~in_gold
    gold[items] = best
    above[items] = np.sum(others & (scores > best[:, None]), axis=1)
    ties[items] = np.sum(others & (scores == best[:, None]), axis=1)
  return GoldCounts(gold_score=gold, above=above, ties=ties)
