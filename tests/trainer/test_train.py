"""The trainer: learning, one trace per run, exact resume after SIGKILL, clear config errors."""

import functools
import json
import os
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clasp_jax.data import pipeline
from clasp_jax.models import towers
from clasp_jax.trainer import optim, state as state_lib, steps, trainer
from clasp_jax.trainer.checkpointing import Checkpointer
from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  config = base.get_config("tiny")
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _run_cli(workdir, *overrides, **popen_kwargs):
  command = [sys.executable, "-m", "clasp_jax.train", "--config=configs/base.py:tiny",
             f"--workdir={workdir}", *overrides]
  return subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), **popen_kwargs)


def _final_params(workdir):
  """The step and parameters of the newest checkpoint in `workdir`."""
  checkpointer = Checkpointer(str(workdir), every_steps=1, keep=10)
  state, record = checkpointer.read()
  checkpointer.close()
  assert record["step"] == int(state["step"])
  return record["step"], state["params"]


def test_tiny_run_learns_and_logs(tmp_path):
  config = tiny_config(total_steps=150, eval_every_steps=50, log_every_steps=25)
  config.evals.rare = {"type": "retrieval", "split": "test", "protocol": "soft",
                       "num_candidates": 10, "every_steps": 100}
  results = trainer.train_and_evaluate(config, str(tmp_path))
  records = _jsonl(tmp_path / "metrics.jsonl")
  # The 'rare' evaluator runs at multiples of its every_steps, and at the end.
  rare_steps = [r["step"] for r in records if "rare/speech_to_text/hits@1" in r]
  assert rare_steps == [100, 150]
  assert [r["step"] for r in records if "val/speech_to_text/hits@1" in r] == [50, 100, 150]
  train_losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert train_losses[-1] < 0.8 * train_losses[0]
  chance = 1 / config.data.num_validation
  assert results["val/speech_to_text/hits@1"] > 2 * chance
  for key in ("val/loss", "val/text_to_speech/mrr", "val/speech_to_text/mean_rank"):
    assert key in results and np.isfinite(results[key])
  assert os.listdir(tmp_path / "tensorboard")
  assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == config.batch_size
  overview = (tmp_path / "parameters.txt").read_text()
  assert "speech_encoder/mix/linear_0/kernel" in overview and "total" in overview
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["140", "150"]  # keep 2, every 20.


def _train_state(config, mesh):
  """The trainer's own way: model from config, pipeline, create_train_state."""
  built = towers.build(config, axis_name="data")
  train_input = pipeline.for_split(config, "train", mesh=mesh, train=True)
  example, _ = train_input.local_batch(0)
  make_optimizer = lambda params: optim.make_optimizer(config, params, total_steps=100,
                                                       steps_per_epoch=10)
  state, tx, frozen = state_lib.create_train_state(
      built.model, example, seed=0, mesh=mesh, frozen_pattern="",
      make_optimizer=lambda params: make_optimizer(params)[0])
  schedule = make_optimizer(state.params)[1]
  return train_input, built.model, tx, schedule, state


def test_train_step_traces_once():
  config = tiny_config()
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  train_input, model, tx, schedule, state = _train_state(config, mesh)

  @chex.assert_max_traces(n=1)
  def traced_train_step(state, batch):
    return steps.train_step(state, batch, model=model, tx=tx, loss_kind="softmax",
                            schedule=schedule)

  train_fn = steps.shard_over_mesh(traced_train_step, mesh, donate_state=True)
  batches = train_input.iterate(start_step=0)
  for _ in range(4):
    state, _ = train_fn(state, next(batches).arrays)
  assert int(state.step) == 4


def test_nonfinite_batch_skips_the_update():
  config = tiny_config()
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  train_input, model, tx, schedule, state = _train_state(config, mesh)
  before = jax.device_get(state.params)
  batch, _ = train_input.local_batch(0)
  batch["speech"][3, 0] = np.nan
  train_fn = steps.shard_over_mesh(
      functools.partial(steps.train_step, model=model, tx=tx, loss_kind="softmax"), mesh)
  state, metrics = train_fn(state, train_input.to_global(batch))
  assert not np.isfinite(metrics["train/loss"])
  assert int(state.nonfinite_steps) == 1 and int(state.step) == 1
  chex.assert_trees_all_equal(jax.device_get(state.params), before)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.batch_stats)))


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted_run(tmp_path):
  overrides = ["--config.total_steps=400", "--config.checkpoint_every_steps=20",
               "--config.eval_every_steps=400", "--config.log_every_steps=20"]
  uninterrupted = _run_cli(tmp_path / "uninterrupted", *overrides)
  killed = _run_cli(tmp_path / "killed", *overrides)
  for line in killed.stderr:
    if "checkpoint saved at step 40" in line:
      killed.send_signal(signal.SIGKILL)
      break
  killed.wait(timeout=300)
  assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  interrupted_at = Checkpointer(str(tmp_path / "killed"), every_steps=1, keep=10).latest_step()
  assert interrupted_at is not None and interrupted_at < 400

  _, uninterrupted_log = uninterrupted.communicate(timeout=300)
  assert uninterrupted.returncode == 0, uninterrupted_log[-3000:]
  resumed = _run_cli(tmp_path / "killed", *overrides)
  _, resumed_log = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, resumed_log[-3000:]
  assert "resumed from" in resumed_log and f"at step {interrupted_at}" in resumed_log

  step_a, params_a = _final_params(tmp_path / "uninterrupted")
  step_b, params_b = _final_params(tmp_path / "killed")
  assert step_a == step_b == 400
  chex.assert_trees_all_close(params_a, params_b, rtol=0, atol=1e-6)

  # The resumed run's log keeps each step once.
  steps_logged = [r["step"] for r in _jsonl(tmp_path / "killed" / "metrics.jsonl")
                  if "train/loss" in r]
  assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 400

  # Running the finished command again trains nothing.
  again = _run_cli(tmp_path / "killed", *overrides)
  _, again_log = again.communicate(timeout=300)
  assert again.returncode == 0 and "nothing to do" in again_log
  assert "step 420" not in again_log


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  with pytest.raises(trainer.ConfigError, match="does not divide by the 8 devices"):
    trainer.train_and_evaluate(tiny_config(batch_size=30), str(tmp_path))


def test_cli_rejects_unknown_config_key(tmp_path):
  process = _run_cli(tmp_path, "--config.batch_sise=64")
  _, log = process.communicate(timeout=120)
  assert process.returncode != 0
  assert "batch_sise" in log and "Traceback" not in log


def test_cli_reports_missing_feature_folder(tmp_path):
  process = _run_cli(tmp_path, "--config.data.kind=features",
                     f"--config.data.directory={tmp_path / 'nowhere'}")
  _, log = process.communicate(timeout=120)
  assert process.returncode == 1
  assert "info.json is missing" in log and "Traceback" not in log
