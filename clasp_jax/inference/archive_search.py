"""The `python -m clasp_jax.search` sub-commands: index an audio archive with a trained
workdir, query the index, serve it as a web page.

  index  --workdir=W --audio=DIR --index=I [--checkpoint=best] [--dtype=float16|float32]
         [--batch_size=N] [--transcripts=FILE.tsv]
  query  --index=I "text in any language" [-k 10] [--json]
  query  --index=I --audio_query=FILE [-k 10] [--json]
  query  --index=I --queries=FILE.txt [-k 10] [--json]
  serve  --index=I [--port=8080] [--host=127.0.0.1]

The index records which model made its rows (the workdir's absolute path and the checkpoint
step), so `query` and `serve` embed queries with that same model: rows and queries of
different models are not comparable. Re-running `index` on a grown archive embeds only new
and changed files; another checkpoint re-embeds all of them. Unreadable audio files are
counted and listed, never fatal, and stay out of the index (the next run tries them again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from typing import Callable, Optional, Sequence

import numpy as np

from clasp_jax.common import cli
from clasp_jax.common import workdir as workdir_files
from clasp_jax.common.config_args import ConfigError
from clasp_jax.retrieval import search_index

ERRORS = (search_index.IndexMissingError, search_index.IndexFormatError, ConfigError,
          FileNotFoundError, ValueError, OSError)


# ----------------------------------------------------------------------------------------------
# The model behind an index.
# ----------------------------------------------------------------------------------------------


def check_workdir(workdir: str, *, speech: bool = False, text: bool = False) -> None:
  """Fails with one clear line, before any weights are read, when the workdir's model cannot
  embed audio (`speech`) or sentences (`text`)."""
  config = workdir_files.read_config(workdir)
  speech_kind = config.model.get("speech", {}).get("kind", "features")
  if speech and speech_kind != "audio":
    raise cli.UsageError(f"{workdir} trained a {speech_kind}-mode model: it embeds precomputed "
                         "features, not audio files; index an archive with an audio-mode "
                         "workdir (configs/base.py:...,speech=audio)")
  if text and config.model.text.kind != "encoder":
    raise cli.UsageError(f"{workdir} has no text tower (config.model.text.kind="
                         f"{config.model.text.kind!r}): its text embeddings were precomputed in "
                         "the data, so it cannot embed a query text; search by recording with "
                         "--audio_query, or train with --config.model.text.kind=encoder")


def resolve_step(workdir: str, checkpoint: int | str) -> int:
  """The step `checkpoint` ('best', 'latest' or a step) names, without reading its weights."""
  from clasp_jax.trainer.checkpointing import Checkpointer
  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    return int(checkpointer.resolve(checkpoint)[1])
  finally:
    checkpointer.close()


def load_model(workdir: str, step: int):
  from clasp_jax.inference import workdir as workdir_lib
  return workdir_lib.load_trained(workdir, checkpoint=step)


def model_of(index: search_index.SearchIndex, folder: str) -> search_index.ModelInfo:
  if not index.model.workdir or index.model.step is None:
    raise cli.UsageError(f"the index in {folder} does not record which model made it; "
                         "rebuild it with `python -m clasp_jax.search index`")
  return index.model


@dataclasses.dataclass
class Unreadable:
  path: str
  message: str  # One line that starts with the path.


class ArchiveEmbedder:
  """`embed_audio` for `search_index.update_index`: reads each file as 16 kHz mono, embeds the
  readable ones with the speech tower, and sets the others aside (a `PartialBatch`).

  The model loads on the first call, so an index that is already up to date costs no model.
  """

  def __init__(self, workdir: str, step: int, *, batch_size: int,
               progress: Optional[Callable[[int], None]] = None):
    self.workdir, self.step, self.batch_size = workdir, step, batch_size
    self.progress = progress
    self.unreadable: list[Unreadable] = []
    self.embedded = 0
    self._done = 0
    self._model = None

  @property
  def model(self):
    if self._model is None:
      self._model = load_model(self.workdir, self.step)
    return self._model

  def __call__(self, paths: list[str]):
    from clasp_jax.data import audio_io
    waveforms, kept = [], np.zeros(len(paths), bool)
    for number, path in enumerate(paths):
      try:
        waveforms.append(audio_io.load_audio(path, audio_io.TARGET_SAMPLE_RATE))
        kept[number] = True
      except (audio_io.UnusableInputError, OSError) as error:
        message = cli.one_line(error)
        self.unreadable.append(Unreadable(
            path, message if message.startswith(path) else f"{path}: {message}"))
    vectors = (self.model.embed_waveforms(waveforms, batch_size=self.batch_size)
               if waveforms else np.zeros((0, 0), np.float32))
    # A clip the model maps to a non-finite or zero vector (silence peak-normalised, say) has
    # no direction to compare; it is set aside like an unreadable file.
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.zeros(0)
    usable = np.isfinite(norms) & (norms > 0)
    for path, good in zip([p for p, k in zip(paths, kept) if k], usable):
      if not good:
        self.unreadable.append(Unreadable(path, f"{path}: the model gives it no usable "
                                                "embedding (non-finite or zero)"))
    kept[np.flatnonzero(kept)[~usable]] = False
    self.embedded += int(usable.sum())
    self._done += len(paths)
    if self.progress is not None:
      self.progress(self._done)
    return search_index.PartialBatch(vectors[usable], kept)


def read_transcripts(path: str, audio_dir: str) -> dict[str, str]:
  """{absolute audio path: transcript} from PATH<TAB>TEXT lines; relative paths are taken
  relative to the archive folder."""
  table = {}
  try:
    with open(path, encoding="utf-8") as stream:
      for number, line in enumerate(stream, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
          continue
        audio, tab, text = line.partition("\t")
        if not tab or not audio.strip():
          raise cli.UsageError(f"{path}:{number}: expected PATH<TAB>TRANSCRIPT, got {line[:80]!r}")
        table[os.path.abspath(os.path.join(audio_dir, audio.strip()))] = text.strip()
  except FileNotFoundError:
    raise cli.UsageError(f"--transcripts {path}: no such file") from None
  except UnicodeDecodeError as error:
    raise cli.UsageError(f"--transcripts {path}: not UTF-8 text ({error.reason})") from None
  return table


# ----------------------------------------------------------------------------------------------
# search index
# ----------------------------------------------------------------------------------------------

INDEX_DOC = """python -m clasp_jax.search index --workdir=W --audio=DIR --index=I

