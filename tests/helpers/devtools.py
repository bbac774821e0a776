"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
no driver, no extra package), for the tests of the search page. The `browser` fixture
(tests/conftest.py) skips a test when Debian's `chromium` is not installed."""

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time

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
