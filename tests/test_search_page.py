"""Archive search server: the JSON API and audio route over HTTP, and the page in Chromium.

The index is built here from a handful of WAV files, with a stand-in embedder (hashed word
vectors of each clip's transcript for the "audio" and of the query for the "text"), so the
tests check the server and page, not a model. The browser test drives headless Chromium over
the DevTools protocol on a pipe (`--remote-debugging-pipe`: no driver, no extra package) and
is skipped when Debian's `chromium` is not installed.
"""

import http.client
import json
import os
import re
import threading
import urllib.parse
import wave
import zlib

import numpy as np
import pytest

from clasp_jax import search_server
from clasp_jax.retrieval import search_index
from tests.helpers.devtools import AUDIO_DURATION, HITS

pytestmark = pytest.mark.usefixtures("fast_compiles")

DIM = 32
SAMPLE_RATE = 16000
# (file name, what is said, whether the index knows the transcript)
CLIPS = [
    ("cat.wav", "the cat sat on the mat", True),
    ("dogs.wav", "dogs bark at the postman every morning", True),
    ("rain.wav", "rain is expected over the mountains tonight", True),
    ('odd <b>name</b> & "quotes".wav', "the orchestra tuned their instruments", True),
    ("policy.flac", "a speech about monetary policy and inflation", False),
    ("birds.wav", "birds sing before the sun rises", True),
]


def word_vector(word):
  return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(DIM)


def embed_texts(texts):
  """Stand-in text tower: the sum of fixed random vectors of the words."""
  return np.stack([sum(word_vector(word) for word in re.findall(r"\w+", text.lower()))
                   for text in texts])


