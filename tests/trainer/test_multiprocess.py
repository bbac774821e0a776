"""Two JAX processes on localhost train what one process computes.

Each trainer process runs `python -m clasp_jax.train --distributed` with 2 fake CPU devices;
the reference is one process with 4 devices, so both meshes hold 4 devices and see the same
global batches. In feature mode one process is killed after a checkpoint: the other must
exit with an error within a bounded time rather than wait forever in a collective, and a
restart of both resumes and ends at the reference's parameters. Audio mode trains the SSL and
spectrogram towers across the two processes.
"""

import glob
import json
import os
import re
import signal
import socket
import time

import chex
import flax
import pytest

# With `-n 2 --dist loadgroup` both tests run on one worker, one after the other: each starts
# three trainer processes, and six on two cores would starve each other.
pytestmark = pytest.mark.xdist_group("multiprocess")

from clasp_jax.data.sampling import EpochSampler
from clasp_jax.trainer.checkpointing import Checkpointer
from tests.helpers import processes

# Well above any stall of a starved process (a process the OS does not run for this long
# counts as dead and takes its peers down), well below DEATH_NOTICED_WITHIN_S.
HEARTBEAT_TIMEOUT_S = 10
# A process that dies is noticed within HEARTBEAT_TIMEOUT_S (at once if its peer is in a
# collective with it); the margin covers a busy CPU.
DEATH_NOTICED_WITHIN_S = 45
RUN_TIMEOUT_S = 300


def _variables(workdir):
  checkpointer = Checkpointer(str(workdir), every_steps=0, keep=10)
  try:
    state, record = checkpointer.read("latest")
  finally:
    checkpointer.close()
  variables = flax.traverse_util.flatten_dict(
      {"params": state["params"], "batch_stats": state["batch_stats"]}, sep="/")
  return variables, record["step"]


def _examples_read(process: processes.Process) -> tuple[int, list[int]]:
  match = re.search(r"input: process \d+ of 2 reads \d+ of the \d+ rows of each batch; "
                    r"step (\d+) examples ([\d,]+)", process.log())
  assert match, process.log()[-2000:]
  return int(match.group(1)), [int(i) for i in match.group(2).split(",")]