Embeds every audio file under DIR (searched recursively) with the speech tower of the trained
workdir W and writes the search index I (a folder). Run again after the archive grows: only
new files and files whose size or mtime changed are embedded, removed files are dropped, and
another --checkpoint re-embeds everything. Unreadable files are counted and listed on stderr
and left out (never fatal). --transcripts=FILE.tsv (PATH<TAB>TRANSCRIPT lines, PATH absolute or
relative to DIR) stores what is said in each file, for query results and the page.
"""

INDEX_FLAGS = cli.FlagValues()
INDEX_FLAGS.DEFINE_string("workdir", None, "A trained audio-mode workdir (config.json, "
                          "checkpoints/).")
INDEX_FLAGS.DEFINE_string("audio", None, "The archive: a folder searched recursively for audio.")
INDEX_FLAGS.DEFINE_string("index", None, "The index folder (created, or brought up to date).")
INDEX_FLAGS.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
INDEX_FLAGS.DEFINE_enum("dtype", None, list(search_index.STORAGE_DTYPES),
                        "How rows are stored (float16 halves the index); default: the existing "
                        "index's, float32 for a new one.")
INDEX_FLAGS.DEFINE_integer("batch_size", 16, "Files per forward pass.", lower_bound=1)
INDEX_FLAGS.DEFINE_integer("commit_every", 10_000, "Also write the index after this many newly "
                           "embedded files, so a killed run resumes there (0: only at the end).",
                           lower_bound=0)
INDEX_FLAGS.DEFINE_string("transcripts", None, "Optional PATH<TAB>TRANSCRIPT file.")


def index_main() -> None:
  flags = INDEX_FLAGS
  from clasp_jax.trainer.checkpointing import parse_checkpoint_choice
  try:
    checkpoint = parse_checkpoint_choice(flags.checkpoint)
  except ValueError as error:
    raise cli.FlagError(str(error)) from None
  if not os.path.isdir(flags.audio):
    raise cli.UsageError(f"--audio {flags.audio}: no such folder")
  workdir = os.path.abspath(flags.workdir)
  check_workdir(workdir, speech=True)
  transcripts = read_transcripts(flags.transcripts, flags.audio) if flags.transcripts else {}
  paths = search_index.find_audio_files(flags.audio)
  if not paths:
    raise cli.UsageError(f"--audio {flags.audio}: no audio files "
                         f"({', '.join(search_index.AUDIO_EXTENSIONS)})")
  model = search_index.ModelInfo(workdir=workdir, step=resolve_step(workdir, checkpoint))
  try:
    old = search_index.SearchIndex.load(flags.index)
  except search_index.IndexMissingError:
    old = None
  plan = search_index.plan_update(old, search_index.stat_files(paths), model)
  print(f"{flags.index}: {len(paths)} audio files under {flags.audio}: {plan.summary()}",
        file=sys.stderr, flush=True)
  known = {entry.path: entry.transcript for entry in old.entries} if old is not None else {}
  known.update(transcripts)
  embedder = ArchiveEmbedder(workdir, model.step, batch_size=flags.batch_size,
                             progress=cli.Progress(len(plan.to_embed), "files", verb="embedded"))
  index, _ = search_index.update_index(
      flags.index, paths, embedder, model=model, dtype=flags.dtype,
      transcribe=lambda batch: [known.get(path) for path in batch],
      batch_size=flags.batch_size, commit_every=flags.commit_every)
  # Kept rows keep their transcripts unless the file gives new ones: rewrite only then.
  if any(entry.path in transcripts and transcripts[entry.path] != entry.transcript
         for entry in index.entries):
    entries = [dataclasses.replace(entry, transcript=transcripts.get(entry.path,
                                                                     entry.transcript))
               for entry in index.entries]
    search_index.SearchIndex(index.embeddings, entries, index.model).save(flags.index)
  for failure in embedder.unreadable:
    print(f"skipped {failure.message}", file=sys.stderr)
  unreadable = f", {len(embedder.unreadable)} unreadable (left out)" if embedder.unreadable else ""
  print(f"{flags.index}: {len(index)} recordings indexed; {embedder.embedded} embedded with "
        f"{workdir} at step {model.step}{unreadable}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# search query
# ----------------------------------------------------------------------------------------------

QUERY_DOC = """python -m clasp_jax.search query --index=I "text in any language" [-k 10] [--json]

