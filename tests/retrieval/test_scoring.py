"""The blocked scorer against brute force: tiles, chunks, padding, meshes, ties and memory."""

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from clasp_jax.retrieval import scoring
from tests.helpers import retrieval_reference as reference


def one_device_mesh():
  return Mesh(np.asarray(jax.devices()[:1]), ("data",))


def brute_counts(zquery, zcandidate, query_keys, candidate_keys):
  """(above, ties, is_query) per query over the full float64 matrix."""
  full = zquery.astype(np.float64) @ zcandidate.astype(np.float64).T  # (q, d) @ (d, c)
  above, ties, is_query = [], [], []
  for query in range(len(zquery)):
    gold = [c for c in range(len(zcandidate)) if candidate_keys[c] == query_keys[query]]
    if not gold:
      above.append(0), ties.append(0), is_query.append(False)
      continue
    best = max(full[query, c] for c in gold)
    others = [full[query, c] for c in range(len(zcandidate))
              if candidate_keys[c] != query_keys[query]]
    above.append(sum(1 for s in others if s > best))
    ties.append(sum(1 for s in others if s == best))
    is_query.append(True)
  return np.array(above), np.array(ties), np.array(is_query)


@pytest.fixture(scope="module")
def integer_pools():
  """Speech and text pools of different sizes with repeated keys and unpaired items."""
  rng = np.random.default_rng(4)
  zspeech = rng.integers(-2, 3, (77, 6)).astype(np.float32)
  ztext = rng.integers(-2, 3, (45, 6)).astype(np.float32)
  speech_keys = rng.integers(0, 50, 77)
  text_keys = rng.integers(0, 50, 45)
  ztext[10] = ztext[33]  # Identical texts under different keys: a planted non-gold tie.
  return zspeech, ztext, speech_keys, text_keys


BLOCKINGS = {
    # Many tiles, several row and column chunks, padding on both sides.
    "small_tiles": scoring.Blocking(block_rows=4, block_cols=8, chunk_rows=8, chunk_cols=16,
                                    pair_batch=1),
    # One tile larger than either pool.
    "one_tile": scoring.Blocking(block_rows=128, block_cols=64, chunk_rows=128, chunk_cols=64),
}


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("blocking_name", sorted(BLOCKINGS))
def test_counts_match_brute_force(integer_pools, devices, blocking_name):
  zspeech, ztext, speech_keys, text_keys = integer_pools
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
  speech_counts, text_counts = scoring.score_both_ways(
      zspeech, ztext, speech_keys, text_keys, mesh=mesh, blocking=BLOCKINGS[blocking_name])
  for counts, want in ((speech_counts, brute_counts(zspeech, ztext, speech_keys, text_keys)),
                       (text_counts, brute_counts(ztext, zspeech, text_keys, speech_keys))):
    above, ties, is_query = want
    np.testing.assert_array_equal(counts.is_query, is_query)
    np.testing.assert_array_equal(counts.above[is_query], above[is_query])
    np.testing.assert_array_equal(counts.ties[is_query], ties[is_query])
    np.testing.assert_array_equal(counts.ranks[is_query], 1 + above[is_query])
    np.testing.assert_array_equal(counts.tied_at_top, is_query & (above == 0) & (ties > 0))


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("count_ties", [False, True])
def test_plain_pairs_count_the_diagonal_tiles_once(devices, count_ties):
  """Row i paired with column i: the pair pass counts the diagonal tiles, the walk skips them."""
  rng = np.random.default_rng(8)
  zspeech = rng.integers(-2, 3, (70, 6)).astype(np.float32)
  ztext = rng.integers(-2, 3, (70, 6)).astype(np.float32)
  ztext[50] = ztext[2]  # Duplicates in different tiles and chunks.
  zspeech[9] = zspeech[61]
  keys = np.arange(70)
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
  # Square tiles, several row and column chunks, padding.
  blocking = scoring.Blocking(block_rows=4, block_cols=4, chunk_rows=8, chunk_cols=12,
                              pair_batch=1)
  speech_counts, text_counts = scoring.score_both_ways(
      zspeech, ztext, keys, keys, count_ties=count_ties, mesh=mesh, blocking=blocking)
  for counts, want in ((speech_counts, brute_counts(zspeech, ztext, keys, keys)),
                       (text_counts, brute_counts(ztext, zspeech, keys, keys))):
    above, ties, _ = want
    np.testing.assert_array_equal(counts.above, above)
    if count_ties:
      np.testing.assert_array_equal(counts.ties, ties)


