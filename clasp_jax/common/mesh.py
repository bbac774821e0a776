"""The one device mesh axis of clasp_jax: data parallelism over every device.

Per-device functions (losses, BatchNorm statistics, retrieval ranks) name this axis in their
collectives and run unchanged under `jax.shard_map` over `data_mesh()` and under
`jax.pmap(axis_name=DATA_AXIS)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process) on axis `DATA_AXIS`."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  return Mesh(np.asarray(devices), (DATA_AXIS,))
