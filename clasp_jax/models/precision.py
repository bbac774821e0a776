"""Matmul precision by name, shared by every tower.

On GPU and TPU, XLA's default precision rounds float32 matmul and convolution inputs to
tf32/bf16, while PyTorch's float32 matmuls are exact: a HuBERT forward then differs from
the PyTorch reference by ~5e-3 instead of ~1e-6. "highest" keeps float32 parity (the default
of every module that must match a PyTorch checkpoint); "default" is the faster choice for
training at scale. On CPU all three names compute the same thing.
"""

from __future__ import annotations

import contextlib

import jax

BY_NAME = {
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}
NAMES = tuple(BY_NAME)


def validate(name: str) -> str:
  if name not in BY_NAME:
    raise ValueError(f"precision must be one of {sorted(BY_NAME)}, got {name!r}")
  return name


def lax_precision(name: str) -> jax.lax.Precision:
  return BY_NAME[validate(name)]


def scope(name: str) -> contextlib.AbstractContextManager:
  """Traces the enclosed ops (every dot and convolution without an explicit precision) at
  `name`; use inside a module's `__call__` so the whole sub-tree follows one setting."""
  return jax.default_matmul_precision(validate(name))