def test_one_direction_and_no_ties(integer_pools):
  zspeech, ztext, speech_keys, text_keys = integer_pools
  speech_counts, text_counts = scoring.score_both_ways(
      zspeech, ztext, speech_keys, text_keys, text_to_speech=False, count_ties=False,
      mesh=one_device_mesh(), blocking=BLOCKINGS["small_tiles"])
  assert text_counts is None
  above, _, is_query = brute_counts(zspeech, ztext, speech_keys, text_keys)
  np.testing.assert_array_equal(speech_counts.above[is_query], above[is_query])
  assert not speech_counts.ties.any()


def test_float_duplicates_tie_exactly_across_tiles_and_chunks():
  """Identical float32 embeddings must tie as in a full matrix, wherever the tiles cut."""
  rng = np.random.default_rng(5)
  zspeech = rng.standard_normal((200, 64)).astype(np.float32)
  zspeech /= np.linalg.norm(zspeech, axis=1, keepdims=True)
  ztext = zspeech + 0.7 * rng.standard_normal((200, 64)).astype(np.float32)
  ztext /= np.linalg.norm(ztext, axis=1, keepdims=True)
  duplicates = [(3, 150), (17, 18), (64, 199), (100, 5)]
  for original, duplicate in duplicates:
    ztext[duplicate] = ztext[original]
  keys = np.arange(200)
  blocking = scoring.Blocking(block_rows=16, block_cols=32, chunk_rows=32, chunk_cols=64,
                              pair_batch=2)
  for devices in (1, 8):
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    speech_counts, _ = scoring.score_both_ways(zspeech, ztext, keys, keys, mesh=mesh,
                                               blocking=blocking)
    for original, duplicate in duplicates:
      # Speech `original` sees text `duplicate` score exactly like its gold text, and back.
      assert speech_counts.ties[original] >= 1
      assert speech_counts.ties[duplicate] >= 1
    # Every other rank agrees with float64 except within rounding of a near tie.
    full = zspeech.astype(np.float64) @ ztext.astype(np.float64).T  # (n, d) @ (d, n)
    gold = np.diag(full)
    near = np.abs(full - gold[:, None]) < 1e-5
    want = 1 + np.sum((full > gold[:, None]) & ~near, axis=1)
    slack = np.sum(near, axis=1) - 1
    got = speech_counts.ranks
    assert np.all((got >= want) & (got <= want + slack))
  # With duplicates as hits the duplicate joins the gold set and stops being a tie.
  merged = keys.copy()
  for original, duplicate in duplicates:
    merged[duplicate] = original
  plain, _ = scoring.score_both_ways(zspeech, ztext, keys, keys, mesh=one_device_mesh(),
                                     blocking=blocking)
  merged_counts, _ = scoring.score_both_ways(zspeech, ztext, merged, merged,
                                             mesh=one_device_mesh(), blocking=blocking)
  for original, duplicate in duplicates:
    for query in (original, duplicate):
      assert merged_counts.above[query] == plain.above[query]
      assert merged_counts.ties[query] == plain.ties[query] - 1


def test_gold_pairs_are_every_equal_key_pair():
  rng = np.random.default_rng(6)
  speech_keys = rng.integers(0, 9, 30)
  text_keys = rng.integers(0, 9, 25)
  pair_speech, pair_text = scoring.gold_pairs(speech_keys, text_keys)
  want = {(s, t) for s in range(30) for t in range(25) if speech_keys[s] == text_keys[t]}
  assert set(zip(pair_speech.tolist(), pair_text.tolist())) == want
  assert len(pair_speech) == len(want)


