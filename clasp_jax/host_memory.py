"""Keeps XLA:CPU's large buffers in the process heap instead of fresh page-faulting mappings.

XLA:CPU allocates the output and temporary buffers of every call anew. glibc serves a large
allocation (above 32 MiB, or any made by one of XLA's worker threads, which get arenas of their
own) with a fresh `mmap`, and frees it back to the kernel, so each call pays one page fault per
4 KiB page of each such buffer: for 64 spectrograms of 4 s (three buffers of ~90 MB) that is
more than half of the front-end's time. With one malloc arena, no mmap for large blocks and no
trimming of the heap, a freed buffer is simply reused by the next call.

Measured on the 2-core CI machine: the batched spectrogram front-end 182 -> 72 ms, a jitted
`x * 2` on 90 MB 45 -> 7 ms. The cost is that memory freed after a peak stays with the process.

`tune_allocator()` runs when `clasp_jax` is imported, and only where it helps: on glibc, on
hosts whose only JAX backend is the CPU (accelerator hosts keep large arrays on the device),
and unless CLASP_JAX_TUNE_MALLOC=0. It must run before JAX starts its backend (its threads
bind to arenas then); later it changes nothing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import platform

ENV_SWITCH = "CLASP_JAX_TUNE_MALLOC"

# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_FREED_BYTES = 1 << 30

# Packages that give JAX a non-CPU backend.
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "jax_metal")

_applied = False


def accelerator_backend_installed() -> bool:
  """Whether JAX may find a GPU/TPU here, judged without starting any backend."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return any(name not in ("cpu", "") for name in platforms.split(","))
  if any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES):
    return True
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def tune_allocator() -> bool:
  """Applies the malloc settings above where they help; True if they are in effect."""
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV_SWITCH, "1") == "0" or platform.libc_ver()[0] != "glibc":
    return False
  if accelerator_backend_installed():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
  _applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
  return _applied
