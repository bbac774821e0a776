"""Brute-force retrieval reference used by the retrieval tests.

Everything here is the slow obvious way: the full score matrix in float64 and plain loops over
every query and candidate. The corpora are integer-valued, so every score is exact in any
float type and the blocked float32 scorer must agree exactly, planted ties included.
"""

import statistics

import numpy as np

LANGUAGES = ("en", "fr", "de")


def planted_corpus(seed: int = 0, dim: int = 8) -> dict[str, np.ndarray]:
  """96 pairs in three languages with planted duplicate texts, duplicate clips and ties.

  Rows 0-47 are English with text ids 0-47; rows 48-79 French and 80-95 German translations
  of English texts (same text id); text-only German and French queries follow. Small integer
  entries make exact ties common even where none were planted.
  """
  rng = np.random.default_rng(seed)
  num_pairs = 96
  speech = rng.integers(-2, 3, (num_pairs, dim)).astype(np.float32)
  # Speech close to its text, so ranks are spread out rather than all random.
  text = (speech + rng.integers(-1, 2, (num_pairs, dim))).astype(np.float32)
  text_id = np.concatenate([np.arange(48), rng.permutation(48)[:32],
                            rng.permutation(48)[:16]]).astype(np.int64)
  language = np.array(["en"] * 48 + ["fr"] * 32 + ["de"] * 16)
  # Duplicate English texts: same words, same id, identical embedding.
  for original, duplicate in ((3, 40), (7, 8), (11, 45), (20, 21)):
    text[duplicate] = text[original]
    text_id[duplicate] = text_id[original]
  text[46] = text[20]  # A triple.
  text_id[46] = text_id[20]
  # Identical clips of different texts: ties among speech candidates.
  speech[30] = speech[5]
  speech[60] = speech[12]
  category = np.array(["news", "fiction", "belles lettres"])[rng.integers(0, 3, num_pairs)]
  source = np.array(["brown", "fleurs"])[rng.integers(0, 2, num_pairs)]
  query_text = rng.integers(-2, 3, (12, dim)).astype(np.float32)
  query_text_id = rng.permutation(48)[:12].astype(np.int64)
  query_text[:4] = text[query_text_id[:4]]  # Some translations embed like the English.
  query_language = np.array(["de"] * 6 + ["fr"] * 6)
  return dict(speech=speech, text=text, text_id=text_id, language=language, category=category,
              source=source, query_text=query_text, query_text_id=query_text_id,
              query_language=query_language)


def direction_ranks(scores, query_keys, candidate_keys, candidate_lists=None,
                    skip_ties=False):
  """{query: rank} by the paper's rule and the set of tie-skipped queries.

  scores[q][c] is query q against candidate c; candidate_lists maps a query to the only
  candidates it sees (soft protocol), or is None (hard protocol: all candidates).
  """
  ranks, skipped = {}, set()
  for query in range(len(scores)):
    if candidate_lists is None:
      candidates = range(len(candidate_keys))
    elif query in candidate_lists:
      candidates = candidate_lists[query]
    else:
      continue
    gold = [c for c in candidates if candidate_keys[c] == query_keys[query]]
    if not gold:
      continue
    best = max(scores[query][c] for c in gold)
    others = [scores[query][c] for c in candidates if candidate_keys[c] != query_keys[query]]
    above = sum(1 for score in others if score > best)
    ties = sum(1 for score in others if score == best)
    if skip_ties and above == 0 and ties > 0:
      skipped.add(query)
      continue
    ranks[query] = 1 + above
  return ranks, skipped


def summary(ranks, ks=(1, 5, 10)):
  ranks = list(ranks)
  count = len(ranks)
  out = {f"hits@{k}": sum(1 for r in ranks if r <= k) / count for k in ks}
  out["mrr"] = sum(1.0 / r for r in ranks) / count
  out["mean_rank"] = sum(ranks) / count
  out["median_rank"] = float(statistics.median(ranks))
  out["num_queries"] = float(count)
  return out


def reference_metrics(arrays, *, kind="hard", skip_ties=False, duplicates_as_hits=False,
                      breakdowns=("category", "language", "source"), cross_lingual=(),
                      ks=(1, 5, 10), candidate_lists=None):
  """Every metric the evaluation reports, computed by brute force.

  candidate_lists(tag, query_keys, candidate_keys) -> {query: [candidates]} gives the soft
  protocol's draws for a seed tag; the sampler itself is tested on its own.
  """
  speech = np.asarray(arrays["speech"], np.float64)
  text = np.asarray(arrays["text"], np.float64)
  size = len(speech)
  keys = arrays["text_id"] if duplicates_as_hits else np.arange(size)
  metrics = {}

  def both_directions(zspeech, ztext, speech_keys, text_keys, tag):
    full = zspeech @ ztext.T  # (ns, d) @ (d, nt) -> (ns, nt), exact for integer entries.
    lists = [None, None]
    if kind == "soft":
      lists = [candidate_lists((*tag, 0), speech_keys, text_keys),
               candidate_lists((*tag, 1), text_keys, speech_keys)]
    return {
        "speech_to_text": direction_ranks(full, speech_keys, text_keys, lists[0], skip_ties),
        "text_to_speech": direction_ranks(full.T, text_keys, speech_keys, lists[1], skip_ties),
    }

  def add(prefix, ranks, skipped, members):
    chosen = [ranks[q] for q in sorted(ranks) if q in members]
    if not chosen:
      return
    for name, value in summary(chosen, ks).items():
      metrics[f"{prefix}/{name}"] = value
    if skip_ties:
      metrics[f"{prefix}/num_skipped"] = float(len(skipped & members))

  results = both_directions(speech, text, keys, keys, ())
  everyone = set(range(size))
  for direction, (ranks, skipped) in results.items():
    add(direction, ranks, skipped, everyone)
  for field in breakdowns:
    for value in sorted(set(arrays[field])):
      members = {i for i in range(size) if arrays[field][i] == value}
      segment = value.replace(" ", "_")
      for direction, (ranks, skipped) in results.items():
        add(f"by_{field}/{segment}/{direction}", ranks, skipped, members)
  for pair_index, (text_language, speech_language) in enumerate(cross_lingual):
    speech_rows = [i for i in range(size) if arrays["language"][i] == speech_language]
    text_rows = [i for i in range(size) if arrays["language"][i] == text_language]
    query_rows = [i for i in range(len(arrays["query_text"]))
                  if arrays["query_language"][i] == text_language]
    ztext = np.concatenate([text[text_rows],
                            np.asarray(arrays["query_text"], np.float64)[query_rows]])
    text_keys = np.concatenate([arrays["text_id"][text_rows],
                                arrays["query_text_id"][query_rows]])
    pair = both_directions(speech[speech_rows], ztext, arrays["text_id"][speech_rows],
                           text_keys, (pair_index + 1,))
    prefix = f"cross_lingual/text_{text_language}-speech_{speech_language}"
    for direction, (ranks, skipped) in pair.items():
      add(f"{prefix}/{direction}", ranks, skipped, set(range(len(ztext) + len(speech_rows))))
  return metrics
