"""Finding audio files inside an extracted release, wherever its archives put them."""

from __future__ import annotations

import collections
import os

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


class AudioIndex:
  """Resolves a release's recorded audio path to a file under `root`.

  Release metadata often records paths from the authors' machine or from inside an archive
  that extracts elsewhere. A path is tried as given, then relative to `root`, then by file
  name among all audio under `root` (built on first need). An unresolvable path is returned
  joined to `root`, so the build counts it as missing with a path the user can check.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = os.fspath(root)
    self._by_name: dict[str, list[str]] | None = None

  def _names(self) -> dict[str, list[str]]:
    if self._by_name is None:
      by_name = collections.defaultdict(list)
      for folder, _, files in os.walk(self.root):
        for name in files:
          if name.lower().endswith(AUDIO_EXTENSIONS):
            by_name[name].append(os.path.join(folder, name))
      self._by_name = {name: sorted(paths) for name, paths in by_name.items()}
    return self._by_name

  def resolve(self, recorded: str) -> str:
    if os.path.isabs(recorded) and os.path.isfile(recorded):
      return recorded
    joined = os.path.join(self.root, recorded.lstrip("/"))
    if os.path.isfile(joined):
      return joined
    candidates = self._names().get(os.path.basename(recorded), [])
    return candidates[0] if len(candidates) == 1 else joined