Prints the k recordings of the index that best match the query: rank, cosine score, path, and
the transcript when the index knows it. The query is embedded by the model that made the index
(its text tower; with --audio_query=FILE its speech tower, to find recordings like FILE).
--queries=FILE.txt searches every line of FILE. --json prints one JSON object per query:
{"query", "model": {"workdir", "step"}, "results": [{"rank", "score", "path", "transcript"}]}.
"""

QUERY_FLAGS = cli.FlagValues()
QUERY_FLAGS.DEFINE_string("index", None, "The index folder written by `search index`.")
QUERY_FLAGS.DEFINE_integer("k", 10, "How many recordings to list.", lower_bound=1)
QUERY_FLAGS.DEFINE_bool("json", False, "Print JSON (one object per query) instead of text.")
QUERY_FLAGS.DEFINE_string("audio_query", None, "Search by this recording instead of a text.")
QUERY_FLAGS.DEFINE_string("queries", None, "A UTF-8 file with one query text per line.")


def _query_texts(arguments: Sequence[str]) -> list[str]:
  flags = QUERY_FLAGS
  given = [name for name, present in (("a query text", bool(arguments)),
                                      ("--audio_query", flags.audio_query is not None),
                                      ("--queries", flags.queries is not None)) if present]
  if len(given) != 1:
    raise cli.FlagError("give one of a query text, --audio_query=FILE or --queries=FILE" +
                        (f", not {' and '.join(given)}" if given else ""))
  if arguments:
    text = " ".join(arguments).strip()
    if not text:
      raise cli.FlagError("empty query: give a few words to search the recordings for")
    return [text]
  if flags.queries is not None:
    try:
      with open(flags.queries, encoding="utf-8") as stream:
        texts = [line.strip() for line in stream if line.strip()]
    except FileNotFoundError:
      raise cli.UsageError(f"--queries {flags.queries}: no such file") from None
    except UnicodeDecodeError as error:
      raise cli.UsageError(f"--queries {flags.queries}: not UTF-8 text ({error.reason})") from None
    if not texts:
      raise cli.UsageError(f"--queries {flags.queries}: no query in it (one per line)")
    return texts
  return []


def query_main(arguments: list[str]) -> None:
  flags = QUERY_FLAGS
  texts = _query_texts(arguments)
  index = search_index.SearchIndex.load(flags.index)
  model_info = model_of(index, flags.index)
  check_workdir(model_info.workdir, text=bool(texts), speech=not texts)
  if texts:
    queries = texts
  else:
    from clasp_jax.data import audio_io
    try:
      waveform = audio_io.load_audio(flags.audio_query, audio_io.TARGET_SAMPLE_RATE)
    except audio_io.UnusableInputError as error:
      raise cli.UsageError(f"--audio_query {error}") from None
    queries = [flags.audio_query]
  trained = load_model(model_info.workdir, model_info.step)
  vectors = (trained.embed_texts(texts) if texts else trained.embed_waveforms([waveform]))
  if vectors.shape[1] != index.dim:
    raise ValueError(f"{model_info.workdir} embeds into {vectors.shape[1]} dimensions, the index "
                     f"holds {index.dim}")
  result = search_index.Searcher(index.embeddings).search(
      search_index.unit_rows(vectors, queries), flags.k)
  for number, query in enumerate(queries):
    hits = [{"rank": rank, "score": float(score), "path": index.entries[int(row)].path,
             "transcript": index.entries[int(row)].transcript}
            for rank, (row, score) in enumerate(zip(result.rows[number], result.scores[number]),
                                                start=1)]
    if flags.json:
      print(json.dumps({"query": query, "model": dataclasses.asdict(model_info),
                        "results": hits}, ensure_ascii=False))
      continue
    if len(queries) > 1:
      print(f"{'' if number == 0 else chr(10)}query: {query}")
    for hit in hits:
      transcript = f"  {hit['transcript']}" if hit["transcript"] else ""
      print(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['path']}{transcript}")
  sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# search serve
# ----------------------------------------------------------------------------------------------

SERVE_DOC = """python -m clasp_jax.search serve --index=I [--port=8080] [--host=127.0.0.1]

