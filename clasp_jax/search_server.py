"""Archive search web page: a small standard-library HTTP server over a search index.

  server = make_server(index_folder, query_embedder)   # 127.0.0.1:8000
  server.serve_forever()

`query_embedder` maps a list of query texts to their (n, dim) embeddings (the trained model's
text tower); rows and queries are compared by cosine. Routes:

  /                      the page: a query box; with ?q=...&k=... the ranked hits (rank,
                         score, path, transcript when known, an audio player each), rendered
                         on the server so the page needs no script
  /api/search?q=...&k=10 the same hits as JSON
  /audio?id=N            the file of index row N, with its audio Content-Type and byte ranges
                         (players seek with them)

Only files listed in the index can be fetched, and only by row number: no request names a
path, so none can walk out of the archive. The server binds 127.0.0.1 unless told otherwise;
an archive served to a network needs a front end with authentication.
"""

from __future__ import annotations

import dataclasses
import html
import http
import http.server
import json
import mimetypes
import os
import re
import sys
import threading
import traceback
from typing import Callable, Optional, Sequence
import urllib.parse

import numpy as np

from clasp_jax.retrieval import search_index

QueryEmbedder = Callable[[list[str]], np.ndarray]

# mimetypes answers audio/x-wav for .wav and video/webm for .webm, which some players refuse.
AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg",
               ".ogg": "audio/ogg", ".oga": "audio/ogg", ".opus": "audio/ogg",
               ".m4a": "audio/mp4", ".aac": "audio/aac", ".webm": "audio/webm"}
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_CHUNK_BYTES = 1 << 16
MAX_QUERY_CHARS = 1000


class RequestError(ValueError):
  """A request the server answers with an error status and this message."""

  def __init__(self, message: str, status: int = http.HTTPStatus.BAD_REQUEST):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Hit:
  rank: int
  id: int
  score: float
  path: str
  transcript: Optional[str]

  def as_json(self) -> dict:
    return {**dataclasses.asdict(self), "audio": f"/audio?id={self.id}"}


def audio_type(path: str) -> str:
  extension = os.path.splitext(path)[1].lower()
  return AUDIO_TYPES.get(extension) or mimetypes.guess_type(path)[0] or "application/octet-stream"


