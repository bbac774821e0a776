"""Starts `python -m clasp_jax.train` as a JAX cluster of processes on this machine.

Each process sees its own fake CPU devices, the processes meet through a coordinator on a
free localhost port (clasp_jax/common/distributed.py's variables) and run their collectives
over gloo, as hosts of a pod would over the interconnect.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


@dataclasses.dataclass
class Process:
  popen: subprocess.Popen
  log_path: str

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
                   devices_per_process: int, heartbeat_timeout_s: int = 10) -> list[Process]:
  """Starts `processes` trainers (with --distributed when more than one); logs go to files
  `<log_dir>/<name>.<process>.log`."""
  port = free_port()
  started = []
  for index in range(processes):
    variables = {}
    command = [sys.executable, "-m", "clasp_jax.train", *arguments]
    if processes > 1:
      command.append("--distributed")
      variables = {"CLASP_COORDINATOR_ADDRESS": f"localhost:{port}",
                   "CLASP_NUM_PROCESSES": str(processes), "CLASP_PROCESS_ID": str(index),
                   "CLASP_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout_s)}
    log_path = os.path.join(log_dir, f"{name}.{index}.log")
    with open(log_path, "w") as log:
      popen = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env=environment(devices_per_process, **variables))
    started.append(Process(popen, log_path))
  return started


def wait_all(started: list[Process], timeout: float) -> list[int]:
  """Return codes; kills every process still running when `timeout` has passed."""
  deadline = time.monotonic() + timeout
  codes = []
  try:
    for process in started:
      codes.append(process.wait(max(deadline - time.monotonic(), 0.1)))
  finally:
    kill_all(started)
  return codes


def kill_all(started: list[Process]) -> None:
  for process in started:
    if process.popen.poll() is None:
      process.popen.kill()
      process.popen.wait()


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
