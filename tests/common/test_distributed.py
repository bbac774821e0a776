"""initialize_from_environment hands jax.distributed.initialize what the environment says.

jax.distributed.initialize is replaced by a recorder: starting the real runtime would wait
for peers that never come.
"""

import jax
import pytest

from clasp_jax.common import distributed

EXPLICIT = {
    "CLASP_COORDINATOR_ADDRESS": "node-0:23456",
    "CLASP_NUM_PROCESSES": "16",
    "CLASP_PROCESS_ID": "5",
}


@pytest.fixture
def calls(monkeypatch):
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: recorded.append(kwargs))
  return recorded


def test_explicit_variables_become_arguments(calls):
  arguments = distributed.initialize_from_environment(dict(EXPLICIT, CLASP_LOCAL_DEVICE_IDS="5"))
  expected = {"coordinator_address": "node-0:23456", "num_processes": 16, "process_id": 5,
              "local_device_ids": [5]}
  assert calls == [expected]
  assert arguments == expected


def test_no_variables_leave_detection_to_jax(calls):
  assert distributed.initialize_from_environment({"SLURM_PROCID": "3"}) == {}
  assert calls == [{}]


def test_local_device_ids_alone_still_pick_the_gpus(calls):
  distributed.initialize_from_environment({"CLASP_LOCAL_DEVICE_IDS": "0,1,2"})
  assert calls == [{"local_device_ids": [0, 1, 2]}]


def test_reads_os_environ_by_default(calls, monkeypatch):
  for name, value in EXPLICIT.items():
    monkeypatch.setenv(name, value)
  monkeypatch.delenv("CLASP_LOCAL_DEVICE_IDS", raising=False)
  distributed.initialize_from_environment()
  assert calls == [{"coordinator_address": "node-0:23456", "num_processes": 16, "process_id": 5}]


@pytest.mark.parametrize("environ, message", [
    ({"CLASP_COORDINATOR_ADDRESS": "node-0:23456"},
     "set without CLASP_NUM_PROCESSES, CLASP_PROCESS_ID"),
    (dict(EXPLICIT, CLASP_PROCESS_ID="16"), r"not in 0 \.\. CLASP_NUM_PROCESSES-1 = 15"),
    (dict(EXPLICIT, CLASP_NUM_PROCESSES="two"), "CLASP_NUM_PROCESSES must be a non-negative"),
    (dict(EXPLICIT, CLASP_COORDINATOR_ADDRESS="node-0"), "must be host:port"),
    (dict(EXPLICIT, CLASP_LOCAL_DEVICE_IDS="0;1"), "comma-separated integers"),
])
def test_inconsistent_variables_are_clear_errors_before_initialize(calls, environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize_from_environment(environ)
  assert calls == []


def test_heartbeat_timeout_is_passed_and_checked(calls):
  distributed.initialize_from_environment(dict(EXPLICIT, CLASP_HEARTBEAT_TIMEOUT_S="7"))
  assert calls[-1]["heartbeat_timeout_seconds"] == 7
  for bad in ("0", "-3", "soon"):
    with pytest.raises(ValueError, match="CLASP_HEARTBEAT_TIMEOUT_S"):
      distributed.initialize_arguments(dict(EXPLICIT, CLASP_HEARTBEAT_TIMEOUT_S=bad))


def test_initialization_and_shutdown_timeouts_are_passed_and_checked(calls):
  distributed.initialize_from_environment(dict(EXPLICIT, CLASP_INITIALIZATION_TIMEOUT_S="60",
                                               CLASP_SHUTDOWN_TIMEOUT_S="30"))
  assert calls[-1]["initialization_timeout"] == 60
  assert calls[-1]["shutdown_timeout_seconds"] == 30
  assert "heartbeat_timeout_seconds" not in calls[-1]
  for name in ("CLASP_INITIALIZATION_TIMEOUT_S", "CLASP_SHUTDOWN_TIMEOUT_S"):
    with pytest.raises(ValueError, match=name):
      distributed.initialize_arguments(dict(EXPLICIT, **{name: "0"}))
