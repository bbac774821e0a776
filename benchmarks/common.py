"""Helpers the benchmarks share: the CPU's name for their header, and timing side by side."""

from __future__ import annotations

import platform
import statistics
import time


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
      for line in info:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def interleaved_medians(functions: dict, repeats: int) -> dict[str, float]:
  """Median seconds per function; each is warmed up once, then all run in turn each round."""
  for function in functions.values():
    function()  # warm-up: jit compilation, allocator and FFT-plan caches
  times = {name: [] for name in functions}
  for _ in range(repeats):
    for name, function in functions.items():
      start = time.perf_counter()
      function()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}
