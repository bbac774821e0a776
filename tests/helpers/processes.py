"""Starts `python -m clasp_jax.train` as a JAX cluster of processes on this machine.

Each process sees its own fake CPU devices, the processes meet through a coordinator on a
free localhost port (clasp_jax/common/distributed.py's variables) and run their collectives
over gloo, as hosts of a pod would over the interconnect.

The coordinator's port stays reserved from the moment it is picked until the processes end
(`reserve_port`): a port that is merely free when picked can be taken by any socket of the
machine before process 0 binds it, seconds later on a busy machine, and then process 0 dies
and process 1 waits for a coordinator that never comes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reserve_port() -> socket.socket:
  """A socket bound to a free port (all addresses, IPv6 and IPv4) with SO_REUSEPORT and not
  listening: gRPC, which binds its servers with SO_REUSEPORT, can still bind the port, any
  other socket of the machine is refused it. Close it once the processes have ended."""
  reservation = socket.socket(socket.AF_INET6)
  reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  reservation.bind(("::", 0))
  return reservation


@dataclasses.dataclass
class Process:
  popen: subprocess.Popen
  log_path: str
  # The coordinator's port, held until the process ends (every process of a cluster holds it).
  port_reservation: socket.socket | None = None

  def log(self) -> str:
    with open(self.log_path, errors="replace") as f:
      return f.read()

  def wait(self, timeout: float) -> int:
    return self.popen.wait(timeout=timeout)


def environment(devices: int, **variables: str) -> dict[str, str]:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env.update(XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             # Tiny programs compile longer than they run; 2 CPU cores serve every process.
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **variables)
  return env


def start_training(arguments: list[str], *, log_dir: str, name: str, processes: int,
                   devices_per_process: int, heartbeat_timeout_s: int = 10,
                   initialization_timeout_s: int = 120) -> list[Process]:
  """Starts `processes` trainers (with --distributed when more than one); logs go to files
  `<log_dir>/<name>.<process>.log`."""
  reservation = reserve_port() if processes > 1 else None
  port = reservation.getsockname()[1] if reservation else 0
  started = []
  for index in range(processes):
    variables = {}
    command = [sys.executable, "-m", "clasp_jax.train", *arguments]
    if processes > 1:
      command.append("--distributed")
      variables = {"CLASP_COORDINATOR_ADDRESS": f"localhost:{port}",
                   "CLASP_NUM_PROCESSES": str(processes), "CLASP_PROCESS_ID": str(index),
                   "CLASP_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout_s),
                   "CLASP_INITIALIZATION_TIMEOUT_S": str(initialization_timeout_s)}
    log_path = os.path.join(log_dir, f"{name}.{index}.log")
    with open(log_path, "w") as log:
      popen = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env=environment(devices_per_process, **variables))
    started.append(Process(popen, log_path, reservation))
  return started


def wait_all(started: list[Process], timeout: float, *, peer_exit_s: float = 60) -> list[int]:
  """Return codes; every process still running is killed when `timeout` has passed, or
  `peer_exit_s` after one of them failed (its peers should follow it out within the
  heartbeat timeout, and a peer that waits on it longer would only run the clock out). On a
  timeout the processes print their Python stacks (SIGUSR1, see clasp_jax/train.py) before
  they are killed, and the error shows every log's end."""
  deadline = time.monotonic() + timeout
  try:
    while any(process.popen.poll() is None for process in started):
      now = time.monotonic()
      if any(process.popen.poll() not in (None, 0) for process in started):
        deadline = min(deadline, now + peer_exit_s)
      if now >= deadline:
        _dump_stacks(started)
        raise AssertionError(f"processes still running after {timeout:.0f} s (or "
                             f"{peer_exit_s:.0f} s after a peer failed):\n{describe(started)}")
      time.sleep(0.1)
  finally:
    kill_all(started)
  return [process.popen.returncode for process in started]


def _dump_stacks(started: list[Process]) -> None:
  running = [process for process in started if process.popen.poll() is None]
  for process in running:
    process.popen.send_signal(signal.SIGUSR1)
  if running:
    time.sleep(2)


def describe(started: list[Process], chars: int = 3000) -> str:
  """Each process's return code and the end of its log."""
  return "\n".join(f"--- {process.log_path} (exit {process.popen.poll()}):\n"
                   f"{process.log()[-chars:]}" for process in started)


def kill_all(started: list[Process]) -> None:
  for process in started:
    if process.popen.poll() is None:
      process.popen.kill()
      process.popen.wait()
    if process.port_reservation is not None:
      process.port_reservation.close()


def wait_for_line(process: Process, pattern: str, timeout: float) -> re.Match:
  """The first match of `pattern` in the process's log, polled until `timeout`."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    match = re.search(pattern, process.log())
    if match:
      return match
    if process.popen.poll() is not None:
      break
    time.sleep(0.05)
  raise AssertionError(f"no {pattern!r} in {process.log_path}:\n{process.log()[-3000:]}")
