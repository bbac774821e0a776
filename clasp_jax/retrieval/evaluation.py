"""The paper's retrieval protocols, both directions, with breakdowns and cross-lingual pairs.

Protocols (see docs/evaluation.md):
  hard: every query ranks its gold item against the whole corpus.
  soft: every query ranks its gold item among K candidates, the gold one plus K - 1 drawn at
    random (seeded) from the rest of the corpus.
Both directions are evaluated: speech->text (a clip queries all texts) and text->speech.

Options the paper used: the rank rule (1 + candidates strictly above the gold), how a tie with
the gold candidate counts (`ties`: 'paper' is the authors' argmax rule, see metrics.TIE_RULES),
skipping queries whose top score ties the gold one with a different item (`skip_ties`; under
'paper' only when that item has the lower index, as the authors' code skips), counting a
duplicate text as a hit (`duplicates_as_hits`, duplicates share a `text_id`), the authors'
candidate lists for the soft protocol (`candidates`) and their thresholded decisions
(`threshold`). Breakdowns slice the queries of one evaluation by category, language or source:
a news query is still ranked against the whole corpus, which is how the paper's per-source
columns add up to its total.

The input is a mapping of arrays (`Corpus.from_mapping`), so embeddings from an .npz file, a
training step or any other source plug in the same way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from clasp_jax.retrieval import metrics as metrics_lib
from clasp_jax.retrieval import scoring

PROTOCOLS = ("hard", "soft")
DIRECTIONS = metrics_lib.DIRECTIONS  # ("speech_to_text", "text_to_speech")
BREAKDOWN_FIELDS = ("category", "language", "source")
PAIRED_FIELDS = ("speech", "text") + BREAKDOWN_FIELDS + ("text_id",)
QUERY_FIELDS = ("query_text", "query_language", "query_text_id")
KNOWN_FIELDS = PAIRED_FIELDS + QUERY_FIELDS


class InputError(ValueError):
  """The embeddings or the protocol settings cannot be evaluated; the message says why."""


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How to evaluate.

  Attributes:
    kind: 'hard' (whole corpus) or 'soft' (num_candidates per query).
    num_candidates: K of the soft protocol, the gold candidate included.
    seed: seeds the soft protocol's random candidates.
    skip_ties: leave out queries whose top score ties the gold one with another item (under
      ties='paper': only when that item has a lower index than the gold one, the authors'
      rule).
    ties: how a tie with the gold candidate counts, one of metrics.TIE_RULES.
    threshold: when set, also the authors' golden accuracy and the macro / micro precision,
      recall and F1 of the decisions 'candidate scores at least threshold'.
    duplicates_as_hits: any text with the gold `text_id` counts as the gold text (and any clip
      of such a text as the gold clip).
    breakdowns: fields to slice by; None means every one of BREAKDOWN_FIELDS the corpus has.
    cross_lingual: (text language, speech language) pairs: texts in the first retrieve speech
      in the second and back, paired by `text_id`.
    ks: the k of HITS@k.
  """

  kind: str = "hard"
  num_candidates: int = 100
  seed: int = 0
  skip_ties: bool = False
  duplicates_as_hits: bool = False
  breakdowns: Optional[tuple[str, ...]] = None
  cross_lingual: tuple[tuple[str, str], ...] = ()
  ks: tuple[int, ...] = metrics_lib.DEFAULT_KS
  ties: str = metrics_lib.DEFAULT_TIE_RULE
  threshold: Optional[float] = None

  def __post_init__(self):
    if self.kind not in PROTOCOLS:
      raise InputError(f"protocol must be one of {PROTOCOLS}, got {self.kind!r}")
    if self.ties not in metrics_lib.TIE_RULES:
      raise InputError(f"ties must be one of {metrics_lib.TIE_RULES}, got {self.ties!r}")
    if self.threshold is not None and not np.isfinite(self.threshold):
      raise InputError(f"threshold must be a finite number, got {self.threshold}")
    if self.kind == "soft" and self.num_candidates < 1:
      raise InputError(f"num_candidates must be at least 1, got {self.num_candidates}")
    if self.breakdowns is not None:
      unknown = sorted(set(self.breakdowns) - set(BREAKDOWN_FIELDS))
      if unknown:
        raise InputError(f"unknown breakdowns {unknown}; choose from {BREAKDOWN_FIELDS}")
    if not self.ks or any(k < 1 for k in self.ks):
      raise InputError(f"ks must be positive, got {self.ks}")


