"""Starts JAX's multi-process runtime with what the environment says about the cluster.

`jax.distributed.initialize()` with no arguments finds the coordinator, the process count and
this process's id by itself on Cloud TPU, under SLURM, Open MPI and Kubernetes. Anywhere else
(GPU hosts started over ssh, a scheduler JAX does not know) they have to be given; these
variables give them, the same on every process except the id:

  CLASP_COORDINATOR_ADDRESS  host:port of process 0, reachable from every process
  CLASP_NUM_PROCESSES        how many processes take part
  CLASP_PROCESS_ID           this process, 0 .. CLASP_NUM_PROCESSES - 1
  CLASP_LOCAL_DEVICE_IDS     optional: the local GPUs this process drives, e.g. "0" or "0,1"
  CLASP_HEARTBEAT_TIMEOUT_S  optional: seconds without a heartbeat after which a process
                             counts as dead and every other process exits with an error
                             (JAX's default is 100; the coordination service, not the
                             collectives, notices: a peer blocked in an all-reduce with a dead
                             process would otherwise wait forever). The heartbeats come from
                             a thread of JAX's runtime, not from Python, so compilation does
                             not hold them up, but a process the OS does not run for this long
                             (an overloaded machine, a stopped process) counts as dead too:
                             keep it well above the longest stall the machines see. A dead
                             process is noticed within about this many seconds, or at once when
                             a peer is in a collective with it (its connections close).
  CLASP_INITIALIZATION_TIMEOUT_S  optional: seconds a process waits for the coordinator and
                             all its peers to connect (JAX's default is 300)
  CLASP_SHUTDOWN_TIMEOUT_S   optional: seconds a finished process waits at exit for the others
                             to finish (JAX's default is 300)

With none of the first three set, JAX's auto-detection runs (and CLASP_LOCAL_DEVICE_IDS, if
set, still picks the GPUs). Setting some but not all of them is an error, not a silent
fallback: a process that auto-detected differently from its peers would wait for them forever.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax

COORDINATOR_ADDRESS = "CLASP_COORDINATOR_ADDRESS"
NUM_PROCESSES = "CLASP_NUM_PROCESSES"
PROCESS_ID = "CLASP_PROCESS_ID"
LOCAL_DEVICE_IDS = "CLASP_LOCAL_DEVICE_IDS"
HEARTBEAT_TIMEOUT = "CLASP_HEARTBEAT_TIMEOUT_S"
INITIALIZATION_TIMEOUT = "CLASP_INITIALIZATION_TIMEOUT_S"
SHUTDOWN_TIMEOUT = "CLASP_SHUTDOWN_TIMEOUT_S"
# Each optional timeout variable and the `jax.distributed.initialize` argument it sets.
_TIMEOUTS = {HEARTBEAT_TIMEOUT: "heartbeat_timeout_seconds",
             INITIALIZATION_TIMEOUT: "initialization_timeout",
             SHUTDOWN_TIMEOUT: "shutdown_timeout_seconds"}
_REQUIRED_TOGETHER = (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID)


def _integer(environ: Mapping[str, str], name: str) -> int:
  value = environ[name].strip()
  if not re.fullmatch(r"[0-9]+", value):
    raise ValueError(f"{name} must be a non-negative integer, got {environ[name]!r}")
  return int(value)


def initialize_arguments(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
  """The keyword arguments for `jax.distributed.initialize` that the environment fixes;
  empty when JAX should detect the cluster itself."""
  environ = os.environ if environ is None else environ
  present = [name for name in _REQUIRED_TOGETHER if environ.get(name, "").strip()]
  arguments: dict[str, Any] = {}
  if present:
    missing = [name for name in _REQUIRED_TOGETHER if name not in present]
    if missing:
      raise ValueError(f"{', '.join(present)} set without {', '.join(missing)}: set all of "
                       f"{', '.join(_REQUIRED_TOGETHER)}, or none to let JAX detect the cluster")
    address = environ[COORDINATOR_ADDRESS].strip()
    if not re.fullmatch(r"\S+:[0-9]+", address):
      raise ValueError(f"{COORDINATOR_ADDRESS} must be host:port, got {address!r}")
    num_processes = _integer(environ, NUM_PROCESSES)
    process_id = _integer(environ, PROCESS_ID)
    if not 0 <= process_id < num_processes:
      raise ValueError(f"{PROCESS_ID}={process_id} is not in 0 .. {NUM_PROCESSES}-1 = "
                       f"{num_processes - 1}")
    arguments.update(coordinator_address=address, num_processes=num_processes,
                     process_id=process_id)
  device_ids = environ.get(LOCAL_DEVICE_IDS, "").strip()
  if device_ids:
    if not re.fullmatch(r"[0-9]+(,[0-9]+)*", device_ids):
      raise ValueError(f"{LOCAL_DEVICE_IDS} must be comma-separated integers, got {device_ids!r}")
    arguments["local_device_ids"] = [int(i) for i in device_ids.split(",")]
  for name, argument in _TIMEOUTS.items():
    if environ.get(name, "").strip():
      timeout = _integer(environ, name)
      if timeout < 1:
        raise ValueError(f"{name} must be at least 1 second, got {timeout}")
      arguments[argument] = timeout
  return arguments


def initialize_from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Calls `jax.distributed.initialize` with the environment's arguments; returns them."""
  arguments = initialize_arguments(environ)
  jax.distributed.initialize(**arguments)
  return arguments