def write_wav(path, seconds):
  samples = (0.2 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * SAMPLE_RATE)) /
                          SAMPLE_RATE) * 32767).astype("<i2")
  with wave.open(str(path), "wb") as file:
    file.setnchannels(1)
    file.setsampwidth(2)
    file.setframerate(SAMPLE_RATE)
    file.writeframes(samples.tobytes())


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
  """(index folder, {file name: path}, {path: duration in seconds})."""
  root = tmp_path_factory.mktemp("search_page")
  said, known, paths, durations = {}, {}, {}, {}
  for number, (name, text, transcribed) in enumerate(CLIPS):
    path = str(root / "audio" / name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    durations[path] = 0.25 * (number + 1)
    if path.endswith(".wav"):
      write_wav(path, durations[path])
    else:
      with open(path, "wb") as file:
        file.write(b"fLaC not really")
    said[path], paths[name] = text, path
    known[path] = text if transcribed else None
  folder = root / "index"
  search_index.update_index(folder, list(paths.values()),
                            lambda batch: embed_texts([said[path] for path in batch]),
                            transcribe=lambda batch: [known[path] for path in batch],
                            model=search_index.ModelInfo("/runs/fake", 42))
  return folder, paths, durations


@pytest.fixture(scope="module")
def server(archive):
  folder, _, _ = archive
  server = search_server.make_server(folder, embed_texts, port=0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


def get(server, path, headers=None):
  connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
  try:
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()
  finally:
    connection.close()


def get_json(server, path):
  status, headers, body = get(server, path)
  assert headers["Content-Type"].startswith("application/json"), headers
  return status, json.loads(body)


# ------------------------------------------------------------------------------------------
# Over plain HTTP.
# ------------------------------------------------------------------------------------------


def test_binds_localhost_by_default(archive):
  server = search_server.make_server(archive[0], embed_texts, port=0)
  try:
    assert server.server_address[0] == "127.0.0.1"
  finally:
    server.server_close()


def test_api_ranks_the_matching_recording_first(server, archive):
  _, paths, _ = archive
  status, answer = get_json(server, "/api/search?q=" + urllib.parse.quote("dogs bark") + "&k=3")
  assert status == 200 and answer["count"] == 3
  first = answer["results"][0]
  assert first["path"] == paths["dogs.wav"] and first["rank"] == 1
  assert first["transcript"] == "dogs bark at the postman every morning"
  assert first["audio"] == f"/audio?id={first['id']}"
  scores = [hit["score"] for hit in answer["results"]]
  assert scores == sorted(scores, reverse=True) and scores[0] <= 1 + 1e-6
  status, answer = get_json(server, "/api/search?q=monetary+policy")
  assert answer["results"][0]["path"] == paths["policy.flac"]
  assert answer["results"][0]["transcript"] is None  # Not transcribed: none shown.
  assert answer["count"] == len(CLIPS)  # k defaults to 10, the index holds fewer.


@pytest.mark.parametrize("query,message", [
    ("/api/search?q=", "empty query"),
    ("/api/search?q=%20%20", "empty query"),
    ("/api/search", "empty query"),
    ("/api/search?q=cat&k=0", "k must be between 1 and 100"),
    ("/api/search?q=cat&k=ten", "k must be a whole number"),
    ("/audio?id=../../etc/passwd", "audio id must be a row number"),
    ("/audio?path=/etc/passwd", "audio id must be a row number"),
    ("/audio?id=-1", "audio id must be a row number"),
])
def test_bad_requests_are_clear_errors(server, query, message):
  status, answer = get_json(server, query)
  assert status == 400 and message in answer["error"], answer


def test_unknown_rows_and_paths_are_not_found(server):
  status, answer = get_json(server, "/audio?id=99")
  assert status == 404 and "no recording 99" in answer["error"]
  for path in ("/../../etc/passwd", "/etc/passwd", "/audio/../../etc/passwd"):
    status, _, body = get(server, path)
    assert status == 404 and b"root:" not in body


def test_audio_is_served_whole_and_by_range(server, archive):
  _, paths, _ = archive
  _, answer = get_json(server, "/api/search?q=rain+tonight&k=1")
  row = answer["results"][0]["id"]
  with open(paths["rain.wav"], "rb") as file:
    data = file.read()
  status, headers, body = get(server, f"/audio?id={row}")
  assert status == 200 and body == data
  assert headers["Content-Type"] == "audio/wav" and headers["Accept-Ranges"] == "bytes"
  status, headers, body = get(server, f"/audio?id={row}", {"Range": "bytes=10-19"})
  assert status == 206 and body == data[10:20]
  assert headers["Content-Range"] == f"bytes 10-19/{len(data)}"
  status, _, body = get(server, f"/audio?id={row}", {"Range": "bytes=-6"})
  assert status == 206 and body == data[-6:]
  status, headers, _ = get(server, f"/audio?id={row}", {"Range": f"bytes={len(data)}-"})
  assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
  _, answer = get_json(server, "/api/search?q=monetary+policy&k=1")
  _, headers, _ = get(server, f"/audio?id={answer['results'][0]['id']}")
  assert headers["Content-Type"] == "audio/flac"


def test_page_escapes_and_reports_errors(server):
  status, headers, body = get(server, "/?q=" + urllib.parse.quote("orchestra <i>x</i>"))
  page = body.decode()
  assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
  assert "odd &lt;b&gt;name&lt;/b&gt; &amp; &quot;quotes&quot;.wav" in page
  assert "<b>" not in page and "<i>" not in page
  status, _, body = get(server, "/?q=+")
  assert status == 400 and "empty query" in body.decode()


def test_missing_index_is_a_clear_error(tmp_path):
  with pytest.raises(search_index.IndexMissingError, match="no search index in"):
    search_server.make_server(tmp_path, embed_texts, port=0)


def test_vanished_file_is_not_found(tmp_path):
  path = tmp_path / "gone.wav"
  write_wav(path, 0.1)
  search_index.update_index(tmp_path / "index", [path], lambda batch: embed_texts(["gone"]))
  os.remove(path)
  server = search_server.make_server(tmp_path / "index", embed_texts, port=0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    status, answer = get_json(server, "/audio?id=0")
    assert status == 404 and "no longer readable" in answer["error"]
  finally:
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------
# In the browser.
# ------------------------------------------------------------------------------------------

def test_page_in_chromium(browser, server, archive):
  _, paths, durations = archive
  base = "http://%s:%d" % server.server_address[:2]
  browser.navigate(base + "/")
  assert browser.evaluate("document.title") == "Archive search"
  assert browser.evaluate("document.querySelectorAll('#results li').length") == 0

  browser.type_and_submit("#q", "dogs bark")
  assert browser.evaluate("location.pathname + location.search") == "/?q=dogs+bark&k=10"
  hits = browser.evaluate(HITS)
  assert len(hits) == len(CLIPS)
  first = hits[0]
  assert first["rank"] == "1." and first["path"] == paths["dogs.wav"]
  assert first["transcript"] == "dogs bark at the postman every morning"
  assert float(first["score"]) > float(hits[1]["score"])
  assert all(hit["audio"] and re.fullmatch(r"/audio\?id=\d+", hit["audio"]) for hit in hits)
  # The player really loads the recording: the WAV header gives the clip's length.
  assert browser.evaluate(AUDIO_DURATION) == pytest.approx(durations[paths["dogs.wav"]],
                                                          abs=0.01)
  assert browser.evaluate("document.querySelector('#q').value") == "dogs bark"

  # A file name with markup in it is shown as text, and a second search replaces the first.
  browser.type_and_submit("#q", "orchestra instruments")
  hits = browser.evaluate(HITS)
  assert hits[0]["path"] == paths['odd <b>name</b> & "quotes".wav']
  assert browser.evaluate("document.querySelectorAll('.path b').length") == 0

  # The box emptied and Enter pressed: the page says what is wrong and lists nothing.
  browser.type_and_submit("#q", "")
  assert browser.evaluate("document.querySelector('#q').value") == ""
  message = browser.evaluate("document.querySelector('[role=alert]').textContent")
  assert "empty query" in message
  assert browser.evaluate("document.querySelectorAll('#results li').length") == 0