def read_candidates(path: str, num_items: int) -> np.ndarray:
  """A candidate-list file: line i holds the candidate indices of query i.

  Indices are separated by spaces, tabs or commas and count from 0; every line lists the same
  number of candidates, the gold one anywhere among them. Returns (num_items, K) int64.
  """
  try:
    with open(path, encoding="utf-8") as stream:
      lines = stream.read().splitlines()
  except (OSError, UnicodeDecodeError) as error:
    raise InputError(f"--candidates: cannot read {path}: {error}") from error
  while lines and not lines[-1].strip():
    lines.pop()
  if len(lines) != num_items:
    raise InputError(f"--candidates: {path} has {len(lines)} lines, one per query is needed "
                     f"({num_items})")
  rows = []
  for number, line in enumerate(lines, start=1):
    fields = line.replace(",", " ").split()
    try:
      rows.append([int(field) for field in fields])
    except ValueError:
      raise InputError(f"--candidates: {path}:{number}: not a list of integers: "
                       f"{line.strip()[:60]!r}") from None
    if not rows[-1]:
      raise InputError(f"--candidates: {path}:{number}: no candidates")
    if len(rows[-1]) != len(rows[0]):
      raise InputError(f"--candidates: {path}:{number}: {len(rows[-1])} candidates, line 1 "
                       f"has {len(rows[0])}; every query needs as many")
  lists = np.asarray(rows, dtype=np.int64)
  bad = np.flatnonzero((lists < 0).any(axis=1) | (lists >= num_items).any(axis=1))
  if len(bad):
    raise InputError(f"--candidates: {path}:{bad[0] + 1}: indices must lie in "
                     f"[0, {num_items})")
  return lists