class ArchiveSearch:
  """An index, its searcher and the query embedder; safe to call from many threads."""

  def __init__(self, index_folder: str | os.PathLike, query_embedder: QueryEmbedder, *,
               default_k: int = 10, max_k: int = 100, block_rows: int = 0):
    self.index = search_index.SearchIndex.load(index_folder)  # IndexMissingError says why
    self.index_folder = os.fspath(index_folder)
    self.query_embedder = query_embedder
    self.default_k, self.max_k = default_k, max_k
    self.searcher = search_index.Searcher(self.index.embeddings, block_rows=block_rows)
    # One search at a time: each holds a (queries, block) score buffer per device, and a
    # burst of requests should queue rather than multiply that.
    self._lock = threading.Lock()

  def parse_k(self, text: Optional[str]) -> int:
    if text is None or text == "":
      return self.default_k
    try:
      k = int(text)
    except ValueError:
      raise RequestError(f"k must be a whole number, got {text!r}") from None
    if not 1 <= k <= self.max_k:
      raise RequestError(f"k must be between 1 and {self.max_k}, got {k}")
    return k

  def search(self, query: Optional[str], k: int) -> list[Hit]:
    text = (query or "").strip()
    if not text:
      raise RequestError("empty query: type a few words to search the recordings for")
    if len(text) > MAX_QUERY_CHARS:
      raise RequestError(f"query too long ({len(text)} characters, at most {MAX_QUERY_CHARS})")
    vectors = np.asarray(self.query_embedder([text]), np.float32)
    if vectors.shape != (1, self.index.dim):
      raise RuntimeError(f"query_embedder returned shape {vectors.shape} for one query; the "
                         f"index holds {self.index.dim}-dim rows")
    vectors = search_index.unit_rows(vectors, [text])
    with self._lock:
      result = self.searcher.search(vectors, k)
    hits = []
    for rank, (row, score) in enumerate(zip(result.rows[0], result.scores[0]), start=1):
      entry = self.index.entries[int(row)]
      hits.append(Hit(rank, int(row), float(score), entry.path, entry.transcript))
    return hits

  def entry(self, id_text: Optional[str]) -> search_index.Entry:
    """The entry of row `id_text`; its file is the only thing /audio may send."""
    if id_text is None or not re.fullmatch(r"\d{1,12}", id_text):
      raise RequestError("audio id must be a row number, e.g. /audio?id=0")
    row = int(id_text)
    if row >= len(self.index):
      raise RequestError(f"no recording {row} in the index ({len(self.index)} rows)",
                         http.HTTPStatus.NOT_FOUND)
    return self.index.entries[row]


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
form { display: flex; gap: .5rem; margin-bottom: 1.5rem; }
input[type=search] { flex: 1; font-size: 1.1rem; padding: .4rem; }
ol { padding-left: 0; list-style: none; }
li.hit { border-bottom: 1px solid #ddd; padding: .6rem 0; }
.rank { font-weight: bold; margin-right: .5rem; }
.score { color: #555; font-variant-numeric: tabular-nums; margin-right: .5rem; }
.path { font-family: monospace; word-break: break-all; }
.transcript { margin: .3rem 0; }
.error { color: #a00; }
audio { display: block; margin-top: .3rem; }
footer { color: #777; font-size: .85rem; margin-top: 2rem; }
"""


def render_page(search: ArchiveSearch, query: str = "", k: Optional[int] = None,
                hits: Sequence[Hit] = (), error: str = "", searched: bool = False) -> str:
  escape = html.escape
  k = search.default_k if k is None else k
  parts = [
      "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
      '<meta name="viewport" content="width=device-width, initial-scale=1">',
      f"<title>{escape(query) + ' - ' if query else ''}Archive search</title>",
      f"<style>{_STYLE}</style></head><body>", "<h1>Archive search</h1>",
      '<form method="get" action="/" role="search">',
      '<label for="q" hidden>Query</label>',
      f'<input type="search" id="q" name="q" value="{escape(query)}" '
      'placeholder="What was said?" autofocus>',
      f'<input type="hidden" name="k" value="{k}">',
      '<button type="submit" id="search">Search</button></form>',
  ]
  if error:
    parts.append(f'<p class="error" role="alert">{escape(error)}</p>')
  elif searched and not hits:
    parts.append('<p id="no-results">No recordings in the index.</p>')
  if hits:
    parts.append('<ol id="results">')
    for hit in hits:
      transcript = (f'<p class="transcript">{escape(hit.transcript)}</p>'
                    if hit.transcript else "")
      parts.append(
          f'<li class="hit" data-id="{hit.id}"><span class="rank">{hit.rank}.</span>'
          f'<span class="score">{hit.score:.4f}</span>'
          f'<span class="path">{escape(hit.path)}</span>{transcript}'
          f'<audio controls preload="metadata" src="/audio?id={hit.id}"></audio></li>')
    parts.append("</ol>")
  model = search.index.model
  made_by = (f" by {escape(model.workdir)}" if model.workdir else "") + (
      f" at step {model.step}" if model.step is not None else "")
  parts.append(f"<footer>{len(search.index):,} recordings indexed{made_by}.</footer>")
  parts.append("</body></html>")
  return "\n".join(parts)


def make_handler(search: ArchiveSearch) -> type[http.server.BaseHTTPRequestHandler]:
  """A request handler class bound to one ArchiveSearch."""

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "clasp-jax-search"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      if getattr(self.server, "verbose", False):
        super().log_message(format, *args)

    def do_GET(self):  # pylint: disable=invalid-name
      url = urllib.parse.urlsplit(self.path)
      params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
      first = lambda name: params.get(name, [None])[0]
      try:
        if url.path == "/":
          self._page(first("q"), first("k"))
        elif url.path == "/api/search":
          hits = search.search(first("q"), search.parse_k(first("k")))
          self._send_json({"query": first("q"), "count": len(hits),
                           "results": [hit.as_json() for hit in hits]})
        elif url.path == "/audio":
          self._audio(search.entry(first("id")))
        else:
          raise RequestError(f"no page {url.path}", http.HTTPStatus.NOT_FOUND)
      except RequestError as error:
        if url.path == "/api/search" or url.path == "/audio":
          self._send_json({"error": str(error)}, error.status)
        else:
          self._send_html(render_page(search, error=str(error)), error.status)
      except (BrokenPipeError, ConnectionResetError):
        pass  # Players drop range requests they no longer need.
      except Exception as error:  # pylint: disable=broad-except
        # An answer beats a dropped connection; the traceback goes to the server's log.
        traceback.print_exc(file=sys.stderr)
        message = f"internal error: {type(error).__name__}: {error}"
        status = http.HTTPStatus.INTERNAL_SERVER_ERROR
        if url.path == "/":
          self._send_html(render_page(search, first("q") or "", error=message), status)
        else:
          self._send_json({"error": message}, status)

    def _page(self, query, k_text):
      if query is None:  # The bare page: nothing asked yet.
        self._send_html(render_page(search))
        return
      try:
        k = search.parse_k(k_text)
        hits = search.search(query, k)
      except RequestError as error:
        self._send_html(render_page(search, query, error=str(error)), error.status)
        return
      self._send_html(render_page(search, query, k, hits, searched=True))

    def _send_bytes(self, body: bytes, content_type: str, status=http.HTTPStatus.OK):
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("X-Content-Type-Options", "nosniff")
      self.send_header("Cache-Control", "no-store")
      self.end_headers()
      self.wfile.write(body)

    def _send_html(self, page: str, status=http.HTTPStatus.OK):
      self._send_bytes(page.encode("utf-8"), "text/html; charset=utf-8", status)

    def _send_json(self, value, status=http.HTTPStatus.OK):
      self._send_bytes(json.dumps(value, ensure_ascii=False).encode("utf-8"),
                       "application/json; charset=utf-8", status)

    def _audio(self, entry: search_index.Entry):
      try:
        file = open(entry.path, "rb")  # pylint: disable=consider-using-with
      except OSError:
        raise RequestError(f"recording no longer readable: {entry.path}",
                           http.HTTPStatus.NOT_FOUND) from None
      with file:
        size = os.fstat(file.fileno()).st_size
        start, end = 0, size - 1
        status = http.HTTPStatus.OK
        requested = self.headers.get("Range")
        if requested:
          match = _RANGE.match(requested.strip())
          if match and (match[1] or match[2]):
            if match[1]:
              start = int(match[1])
              end = min(int(match[2]), size - 1) if match[2] else size - 1
            else:  # bytes=-N: the last N bytes
              start = max(0, size - int(match[2]))
            if start > end or start >= size:
              self.send_response(http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
              self.send_header("Content-Range", f"bytes */{size}")
              self.send_header("Content-Length", "0")
              self.end_headers()
              return
            status = http.HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", audio_type(entry.path))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == http.HTTPStatus.PARTIAL_CONTENT:
          self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        file.seek(start)
        remaining = end - start + 1
        while remaining > 0:
          chunk = file.read(min(_CHUNK_BYTES, remaining))
          if not chunk:
            break
          self.wfile.write(chunk)
          remaining -= len(chunk)

  return Handler


def make_server(index_folder: str | os.PathLike, query_embedder: QueryEmbedder, *,
                host: str = "127.0.0.1", port: int = 8000, verbose: bool = False,
                **search_options) -> http.server.ThreadingHTTPServer:
  """A server for `index_folder` (not yet serving; port 0 picks a free one).

  Raises search_index.IndexMissingError when the folder holds no index.
  """
  search = ArchiveSearch(index_folder, query_embedder, **search_options)
  server = http.server.ThreadingHTTPServer((host, port), make_handler(search))
  server.daemon_threads = True
  server.verbose = verbose
  server.search = search
  return server


def serve(index_folder: str | os.PathLike, query_embedder: QueryEmbedder, *,
          host: str = "127.0.0.1", port: int = 8000, **search_options) -> None:
  """Serves until interrupted, printing the address first."""
  server = make_server(index_folder, query_embedder, host=host, port=port, verbose=True,
                       **search_options)
  bound_host, bound_port = server.server_address[:2]
  print(f"searching {len(server.search.index):,} recordings at http://{bound_host}:{bound_port}/",
        flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


__all__ = ["ArchiveSearch", "Hit", "QueryEmbedder", "RequestError", "make_server", "serve"]
