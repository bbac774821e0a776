"""Archive search server: the JSON API and audio route over HTTP, and the page in Chromium.

The index is built here from a handful of WAV files, with a stand-in embedder (hashed word
vectors of each clip's transcript for the "audio" and of the query for the "text"), so the
tests check the server and page, not a model. The browser test drives headless Chromium over
the DevTools protocol on a pipe (`--remote-debugging-pipe`: no driver, no extra package) and
is skipped when Debian's `chromium` is not installed.
"""

import fcntl
import http.client
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import wave
import zlib

import numpy as np
import pytest

from clasp_jax import search_server
from clasp_jax.retrieval import search_index

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

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--mute-audio",
                  "--remote-debugging-pipe")


def find_chromium():
  for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


_EXEC_WITH_PIPES = """
import os, sys
to_browser, from_browser = int(sys.argv[1]), int(sys.argv[2])
os.dup2(to_browser, 3)
os.dup2(from_browser, 4)
os.close(to_browser)
os.close(from_browser)
os.execv(sys.argv[3], sys.argv[3:])
"""


class DevTools:
  """Chrome DevTools protocol over the pipe Chromium opens on fds 3 (in) and 4 (out):
  NUL-terminated JSON messages, one page session."""

  def __init__(self, binary, profile, log_path, timeout=30.0):
    self.timeout = timeout
    self.log_path = log_path
    to_browser, self._write = os.pipe()
    self._read, from_browser = os.pipe()
    # The child's ends move above 4 first, so that making them 3 and 4 cannot overwrite one
    # with the other. A small Python process does that mapping and execs Chromium: a
    # preexec_fn would fork this multithreaded (JAX) process, and dash knows no fd above 9.
    ends = []
    for end in (to_browser, from_browser):
      ends.append(fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 5))
      os.close(end)
    with open(log_path, "wb") as log:
      self.process = subprocess.Popen(
          [sys.executable, "-c", _EXEC_WITH_PIPES, str(ends[0]), str(ends[1]), binary,
           *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
          stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=ends)
    for end in ends:
      os.close(end)
    self._buffer = b""
    self._events = []
    self._next_id = 0
    self.session = None
    target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    self.session = self.call("Target.attachToTarget",
                             {"targetId": target, "flatten": True})["sessionId"]
    self.call("Page.enable")
    self.call("Runtime.enable")

  def _receive(self, deadline):
    while b"\0" not in self._buffer:
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not select.select([self._read], [], [], remaining)[0]:
        raise TimeoutError(f"Chromium did not answer; its log:\n{self.log_tail()}")
      data = os.read(self._read, 1 << 20)
      if not data:
        raise ConnectionError(f"Chromium closed the pipe; its log:\n{self.log_tail()}")
      self._buffer += data
    message, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(message)

  def _wait(self, matches):
    for index, message in enumerate(self._events):
      if matches(message):
        return self._events.pop(index)
    deadline = time.monotonic() + self.timeout
    while True:
      message = self._receive(deadline)
      if matches(message):
        return message
      self._events.append(message)

  def call(self, method, params=None):
    self._next_id += 1
    message = {"id": self._next_id, "method": method, "params": params or {}}
    if self.session:
      message["sessionId"] = self.session
    data = json.dumps(message).encode() + b"\0"
    while data:
      data = data[os.write(self._write, data):]
    answer = self._wait(lambda reply, number=self._next_id: reply.get("id") == number)
    if "error" in answer:
      raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]

  def forget_events(self):
    self._events.clear()

  def wait_for_load(self):
    self._wait(lambda event: event.get("method") == "Page.loadEventFired" and
               event.get("sessionId") == self.session)

  def navigate(self, url):
    self.forget_events()
    self.call("Page.navigate", {"url": url})
    self.wait_for_load()

  def evaluate(self, expression):
    result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                            "awaitPromise": True})
    if "exceptionDetails" in result:
      raise AssertionError(f"in the page: {result['exceptionDetails']}")
    return result["result"].get("value")

  def type_and_submit(self, selector, text):
    """Focuses the field, types `text` as keyboard input would, and presses Enter."""
    assert self.evaluate(f"(() => {{ const field = document.querySelector({selector!r}); "
                         "field.focus(); field.select(); "
                         "return document.activeElement === field; })()")
    if text:
      self.call("Input.insertText", {"text": text})  # Replaces the selected old query.
    else:
      self.press("Backspace", 8)
    self.forget_events()
    self.press("Enter", 13, "\r")
    self.wait_for_load()

  def press(self, key, code, text=None):
    for kind in ("keyDown", "keyUp"):
      self.call("Input.dispatchKeyEvent", {
          "type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code,
          "nativeVirtualKeyCode": code, **({"text": text} if text and kind == "keyDown" else {})})

  def log_tail(self):
    with open(self.log_path, "rb") as log:
      return log.read()[-3000:].decode(errors="replace")

  def close(self):
    try:
      self.session = None
      self.call("Browser.close")
    except (OSError, RuntimeError, TimeoutError, ConnectionError):
      pass
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
    os.close(self._read)
    os.close(self._write)


@pytest.fixture
def browser(tmp_path):
  binary = find_chromium()
  if binary is None:
    pytest.skip("needs Chromium for the browser test (Debian: apt-get install chromium)")
  devtools = DevTools(binary, tmp_path / "profile", tmp_path / "chromium.log")
  yield devtools
  devtools.close()


AUDIO_DURATION = """(async () => {
  const audio = document.querySelector('li.hit audio');
  if (audio.readyState < 1) {
    await new Promise((resolve, reject) => {
      audio.addEventListener('loadedmetadata', resolve, {once: true});
      audio.addEventListener('error', () => reject(new Error(
          'audio failed: ' + (audio.error && audio.error.message))), {once: true});
      setTimeout(() => reject(new Error('no audio metadata after 20 s')), 20000);
      audio.load();
    });
  }
  return audio.duration;
})()"""

HITS = """Array.from(document.querySelectorAll('#results li.hit')).map(hit => ({
  rank: hit.querySelector('.rank').textContent,
  score: hit.querySelector('.score').textContent,
  path: hit.querySelector('.path').textContent,
  transcript: hit.querySelector('.transcript') ? hit.querySelector('.transcript').textContent
                                               : null,
  audio: hit.querySelector('audio[controls]') ? hit.querySelector('audio').getAttribute('src')
                                              : null,
}))"""


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
