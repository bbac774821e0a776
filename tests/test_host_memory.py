"""The CPU host allocator setting (clasp_jax/host_memory.py), checked in fresh processes:
it must run before JAX starts its backend, which the test process has long done."""

import os
import subprocess
import sys

import pytest

from clasp_jax import host_memory

_PROBE = r"""
import ctypes, sys
import clasp_jax
from clasp_jax import host_memory
import jax, jax.numpy as jnp

class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in
              ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
               "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
doubled = jax.jit(lambda x: x * 2)(jnp.ones((64, 1024, 1024), jnp.float32))  # 256 MiB
doubled.block_until_ready()
print(int(host_memory._applied), libc.mallinfo2().hblkhd >> 20)
"""


def _probe(**env):
  environment = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env}
  result = subprocess.run([sys.executable, "-c", _PROBE], env=environment, capture_output=True,
                          text=True, timeout=120, check=True)
  applied, mmapped_mib = result.stdout.split()
  return applied == "1", int(mmapped_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_xla_buffers_live_in_the_heap_only_when_tuned():
  applied, mmapped_mib = _probe()
  assert applied
  assert mmapped_mib < 64  # The 256 MiB result came from the heap, not from a fresh mapping.
  applied, mmapped_mib = _probe(CLASP_JAX_TUNE_MALLOC="0")
  assert not applied
  assert mmapped_mib >= 256


def test_accelerator_platforms_turn_the_setting_off(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.accelerator_backend_installed()
  monkeypatch.setattr(host_memory, "_applied", False)
  assert not host_memory.tune_allocator()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not host_memory.accelerator_backend_installed()
