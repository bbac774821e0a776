"""Finding audio files inside an extracted release, wherever its archives put them."""

from __future__ import annotations

import collections
import os
from typing import Callable, Sequence

from clasp_jax.data import audio_io


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
          if audio_io.is_audio_file(name):
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


def language_folders(root: str, has_tables: Callable[[str], bool], wanted: Sequence[str], *,
                     release: str, tables: str, items: str = "languages",
                     search_in: str | None = None) -> dict[str, str]:
  """Language (or locale) -> folder of a multilingual release.

  `root` is one language's folder (it `has_tables` itself) or the folder above them
  (`search_in`, default `root`). `wanted` keeps those languages, in that order; one not
  found is an error naming what was found. `release`, `tables` and `items` name the release,
  its per-language files and what the folders are called, in messages.
  """
  if has_tables(root):
    found = {os.path.basename(os.path.normpath(root)): root}
  else:
    base = search_in or root
    found = {name: os.path.join(base, name) for name in sorted(os.listdir(base))
             if has_tables(os.path.join(base, name))}
  if not found:
    raise FileNotFoundError(f"no {release} {tables} under {root}")
  missing = sorted(set(wanted) - set(found))
  if missing:
    raise FileNotFoundError(f"{release} {items} {missing} not under {root}; found "
                            f"{sorted(found)}")
  return {name: found[name] for name in wanted} if wanted else found
