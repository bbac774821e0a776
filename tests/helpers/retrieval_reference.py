"""Brute-force retrieval reference used by the retrieval tests.

Everything here is the slow obvious way: the full score matrix in float64 and plain loops over
every query and candidate. The corpora are integer-valued, so every score is exact in any
float type and the blocked float32 scorer must agree exactly, planted ties included. The
'paper' tie rule is re-stated as the authors' loop (`authors_direction`: np.argmax, the
strictly-greater rank, their skip condition), independently of the project's counts.
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


def tied_corpus(seed: int = 0) -> dict[str, np.ndarray]:
  """64 pairs whose scores tie everywhere: entries in {-1, 0, 1}, dimension 4, many duplicate
  texts (and duplicate clips) on both sides of each other's index, two sources, and
  French/German translations for the cross-lingual pairs."""
  rng = np.random.default_rng(seed)
  num_pairs, dim = 64, 4
  speech = rng.integers(-1, 2, (num_pairs, dim)).astype(np.float32)
  text = speech.copy()
  flip = rng.random((num_pairs, dim)) < 0.3
  text[flip] = rng.integers(-1, 2, int(flip.sum()))
  text_id = np.arange(num_pairs, dtype=np.int64)
  text_id[40:] = rng.permutation(40)[:24]  # Rows 40-63 translate English rows 0-39.
  language = np.array(["en"] * 40 + ["fr"] * 12 + ["de"] * 12)
  for original, duplicate in ((2, 30), (31, 5), (9, 10), (17, 16), (22, 23), (23, 35)):
    text[duplicate] = text[original]
    text_id[duplicate] = text_id[original]
  speech[12] = speech[3]
  speech[50] = speech[44]
  source = np.array(["brown", "common_voice"])[rng.integers(0, 2, num_pairs)]
  category = np.array(["news", "fiction"])[rng.integers(0, 2, num_pairs)]
  query_text = rng.integers(-1, 2, (6, dim)).astype(np.float32)
  query_text_id = rng.permutation(40)[:6].astype(np.int64)
  query_text[:3] = text[query_text_id[:3]]
  query_language = np.array(["fr"] * 3 + ["de"] * 3)
  return dict(speech=speech, text=text, text_id=text_id, language=language, source=source,
              category=category, query_text=query_text, query_text_id=query_text_id,
              query_language=query_language)


def direction_counts(scores, query_keys, candidate_keys, candidate_lists=None):
  """{query: (above, ties)} with the gold score the best of the query's gold candidates.

  scores[q][c] is query q against candidate c; candidate_lists maps a query to the only
  candidates it sees (soft protocol), or is None (hard protocol: all candidates).
  """
  counts = {}
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
    counts[query] = (sum(1 for score in others if score > best),
                     sum(1 for score in others if score == best))
  return counts


def direction_ranks(scores, query_keys, candidate_keys, candidate_lists=None,
                    skip_ties=False):
  """{query: rank} by the strictly-greater rule and the set of tie-skipped queries (a query
  whose top score the gold set shares with another candidate)."""
  ranks, skipped = {}, set()
  for query, (above, ties) in direction_counts(scores, query_keys, candidate_keys,
                                               candidate_lists).items():
    if skip_ties and above == 0 and ties > 0:
      skipped.add(query)
      continue
    ranks[query] = 1 + above
  return ranks, skipped


def authors_direction(scores, query_keys, candidate_keys, candidate_lists=None,
                      skip_ties=False):
  """The authors' evaluation loop for one direction: {query: (hit, rank)} and the skipped set.

  Per query the row of candidate scores in candidate order (list order for the soft protocol):
  the prediction is `np.argmax(row)` (the first of equal maxima), a hit when it is a gold
  candidate; the rank is 1 + the candidates scoring strictly above the gold score; with tie
  skipping a query is left out when the prediction is not gold but scores exactly the gold
  score.
  """
  outcomes, skipped = {}, set()
  for query in range(len(scores)):
    if candidate_lists is None:
      candidates = list(range(len(candidate_keys)))
    elif query in candidate_lists:
      candidates = list(candidate_lists[query])
    else:
      continue
    row = np.array([scores[query][c] for c in candidates], dtype=np.float64)
    gold_positions = [p for p, c in enumerate(candidates)
                      if candidate_keys[c] == query_keys[query]]
    if not gold_positions:
      continue
    gold_score = max(row[p] for p in gold_positions)
    predicted = int(np.argmax(row))
    if skip_ties and predicted not in gold_positions and row[predicted] == gold_score:
      skipped.add(query)
      continue
    outcomes[query] = (predicted in gold_positions, 1 + int(np.sum(row > gold_score)))
  return outcomes, skipped


def rank_summary(ranks, ks=(1, 5, 10)):
  """Metrics of plain ranks."""
  ranks = list(ranks)
  count = len(ranks)
  out = {f"hits@{k}": sum(1 for r in ranks if r <= k) / count for k in ks}
  out["mrr"] = sum(1.0 / r for r in ranks) / count
  out["mean_rank"] = sum(ranks) / count
  out["median_rank"] = float(statistics.median(ranks))
  out["num_queries"] = float(count)
  return out


summary = rank_summary  # The name the hand-worked tests use.


def expected_summary(counts, ks=(1, 5, 10)):
  """Metrics averaged over every equally likely place of the gold among its ties."""
  count = len(counts)
  out = {f"hits@{k}": 0.0 for k in ks}
  out["mrr"] = 0.0
  expected_ranks = []
  for above, ties in counts:
    places = [1 + above + j for j in range(ties + 1)]
    for k in ks:
      out[f"hits@{k}"] += sum(1 for r in places if r <= k) / len(places) / count
    out["mrr"] += sum(1.0 / r for r in places) / len(places) / count
    expected_ranks.append(sum(places) / len(places))
  out["mean_rank"] = sum(expected_ranks) / count
  out["median_rank"] = float(statistics.median(expected_ranks))
  out["num_queries"] = float(count)
  return out


def threshold_summary(records, threshold):
  """Golden accuracy and scikit-learn's macro / micro precision, recall and F1 over the pooled
  per-candidate decisions of `records` ((gold score, truths, scores) per query)."""
  from sklearn import metrics as sk  # pylint: disable=g-import-not-at-top
  truth = np.concatenate([np.asarray(t, int) for _, t, _ in records])
  predicted = np.concatenate([(np.asarray(s) >= threshold).astype(int) for _, _, s in records])
  out = {"golden_accuracy": float(np.mean([g >= threshold for g, _, _ in records]))}
  for average in ("macro", "micro"):
    out[f"{average}_precision"] = sk.precision_score(truth, predicted, average=average,
                                                     zero_division=0)
    out[f"{average}_recall"] = sk.recall_score(truth, predicted, average=average,
                                               zero_division=0)
    out[f"{average}_f1"] = sk.f1_score(truth, predicted, average=average, zero_division=0)
  return out


def decision_records(scores, query_keys, candidate_keys, candidate_lists=None):
  """{query: (gold score, [is gold per candidate], [score per candidate])}."""
  records = {}
  for query in range(len(scores)):
    if candidate_lists is None:
      candidates = range(len(candidate_keys))
    elif query in candidate_lists:
      candidates = candidate_lists[query]
    else:
      continue
    truths = [candidate_keys[c] == query_keys[query] for c in candidates]
    if not any(truths):
      continue
    row = [scores[query][c] for c in candidates]
    records[query] = (max(s for s, t in zip(row, truths) if t), truths, row)
  return records


def _direction(full, query_keys, candidate_keys, lists, ties, skip_ties, threshold):
  """{query: metric input} and the skipped set for one direction under a tie rule."""
  if ties == "paper":
    outcomes, skipped = authors_direction(full, query_keys, candidate_keys, lists, skip_ties)
  else:
    counts = direction_counts(full, query_keys, candidate_keys, lists)
    skipped = ({q for q, (above, tied) in counts.items() if above == 0 and tied > 0}
               if skip_ties else set())
    outcomes = {q: c for q, c in counts.items() if q not in skipped}
  records = (decision_records(full, query_keys, candidate_keys, lists)
             if threshold is not None else {})
  return outcomes, skipped, records


def _summarise(outcomes, ties, ks):
  if ties == "paper":
    out = rank_summary([rank for _, rank in outcomes], ks)
    if 1 in ks:
      out["hits@1"] = sum(1 for hit, _ in outcomes if hit) / len(outcomes)
    return out
  if ties == "expected":
    return expected_summary(outcomes, ks)
  if ties == "pessimistic":
    return rank_summary([1 + above + tied for above, tied in outcomes], ks)
  return rank_summary([1 + above for above, _ in outcomes], ks)


def reference_metrics(arrays, *, kind="hard", ties="optimistic", skip_ties=False,
                      duplicates_as_hits=False, breakdowns=("category", "language", "source"),
                      cross_lingual=(), ks=(1, 5, 10), candidate_lists=None, threshold=None):
  """Every metric the evaluation reports, computed by brute force.

  candidate_lists(tag, query_keys, candidate_keys) -> {query: [candidates]} gives the soft
  protocol's lists for a seed tag ((0,) / (1,) for the paired corpus' two directions, (i, 0) /
  (i, 1) for cross-lingual pair i); the sampler itself is tested on its own.
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
        "speech_to_text": _direction(full, speech_keys, text_keys, lists[0], ties, skip_ties,
                                     threshold),
        "text_to_speech": _direction(full.T, text_keys, speech_keys, lists[1], ties, skip_ties,
                                     threshold),
    }

  def add(prefix, outcomes, skipped, records, members):
    chosen = [outcomes[q] for q in sorted(outcomes) if q in members]
    if not chosen:
      return
    values = _summarise(chosen, ties, ks)
    if threshold is not None:
      values.update(threshold_summary([records[q] for q in sorted(outcomes) if q in members],
                                      threshold))
    for name, value in values.items():
      metrics[f"{prefix}/{name}"] = value
    if skip_ties:
      metrics[f"{prefix}/num_skipped"] = float(len(skipped & members))

  results = both_directions(speech, text, keys, keys, ())
  everyone = set(range(size))
  for direction, result in results.items():
    add(direction, *result, everyone)
  for field in breakdowns:
    for value in sorted(set(arrays[field])):
      members = {i for i in range(size) if arrays[field][i] == value}
      segment = value.replace(" ", "_")
      for direction, result in results.items():
        add(f"by_{field}/{segment}/{direction}", *result, members)
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
    for direction, result in pair.items():
      add(f"{prefix}/{direction}", *result, set(range(len(ztext) + len(speech_rows))))
  return metrics