Serves a search page for the index: a query box, and ranked hits with score, path, transcript
when known and an audio player each (`/api/search?q=...&k=10` answers in JSON). Queries are
embedded by the text tower of the model that made the index. It listens on 127.0.0.1 unless
--host says otherwise; it has no authentication, so do not serve an archive to a network
without a front end that adds it. --port=0 picks a free port (printed on the first line).
"""

SERVE_FLAGS = cli.FlagValues()
SERVE_FLAGS.DEFINE_string("index", None, "The index folder written by `search index`.")
SERVE_FLAGS.DEFINE_integer("port", 8080, "TCP port (0: any free one).", lower_bound=0,
                           upper_bound=65535)
SERVE_FLAGS.DEFINE_string("host", "127.0.0.1", "Address to listen on.")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_main() -> None:
  flags = SERVE_FLAGS
  from clasp_jax import search_server
  index = search_index.SearchIndex.load(flags.index)
  model_info = model_of(index, flags.index)
  check_workdir(model_info.workdir, text=True)
  trained = load_model(model_info.workdir, model_info.step)
  lock = threading.Lock()

  def embed_query(texts: list[str]) -> np.ndarray:
    with lock:  # Requests arrive on several threads; one tokenizer and one forward at a time.
      return trained.embed_texts(texts)

  if flags.host not in LOOPBACK:
    print(f"warning: serving on {flags.host}, beyond this machine, without authentication",
          file=sys.stderr, flush=True)
  search_server.serve(flags.index, embed_query, host=flags.host, port=flags.port)


def run_index(argv: list[str] | None = None) -> int:
  return cli.run(index_main, argv, flag_values=INDEX_FLAGS, doc=INDEX_DOC,
                 required=("workdir", "audio", "index"), errors=ERRORS)


def run_query(argv: list[str] | None = None) -> int:
  return cli.run(query_main, argv, flag_values=QUERY_FLAGS, doc=QUERY_DOC, required=("index",),
                 errors=ERRORS, arguments=True)


def run_serve(argv: list[str] | None = None) -> int:
  return cli.run(serve_main, argv, flag_values=SERVE_FLAGS, doc=SERVE_DOC, required=("index",),
                 errors=ERRORS)


SUBCOMMANDS = {"index": run_index, "query": run_query, "serve": run_serve}