def test_keys_that_are_not_ids_are_refused():
  with pytest.raises(scoring.TooManyPairsError, match="repeat too often"):
    scoring.gold_pairs(np.zeros(200, int), np.zeros(200, int))


def test_sampled_candidates_hold_the_gold_and_distinct_others():
  rng = np.random.default_rng(7)
  candidate_keys = rng.permutation(60)
  query_keys = np.concatenate([np.arange(40), [100, 101]])  # Two queries without gold.
  queries, lists = scoring.sample_candidates(query_keys, candidate_keys, 10, seed=[3, 0])
  np.testing.assert_array_equal(queries, np.arange(40))
  assert lists.shape == (40, 10)
  np.testing.assert_array_equal(candidate_keys[lists[:, 0]], query_keys[:40])
  for row in lists:
    assert len(set(row.tolist())) == 10
    assert row.min() >= 0 and row.max() < 60
  again = scoring.sample_candidates(query_keys, candidate_keys, 10, seed=[3, 0])[1]
  other = scoring.sample_candidates(query_keys, candidate_keys, 10, seed=[4, 0])[1]
  np.testing.assert_array_equal(lists, again)
  assert not np.array_equal(lists, other)
  # Every non-gold candidate is drawn: over many queries the whole pool shows up.
  _, many = scoring.sample_candidates(np.zeros(500, int), np.arange(60), 10, seed=0)
  assert set(many[:, 1:].ravel().tolist()) == set(range(1, 60))
  with pytest.raises(ValueError, match="pool holds 60"):
    scoring.sample_candidates(query_keys, candidate_keys, 61, seed=0)


@pytest.mark.parametrize("devices", [1, 8])
def test_listed_scores_match_brute_force(integer_pools, devices):
  zspeech, ztext, speech_keys, text_keys = integer_pools
  mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
  queries, lists = scoring.sample_candidates(speech_keys, text_keys, 12, seed=1)
  counts = scoring.score_listed(zspeech, ztext, speech_keys, text_keys, lists, queries,
                                mesh=mesh, chunk_bytes=4096)
  full = zspeech.astype(np.float64) @ ztext.astype(np.float64).T  # (s, d) @ (d, t)
  ranks, _ = reference.direction_ranks(
      full, speech_keys, text_keys,
      {int(q): row.tolist() for q, row in zip(queries, lists)})
  assert set(np.flatnonzero(counts.is_query).tolist()) == set(ranks)
  for query, rank in ranks.items():
    assert counts.ranks[query] == rank


def test_device_memory_grows_with_the_chunk_not_its_square():
  """The compiled walk's scratch memory is linear in the resident rows and columns."""
  mesh = one_device_mesh()
  walk = scoring._compiled_walk(mesh, 64, 64, True, True, True, True)
  temp = {}
  for size in (4096, 16384):
    vectors = jax.ShapeDtypeStruct((size, 32), np.float32)
    gold = jax.ShapeDtypeStruct((size,), np.float32)
    block = jax.ShapeDtypeStruct((), np.int32)
    compiled = walk.lower(vectors, vectors, gold, gold, block, block).compile()
    temp[size] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[16384] < 100 * 16384 * 4  # The full matrix would be 16384 * 16384 * 4 bytes.
  assert temp[16384] < 6 * temp[4096]


def test_default_blocking_and_overrides():
  blocking = scoring.make_blocking(block_rows=3000, platform="cpu")
  assert blocking.block_rows == 3000
  assert blocking.chunk_rows % 3000 == 0 and blocking.chunk_rows >= 3000
  assert scoring.make_blocking(platform="gpu").block_rows > scoring.make_blocking(
      platform="cpu").block_rows
  with pytest.raises(ValueError):
    scoring.make_blocking(block_rows=-1)
