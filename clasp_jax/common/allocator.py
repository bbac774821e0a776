"""Command-line jobs run under tcmalloc when the system has it.

XLA:CPU allocates every output and temporary buffer afresh on each call. glibc serves
buffers over 32 MB with new mmap()ed pages and gives them back on free, so each call of a
large program page-faults all of its memory again: on the 2-core benchmark machine the
64-clip spectrogram batch took 175 ms under glibc and 62-86 ms under tcmalloc, which keeps
freed pages for the next call (as PyTorch's CPU tuning guide and Cloud TPU VMs, which
preload it, also do). Training and the text tower measured the same or faster.

`reexec_under_tcmalloc()` is called first thing by each `python -m clasp_jax.*` command
and benchmark: when tcmalloc is installed (Debian: `libtcmalloc-minimal4`, which
`setup.sh` installs) and not yet loaded, it restarts the same command with tcmalloc in
`LD_PRELOAD`. `CLASP_JAX_ALLOCATOR=system` keeps the system allocator. Library imports
never restart anything.
"""

from __future__ import annotations

import os
import sys

OPT_OUT_VARIABLE = "CLASP_JAX_ALLOCATOR"
# Set in the restarted process, so that a library the loader refuses cannot cause a loop.
_RESTARTED_VARIABLE = "CLASP_JAX_ALLOCATOR_RESTARTED"
_LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> str | None:
  """Path of an installed tcmalloc shared library, or None."""
  for directory in _SEARCH_DIRS:
    for name in _LIBRARIES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return None


def loaded_allocator() -> str:
  """'tcmalloc' when this process runs under it, else 'system'."""
  try:
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
      return "tcmalloc" if "libtcmalloc" in maps.read() else "system"
  except OSError:
    return "system"


def reexec_under_tcmalloc() -> None:
  """Restarts this command under tcmalloc when it is installed and not loaded; else returns.

  Call it before any work starts (it replaces the process): in a `__main__` block only.
  """
  if os.environ.get(OPT_OUT_VARIABLE, "") == "system" or os.environ.get(_RESTARTED_VARIABLE):
    return
  library = find_tcmalloc()
  if library is None or loaded_allocator() == "tcmalloc":
    return
  environment = dict(os.environ)
  preload = environment.get("LD_PRELOAD", "")
  environment["LD_PRELOAD"] = f"{library} {preload}".strip()
  environment[_RESTARTED_VARIABLE] = "1"
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