def _check_shards(started, *, num_examples, batch_size, seed=0):
  """Each process read its own half of the sampler's global batch, and only that."""
  (step, first), (step_1, second) = [_examples_read(process) for process in started]
  assert step == step_1
  expected = EpochSampler(num_examples, batch_size, seed, True, 0, 1).global_indices(step)
  assert first == list(expected[:batch_size // 2])
  assert second == list(expected[batch_size // 2:])
  return step


def _check_single_writer(workdir, runs):
  """Process 0 alone writes metrics and TensorBoard files: one line per logged step and one
  event file per run, where two writers would double both."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train_steps = [record["step"] for record in map(json.loads, f) if "train/loss" in record]
  assert train_steps and len(train_steps) == len(set(train_steps))
  assert len(glob.glob(os.path.join(workdir, "tensorboard", "events.out.*"))) == runs
  assert os.path.isfile(os.path.join(workdir, "config.json"))


@pytest.fixture
def launched():
  """Every process a test starts; any still running when it ends is killed."""
  started = []
  yield started
  processes.kill_all(started)


def _run(arguments, tmp_path, name, launched, *, processes_count, devices):
  started = processes.start_training(arguments, log_dir=str(tmp_path), name=name,
                                     processes=processes_count, devices_per_process=devices,
                                     heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
  launched.extend(started)
  return started


def _assert_succeeded(started, codes):
  for process, code in zip(started, codes):
    assert code == 0, f"{process.log_path} exited {code}:\n{processes.describe(started)}"


def test_the_coordinator_port_stays_reserved_for_the_coordinator():
  """A port picked as merely free could be taken before process 0 binds it: it would die and
  its peer wait for it until JAX's initialization timeout (once, in CI, past the test's)."""
  reservation = processes.reserve_port()
  port = reservation.getsockname()[1]
  try:
    with socket.socket() as other, pytest.raises(OSError):
      other.bind(("127.0.0.1", port))
    with socket.socket(socket.AF_INET6) as coordinator:  # Binds as gRPC's servers do.
      coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
      coordinator.bind(("::", port))
      coordinator.listen()
  finally:
    reservation.close()


FEATURE_STEPS = 16


def test_two_processes_equal_one_and_survive_a_death(tmp_path, launched):
  common = ["--config=configs/base.py:tiny", f"--config.total_steps={FEATURE_STEPS}",
            f"--config.eval_every_steps={FEATURE_STEPS}", "--config.checkpoint_every_steps=4",
            "--config.log_every_steps=4", "--config.keep_checkpoints=10",
            # SGD: Adam would scale the rounding noise of gradients that are zero in exact
            # arithmetic (biases whose only path runs through BatchNorm), which differs with
            # the order of the cross-device sums, up to full-size steps.
            "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.1"]
  reference_dir, multi_dir = tmp_path / "one_process", tmp_path / "two_processes"
  reference = _run(common + [f"--workdir={reference_dir}"], tmp_path, "reference", launched,
                   processes_count=1, devices=4)
  pair = _run(common + [f"--workdir={multi_dir}"], tmp_path, "pair", launched,
              processes_count=2, devices=2)

  # Kill process 1 once a checkpoint is surely complete (the step-8 save waits for step 4's).
  processes.wait_for_line(pair[1], r"checkpoint saved at step 8", RUN_TIMEOUT_S)
  pair[1].popen.send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  try:
    code = pair[0].wait(DEATH_NOTICED_WITHIN_S)
  except Exception:
    processes.kill_all(pair)
    raise AssertionError(f"process 0 still runs {DEATH_NOTICED_WITHIN_S} s after its peer "
                         f"died:\n{processes.describe(pair)}") from None
  assert code != 0
  assert time.monotonic() - killed_at < DEATH_NOTICED_WITHIN_S
  assert re.search(r"another task died|unhealthy", pair[0].log()), pair[0].log()[-2000:]
  processes.wait_all(pair, 1)
  _check_shards(pair, num_examples=512, batch_size=32)

  # Both restart from the workdir and finish; the result is the uninterrupted 1-process run's.
  resumed = _run(common + [f"--workdir={multi_dir}"], tmp_path, "resumed", launched,
                 processes_count=2, devices=2)
  _assert_succeeded(resumed, processes.wait_all(resumed, RUN_TIMEOUT_S))
  _assert_succeeded(reference, processes.wait_all(reference, RUN_TIMEOUT_S))
  for process in resumed:
    assert re.search(r"resumed from .* at step (4|8)\b", process.log()), process.log()[-2000:]
  assert _check_shards(resumed, num_examples=512, batch_size=32) in (4, 8)
  _check_single_writer(multi_dir, runs=2)

  expected, expected_step = _variables(reference_dir)
  got, step = _variables(multi_dir)
  assert step == expected_step == FEATURE_STEPS
  assert any("linear_1/kernel" in name for name in got)
  chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)


AUDIO_STEPS = 2
AUDIO_CONFIG = """
import ml_collections

from configs import base


def get_config():
  config = base.get_config("tiny,speech=audio")
  config.data.kind = "audio"
  config.data.datasets = {datasets!r}
  config.data.max_duration_s = 0.5
  # Validation loss only: the retrieval evaluators are tested elsewhere, and on 2 shared
  # cores their compilation would double the test's time.
  config.evals = ml_collections.ConfigDict()
  config.model.text.kind = "encoder"
  config.model.text.encoder = {encoder!r}
  config.model.text.max_length = 16
  config.batch_size = config.eval_batch_size = 16
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = {steps}
  config.schedule.warmup_steps = 1
  config.optimizer.name = "sgd"  # As in the feature-mode test.
  config.optimizer.learning_rate = 0.1
  return config
"""


def test_two_processes_train_audio_mode_as_one(tmp_path, launched, tone_corpus,
                                               labse_like_dir):
  # The audio settings of test_audio_training, as a config file: the base config has no
  # dataset fields to override from the command line.
  config_file = tmp_path / "audio_config.py"
  config_file.write_text(AUDIO_CONFIG.format(datasets=str(tone_corpus),
                                             encoder=str(labse_like_dir), steps=AUDIO_STEPS))
  arguments = [f"--config={config_file}"]
  reference_dir, multi_dir = tmp_path / "one_process", tmp_path / "two_processes"
  reference = _run(arguments + [f"--workdir={reference_dir}"], tmp_path, "reference", launched,
                   processes_count=1, devices=4)
  pair = _run(arguments + [f"--workdir={multi_dir}"], tmp_path, "pair", launched,
              processes_count=2, devices=2)
  _assert_succeeded(pair, processes.wait_all(pair, RUN_TIMEOUT_S))
  _assert_succeeded(reference, processes.wait_all(reference, RUN_TIMEOUT_S))
  _check_single_writer(multi_dir, runs=1)
  assert _check_shards(pair, num_examples=96, batch_size=16) == 0
  expected, _ = _variables(reference_dir)
  got, step = _variables(multi_dir)
  assert step == AUDIO_STEPS
  assert any(name.startswith("params/ssl_encoder/") for name in got)
  chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)