def parse_cross_lingual(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
  """'fr:en' (text in fr, speech in en) -> ('fr', 'en')."""
  pairs = []
  for spec in specs:
    parts = spec.split(":")
    if len(parts) != 2 or not all(parts):
      raise InputError(f"cross-lingual pair {spec!r} is not TEXT_LANGUAGE:SPEECH_LANGUAGE")
    pairs.append((parts[0], parts[1]))
  return tuple(pairs)


def _as_list(value: Any) -> tuple[str, ...]:
  """A setting given as a sequence or as one comma-separated string."""
  if isinstance(value, str):
    return tuple(item.strip() for item in value.split(",") if item.strip())
  return tuple(str(item) for item in value)


def define_protocol_flags(flag_values: Any) -> None:
  """The protocol's command-line flags (`evaluate`), with Protocol's defaults."""
  default = Protocol()
  flag_values.DEFINE_enum(
      "protocol", default.kind, PROTOCOLS,
      "hard: rank against the whole corpus; soft: rank among --num_candidates candidates.")
  flag_values.DEFINE_integer(
      "num_candidates", default.num_candidates,
      "Soft protocol: candidates per query, the gold one included.")
  flag_values.DEFINE_integer("seed", default.seed, "Soft protocol: seed of the random candidates.")
  flag_values.DEFINE_string(
      "candidates", None, "Soft protocol: a file whose line i lists the candidate indices of "
      "query i (spaces or commas, the gold one anywhere, as many on every line), e.g. the "
      "authors' lists, instead of --num_candidates random ones; both directions use it.")
  flag_values.DEFINE_enum(
      "ties", default.ties, metrics_lib.TIE_RULES,
      "How a tie with the gold candidate counts. expected: averaged over a random order of the "
      "tied candidates; paper: the authors' code (HITS@1 = argmax == gold, a tie goes to the "
      "lower index; ranks count strictly higher scores); optimistic: every tie is won; "
      "pessimistic: every tie is lost.")
  flag_values.DEFINE_float(
      "threshold", default.threshold, "Also report the authors' golden accuracy (share of "
      "queries whose gold score is at least this) and macro / micro precision, recall and F1 "
      "of the decisions 'candidate scores at least this'.")
  flag_values.DEFINE_bool(
      "skip_ties", default.skip_ties, "Leave out queries whose top score ties the gold one with "
      "another item (with --ties=paper only when that item has the lower index, as the authors "
      "skip); reports num_skipped.")
  flag_values.DEFINE_bool(
      "duplicates_as_hits", default.duplicates_as_hits,
      "A text with the gold text's `text_id` counts as a hit.")
  flag_values.DEFINE_list(
      "breakdowns", default.breakdowns, "Fields to slice the queries by (category, language, "
      "source); default every one the file has; empty for none.")
  flag_values.DEFINE_list(
      "cross_lingual", list(default.cross_lingual), "TEXT_LANG:SPEECH_LANG pairs: texts in the "
      "first retrieve speech in the second and back, paired by `text_id` (needs `language` and "
      "`text_id`).")
  flag_values.DEFINE_list("ks", [str(k) for k in default.ks], "The k of HITS@k.")


def protocol_from_settings(get: Callable[[str], Any]) -> Protocol:
  """The Protocol that named settings describe, from flags or an evaluator's config alike.

  `get(name)` returns a setting (the names of define_protocol_flags) or None for its default;
  lists may be sequences or comma-separated strings. Raises InputError for bad values.
  """
  default = Protocol()
  value = lambda name, fallback: fallback if get(name) is None else get(name)
  try:
    ks = tuple(int(k) for k in _as_list(value("ks", default.ks)))
  except ValueError:
    raise InputError(f"ks must be integers, got {get('ks')}") from None
  breakdowns = get("breakdowns")
  threshold = get("threshold")
  return Protocol(
      kind=str(value("protocol", default.kind)),
      num_candidates=int(value("num_candidates", default.num_candidates)),
      seed=int(value("seed", default.seed)),
      skip_ties=bool(value("skip_ties", default.skip_ties)),
      duplicates_as_hits=bool(value("duplicates_as_hits", default.duplicates_as_hits)),
      breakdowns=None if breakdowns is None else _as_list(breakdowns),
      cross_lingual=parse_cross_lingual(_as_list(value("cross_lingual", ()))),
      ks=ks,
      ties=str(value("ties", default.ties)),
      threshold=None if threshold is None else float(threshold))


def _as_embeddings(name: str, value: Any) -> np.ndarray:
  array = np.asarray(value)
  if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
    raise InputError(f"{name} must be a non-empty (N, d) matrix, got shape {array.shape}")
  if not np.issubdtype(array.dtype, np.floating):
    raise InputError(f"{name} must hold floats, got dtype {array.dtype}")
  array = array if array.dtype == np.float32 else array.astype(np.float32)
  if not np.all(np.isfinite(array)):
    bad = int(np.flatnonzero(~np.all(np.isfinite(array), axis=1))[0])
    raise InputError(f"{name} row {bad} is not finite")
  return array


def _as_labels(name: str, value: Any, length: int) -> np.ndarray:
  array = np.asarray(value)
  if array.shape != (length,):
    raise InputError(f"{name} must have shape ({length},), got {array.shape}")
  if array.dtype.kind == "O":
    array = array.astype(str)
  if array.dtype.kind not in "USiub":
    raise InputError(f"{name} must hold strings or integers, got dtype {array.dtype}")
  return array.astype(str)


def _as_ids(name: str, value: Any, length: int) -> np.ndarray:
  array = np.asarray(value)
  if array.shape != (length,):
    raise InputError(f"{name} must have shape ({length},), got {array.shape}")
  if array.dtype.kind not in "iuUS":
    raise InputError(f"{name} must hold integers or strings, got dtype {array.dtype}")
  return array


def _normalize_rows(name: str, array: np.ndarray, in_place: bool,
                    chunk: int = 65536) -> np.ndarray:
  """L2-normalised rows (the scores become cosines), chunk by chunk to bound memory.

  in_place overwrites `array` when it allows, so a corpus loaded only for this run does not
  need a second copy; otherwise the caller's array is left alone.
  """
  if not (in_place and array.flags.writeable):
    array = array.copy()
  for start in range(0, len(array), chunk):
    block = array[start:start + chunk]
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    if np.any(norms == 0):
      bad = start + int(np.flatnonzero(norms[:, 0] == 0)[0])
      raise InputError(f"{name} row {bad} is all zeros and has no direction")
    block /= norms
  return array


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Paired embeddings (row i of speech and of text is a pair) and what is known of each row.

  Attributes:
    zspeech, ztext: (n, d) float32.
    category, language, source: optional (n,) str labels of row i.
    text_id: optional (n,) ids; equal ids mark the same text.
    query_text, query_language, query_text_id: optional text-only queries (m, d), (m,), (m,),
      e.g. machine translations, used by the cross-lingual evaluation alongside the pairs.
  """

  zspeech: np.ndarray
  ztext: np.ndarray
  category: Optional[np.ndarray] = None
  language: Optional[np.ndarray] = None
  source: Optional[np.ndarray] = None
  text_id: Optional[np.ndarray] = None
  query_text: Optional[np.ndarray] = None
  query_language: Optional[np.ndarray] = None
  query_text_id: Optional[np.ndarray] = None

  @property
  def size(self) -> int:
    return len(self.zspeech)

  @classmethod
  def from_mapping(cls, arrays: Mapping[str, Any], *, normalize: bool = False,
                   in_place: bool = False, strict: bool = False) -> "Corpus":
    """Validates a mapping like the .npz file's and builds the corpus.

    Args:
      arrays: 'speech' and 'text' plus any of the optional fields.
      normalize: L2-normalise the embeddings so scores are cosine similarities whatever the
        source produced.
      in_place: normalise the given float32 arrays themselves instead of copies.
      strict: reject keys that are not fields (catches typos such as 'languages').
    """
    missing = [name for name in ("speech", "text") if name not in arrays]
    if missing:
      raise InputError(f"missing {missing}; the embeddings need 'speech' and 'text'")
    if strict:
      unknown = sorted(set(arrays) - set(KNOWN_FIELDS))
      if unknown:
        raise InputError(f"unknown fields {unknown}; known fields are {list(KNOWN_FIELDS)}")
    zspeech = _as_embeddings("speech", arrays["speech"])
    ztext = _as_embeddings("text", arrays["text"])
    if zspeech.shape != ztext.shape:
      raise InputError(f"speech {zspeech.shape} and text {ztext.shape} must pair row by row")
    size = len(zspeech)
    fields = {}
    for name in BREAKDOWN_FIELDS:
      if name in arrays:
        fields[name] = _as_labels(name, arrays[name], size)
    if "text_id" in arrays:
      fields["text_id"] = _as_ids("text_id", arrays["text_id"], size)
    present = [name for name in QUERY_FIELDS if name in arrays]
    if present:
      if len(present) != len(QUERY_FIELDS):
        raise InputError(f"text-only queries need all of {list(QUERY_FIELDS)}, got {present}")
      query_text = _as_embeddings("query_text", arrays["query_text"])
      if query_text.shape[1] != zspeech.shape[1]:
        raise InputError(f"query_text has dimension {query_text.shape[1]}, the pairs "
                         f"{zspeech.shape[1]}")
      fields["query_text"] = query_text
      fields["query_language"] = _as_labels("query_language", arrays["query_language"],
                                            len(query_text))
      fields["query_text_id"] = _as_ids("query_text_id", arrays["query_text_id"],
                                        len(query_text))
      if "text_id" in fields and (fields["text_id"].dtype.kind in "iu") != (
          fields["query_text_id"].dtype.kind in "iu"):
        raise InputError("query_text_id and text_id must both be integers or both strings")
    if normalize:
      zspeech = _normalize_rows("speech", zspeech, in_place)
      ztext = _normalize_rows("text", ztext, in_place)
      if "query_text" in fields:
        fields["query_text"] = _normalize_rows("query_text", fields["query_text"], in_place)
    return cls(zspeech=zspeech, ztext=ztext, **fields)


@dataclasses.dataclass(frozen=True)
class DirectionResult:
  """Per-item outcome of one direction: which items were queries, their counts, what was skipped."""

  counts: scoring.GoldCounts
  skipped: np.ndarray  # (n,) bool: a query left out by tie skipping.

  @property
  def scored(self) -> np.ndarray:
    return self.counts.is_query & ~self.skipped

  @property
  def ranks(self) -> np.ndarray:
    return self.counts.ranks


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def clean_name(name: str) -> str:
  """A label as one metric-name segment (no '/', nothing TensorBoard would rewrite)."""
  return _NAME_UNSAFE.sub("_", str(name)) or "_"


def soft_candidates(query_keys: np.ndarray, candidate_keys: np.ndarray, protocol: Protocol,
                    seed_tag: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The soft protocol's (queries, (q, K) candidate lists) for one direction of one pool pair.

  `seed_tag` tells the directions and cross-lingual pairs apart, so each draws its own
  candidates while the whole evaluation stays a function of `protocol.seed`.
  """
  if protocol.num_candidates > len(candidate_keys):
    raise InputError(f"the soft protocol needs {protocol.num_candidates} candidates but the "
                     f"pool holds {len(candidate_keys)}")
  return scoring.sample_candidates(query_keys, candidate_keys, protocol.num_candidates,
                                   seed=[protocol.seed, *seed_tag])


class Evaluation:
  """Runs a protocol over a corpus and names every metric.

  `candidates` ((n, K) pool indices, e.g. from `read_candidates`) replaces the soft protocol's
  random candidates for the paired corpus: query i (clip i, and text i the other way) is
  ranked among the items listed in row i. Cross-lingual pairs still draw theirs.
  """

  def __init__(self, protocol: Protocol, *, mesh=None, blocking: Optional[scoring.Blocking] = None,
               progress: Optional[Callable[[str], None]] = None,
               candidates: Optional[np.ndarray] = None):
    if candidates is not None and protocol.kind != "soft":
      raise InputError("candidate lists are for the soft protocol (--protocol=soft)")
    self.protocol = protocol
    self.mesh = mesh
    self.blocking = blocking
    self.progress = progress
    self.candidates = None if candidates is None else np.asarray(candidates, np.int64)

  def directions(self, zspeech: np.ndarray, ztext: np.ndarray, speech_keys: np.ndarray,
                 text_keys: np.ndarray, seed_tag: Sequence[int] = (),
                 candidates: Optional[np.ndarray] = None) -> dict[str, DirectionResult]:
    """Both directions between a speech pool and a text pool, gold sets by equal keys."""
    protocol = self.protocol
    paper = protocol.ties == "paper"
    count_ties = protocol.ties in ("expected", "pessimistic") or (protocol.skip_ties and
                                                                   not paper)
    if protocol.kind == "hard":
      speech_counts, text_counts = scoring.score_both_ways(
          zspeech, ztext, speech_keys, text_keys, count_ties=count_ties,
          count_ties_before=paper, threshold=protocol.threshold, mesh=self.mesh,
          blocking=self.blocking, progress=self.progress)
    else:
      speech_counts = self._soft(zspeech, ztext, speech_keys, text_keys, (*seed_tag, 0),
                                 candidates)
      text_counts = self._soft(ztext, zspeech, text_keys, speech_keys, (*seed_tag, 1),
                               candidates)
    results = {}
    for direction, counts in zip(DIRECTIONS, (speech_counts, text_counts)):
      if not protocol.skip_ties:
        skipped = np.zeros(len(counts.above), bool)
      else:
        skipped = counts.tied_before_gold if paper else counts.tied_at_top
      results[direction] = DirectionResult(counts=counts, skipped=skipped)
    return results

  def _soft(self, zquery, zcandidate, query_keys, candidate_keys, seed_tag, candidates):
    if candidates is None:
      queries, lists = soft_candidates(query_keys, candidate_keys, self.protocol, seed_tag)
    else:
      queries, lists = np.arange(len(candidates)), candidates
      holds_gold = np.any(candidate_keys[lists] == query_keys[:, None], axis=1)
      if not np.all(holds_gold):
        line = int(np.flatnonzero(~holds_gold)[0]) + 1
        raise InputError(f"candidate list {line} (query {line - 1}) holds no gold candidate")
    if self.progress is not None:
      self.progress(f"soft protocol: {len(queries)} queries x {lists.shape[1]} candidates")
    return scoring.score_listed(zquery, zcandidate, query_keys, candidate_keys, lists, queries,
                                mesh=self.mesh, threshold=self.protocol.threshold)

  def summarise(self, result: DirectionResult, prefix: str,
                mask: Optional[np.ndarray] = None) -> dict[str, float]:
    """Metrics of the queries in `mask` under `prefix`; empty when none of them was scored."""
    protocol = self.protocol
    scored = result.scored if mask is None else result.scored & mask
    if not np.any(scored):
      return {}
    counts = result.counts

    def chosen(values):
      return None if values is None else values[scored]

    values = metrics_lib.metrics_from_counts(
        counts.above[scored], chosen(counts.ties), chosen(counts.ties_before),
        rule=protocol.ties, ks=protocol.ks)
    if protocol.threshold is not None:
      values.update(metrics_lib.threshold_metrics(
          counts.gold_score[scored], counts.gold_at_threshold[scored],
          counts.gold_members[scored], counts.at_threshold[scored],
          counts.num_candidates[scored], protocol.threshold))
    summary = {f"{prefix}/{name}": value for name, value in values.items()}
    summary[f"{prefix}/num_queries"] = float(np.sum(scored))
    if protocol.skip_ties:
      queries = counts.is_query if mask is None else counts.is_query & mask
      summary[f"{prefix}/num_skipped"] = float(np.sum(result.skipped & queries))
    return summary

  def run(self, corpus: Corpus) -> dict[str, float]:
    """Every metric: overall, per breakdown value, and per cross-lingual pair."""
    protocol = self.protocol
    if protocol.duplicates_as_hits and corpus.text_id is None:
      raise InputError("duplicates_as_hits needs text_id")
    keys = corpus.text_id if protocol.duplicates_as_hits else np.arange(corpus.size)
    if self.candidates is not None and len(self.candidates) != corpus.size:
      raise InputError(f"{len(self.candidates)} candidate lists for {corpus.size} queries")
    results = self.directions(corpus.zspeech, corpus.ztext, keys, keys,
                              candidates=self.candidates)
    metrics = {}
    for direction, result in results.items():
      metrics.update(self.summarise(result, direction))
    for field in self._breakdown_fields(corpus):
      labels = getattr(corpus, field)
      segments = {}
      for value in np.unique(labels):
        segment = clean_name(value)
        if segment in segments:
          raise InputError(f"{field} values {segments[segment]!r} and {value!r} both name "
                           f"metrics {segment!r}")
        segments[segment] = value
        for direction, result in results.items():
          metrics.update(self.summarise(result, f"by_{field}/{segment}/{direction}",
                                        mask=labels == value))
    for text_language, speech_language in protocol.cross_lingual:
      metrics.update(self._cross_lingual(corpus, text_language, speech_language))
    return metrics

  def _breakdown_fields(self, corpus: Corpus) -> tuple[str, ...]:
    if self.protocol.breakdowns is None:
      return tuple(field for field in BREAKDOWN_FIELDS if getattr(corpus, field) is not None)
    missing = [field for field in self.protocol.breakdowns if getattr(corpus, field) is None]
    if missing:
      raise InputError(f"breakdowns {missing} asked for but the embeddings have no such field")
    return tuple(self.protocol.breakdowns)

  def _cross_lingual(self, corpus: Corpus, text_language: str,
                     speech_language: str) -> dict[str, float]:
    """Texts in one language against speech in another, gold by equal text_id."""
    if corpus.text_id is None or corpus.language is None:
      raise InputError("cross-lingual evaluation needs text_id and language")
    speech_rows = np.flatnonzero(corpus.language == speech_language)
    text_rows = np.flatnonzero(corpus.language == text_language)
    ztext = [corpus.ztext[text_rows]]
    text_keys = [corpus.text_id[text_rows]]
    if corpus.query_text is not None:
      extra = np.flatnonzero(corpus.query_language == text_language)
      ztext.append(corpus.query_text[extra])
      text_keys.append(corpus.query_text_id[extra])
    ztext = np.concatenate(ztext)
    text_keys = np.concatenate(text_keys)
    if not len(speech_rows) or not len(ztext):
      raise InputError(f"cross-lingual {text_language}:{speech_language}: no "
                       f"{'speech' if not len(speech_rows) else 'text'} in that language")
    speech_keys = corpus.text_id[speech_rows]
    if not np.any(np.isin(text_keys, speech_keys)):
      raise InputError(f"cross-lingual {text_language}:{speech_language}: no text_id is shared")
    pair_index = self.protocol.cross_lingual.index((text_language, speech_language))
    results = self.directions(corpus.zspeech[speech_rows], ztext, speech_keys, text_keys,
                              seed_tag=(pair_index + 1,))
    prefix = (f"cross_lingual/text_{clean_name(text_language)}-"
              f"speech_{clean_name(speech_language)}")
    metrics = {}
    for direction, result in results.items():
      metrics.update(self.summarise(result, f"{prefix}/{direction}"))
    return metrics


def evaluate(arrays_or_corpus: Mapping[str, Any] | Corpus, protocol: Protocol, *, mesh=None,
             blocking: Optional[scoring.Blocking] = None,
             progress: Optional[Callable[[str], None]] = None,
             normalize: bool = False,
             candidates: Optional[np.ndarray] = None) -> dict[str, float]:
  """Every metric of `protocol` on a corpus (or a mapping of arrays that makes one).

  `candidates`: the soft protocol's candidate lists for the paired corpus (see Evaluation).
  """
  corpus = (arrays_or_corpus if isinstance(arrays_or_corpus, Corpus)
            else Corpus.from_mapping(arrays_or_corpus, normalize=normalize))
  try:
    return Evaluation(protocol, mesh=mesh, blocking=blocking, progress=progress,
                      candidates=candidates).run(corpus)
  except scoring.TooManyPairsError as error:
    raise InputError(str(error)) from error
