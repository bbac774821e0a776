"""Training and evaluation of CLASP, read top to bottom.

Sections: config checks and mesh, model and towers, input, train state, checkpoint restore,
steps, evaluators, loop. Everything device-side is a pure jitted function (steps.py);
logging, non-finite checks, checkpoints and evaluation live here, outside the step.
Evaluators read their own splits through the same input pipeline as training.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import ml_collections
from etils import epath
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.common.config_args import ConfigError
from clasp_jax.common.workdir import upgrade_config
from clasp_jax.data import pipeline
from clasp_jax.evaluators import get_evaluator_class
from clasp_jax.models import precision
from clasp_jax.models import clasp
from clasp_jax.models.fusion import FUSIONS, MODES
from clasp_jax.trainer import init_from, optim, state as state_lib, steps
from clasp_jax.trainer.checkpointing import Checkpointer, abstract_like
from clasp_jax.trainer.early_stopping import EarlyStopping
from clasp_jax.trainer.losses import LOSSES
from clasp_jax.trainer.metric_writer import MetricWriter


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  checks = [
      (config.model.fusion in FUSIONS, f"config.model.fusion must be one of {FUSIONS}"),
      (config.model.mode in MODES, f"config.model.mode must be one of {MODES}"),
      # .get: workdirs written before the field existed resume without it (model_from_config).
      (config.model.get("precision", "highest") in precision.NAMES,
       f"config.model.precision must be one of {precision.NAMES}"),
      (config.loss.kind in LOSSES, f"config.loss.kind must be one of {LOSSES}"),
      (config.batch_size > 0 and config.eval_batch_size > 0, "batch sizes must be positive"),
      (config.batch_size % num_devices == 0,
       f"config.batch_size={config.batch_size} does not divide by the {num_devices} devices; "
       f"use a multiple of {num_devices}"),
      (config.eval_batch_size % num_devices == 0,
       f"config.eval_batch_size={config.eval_batch_size} does not divide by the {num_devices} "
       f"devices; use a multiple of {num_devices}"),
      (config.total_steps > 0 or config.num_epochs > 0,
       "set config.total_steps or config.num_epochs above 0"),
      (config.log_every_steps > 0, "config.log_every_steps must be positive"),
      # The embedded default (config.data.corpus) takes its characters from the corpus.
      (not config.loss.get("ctc_weight", 0.0) or config.model.speech.get("ctc_vocabulary", "")
       or config.data.get("corpus", None),
       "config.loss.ctc_weight > 0 needs a CTC head: set config.model.speech.ctc_vocabulary "
       "(its characters)"),
      (not config.loss.get("ctc_weight", 0.0) or _accumulation_steps(config) == 1,
       "config.loss.ctc_weight > 0 does not combine with config.accumulation_steps > 1 yet"),
      (_accumulation_steps(config) >= 1, "config.accumulation_steps must be at least 1"),
      (config.batch_size % (num_devices * max(_accumulation_steps(config), 1)) == 0,
       f"config.batch_size={config.batch_size} does not divide into "
       f"config.accumulation_steps={_accumulation_steps(config)} micro-batches on each of the "
       f"{num_devices} devices"),
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


def _accumulation_steps(config: ml_collections.ConfigDict) -> int:
  return int(config.get("accumulation_steps", 1))


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _write_text(path: epath.Path, text: str) -> None:
  if jax.process_index() == 0:
    path.write_text(text)


def _data_record(config: ml_collections.ConfigDict, num_train: int) -> dict:
  return {"seed": config.seed, "batch_size": config.batch_size, "num_train": num_train}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last evaluation's metrics."""
  # ---------------------------------------------------------------- Config checks and mesh.
  config = upgrade_config(config)
  mesh = Mesh(np.asarray(jax.devices()), (steps.AXIS,))
  validate_config(config, mesh.size)
  # epath: a workdir may be local or on Cloud Storage (gs://...), the same code for both.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  logging.info("mesh: %d devices (%s) over %d processes", mesh.size, jax.devices()[0].platform,
               jax.process_count())

  # ---------------------------------------------------------------- Model and towers.
  built = clasp.build(config, axis_name=steps.AXIS)
  model = built.model
  logging.info("model: speech %s, text %s", built.speech_description, built.text_description)

  # ---------------------------------------------------------------- Input.
  make_pipeline = functools.partial(pipeline.for_split, config, mesh=mesh,
                                    text_encoder=built.text_encoder)
  train_input = make_pipeline("train", train=True)
  validation = make_pipeline("validation", train=False)
  steps_per_epoch = train_input.steps_per_epoch
  total_steps = (config.num_epochs * steps_per_epoch if config.num_epochs > 0
                 else config.total_steps)
  eval_every = config.eval_every_steps or steps_per_epoch
  if validation.num_full_steps == 0:
    raise ConfigError(f"the validation split has {len(validation.source)} examples, fewer than "
                      f"config.eval_batch_size={config.eval_batch_size}")
  logging.info("data: %s, %d train examples (%d steps per epoch), %d validation; %d steps",
               config.data.kind, len(train_input.source), steps_per_epoch,
               len(validation.source), total_steps)

  # ---------------------------------------------------------------- Train state.
  example_batch, example_host = train_input.local_batch(0)
  built.check_batch(example_batch, example_host)
  state, tx, frozen = state_lib.create_train_state(
      model, example_batch, seed=config.seed, mesh=mesh, pretrained=built.pretrained,
      frozen_pattern=functools.partial(optim.frozen_pattern, config),
      make_optimizer=lambda params: optim.make_optimizer(
          config, params, total_steps=total_steps, steps_per_epoch=steps_per_epoch)[0])
  schedule = optim.learning_rate_schedule(config, total_steps=total_steps,
                                          steps_per_epoch=steps_per_epoch)
  _write_text(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=2) + "\n")
  _write_text(epath.Path(workdir) / "parameters.txt",
              optim.parameter_overview(state.params, frozen))

  # ---------------------------------------------------------------- Checkpoint restore.
  checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                              keep=config.keep_checkpoints)
  early_stopping = EarlyStopping(patience=config.early_stopping.patience,
                                 mode=config.early_stopping.mode)
  last_eval: dict[str, float] = {}
  latest = checkpointer.latest_step()
  if latest is None and config.get("init_from", ""):
    # A new stage of a chain of runs: the weights of another workdir, a fresh optimizer.
    params, batch_stats, from_step = init_from.load_variables(
        config.init_from, jax.device_get(state.params), jax.device_get(state.batch_stats))
    replicated = NamedSharding(mesh, P())
    state = state.replace(params=jax.device_put(params, replicated),
                          batch_stats=jax.device_put(batch_stats, replicated))
    logging.info("initialised from %s (step %d) with a fresh optimizer", config.init_from,
                 from_step)
  if latest is not None:
    state, record = checkpointer.restore(latest, abstract_like(state))
    early_stopping = EarlyStopping.from_json(record["early_stopping"])
    last_eval = record.get("last_eval", {})
    if record.get("data") != _data_record(config, len(train_input.source)):
      logging.warning("the data settings differ from the checkpoint's %s: the resumed run will "
                      "not see the batches an uninterrupted run would", record.get("data"))
    checkpointer.drop_best_after(latest)
    logging.info("resumed from %s at step %d", checkpointer.directory, latest)
  start_step = int(state.step)

  # ---------------------------------------------------------------- Steps.
  loss_kind = config.loss.kind
  if _accumulation_steps(config) > 1:
    step_fn = functools.partial(steps.accumulated_train_step,
                                accumulation_steps=_accumulation_steps(config))
  else:
    step_fn = steps.train_step
  # The auxiliary CTC loss (the embedded default); validate_config keeps it off accumulation.
  ctc_weight = float(config.loss.get("ctc_weight", 0.0))
  step_options = {"ctc_weight": ctc_weight} if ctc_weight else {}
  train_fn = steps.shard_over_mesh(
      functools.partial(step_fn, model=model, tx=tx, loss_kind=loss_kind,
                        schedule=schedule, frozen=frozen, **step_options),
      mesh, donate_state=True)
  eval_loss_fn = steps.shard_over_mesh(
      functools.partial(steps.eval_loss_step, model=model, loss_kind=loss_kind), mesh)
  predict_fn = steps.shard_over_mesh(functools.partial(steps.embed_step, model=model), mesh,
                                     batch_out=True)

  # ---------------------------------------------------------------- Evaluators.
  def make_eval_pipeline(split: str) -> pipeline.InputPipeline:
    return validation if split == "validation" else make_pipeline(split, train=False)

  evaluators = {name: get_evaluator_class(eval_config.type)(
      eval_config, predict_fn=predict_fn, make_pipeline=make_eval_pipeline, mesh=mesh)
                for name, eval_config in config.evals.items()}

  def evaluate(state, step: int, final: bool) -> dict[str, float]:
    """Validation loss over whole batches, then each evaluator due at `step` (all at the end)."""
    losses = [eval_loss_fn(state, batch.arrays)
              for batch in validation.iterate(0, validation.num_full_steps)]
    results = {"val/loss": float(np.mean(jax.device_get(losses)))}
    for name, evaluator in evaluators.items():
      every = config.evals[name].get("every_steps", 0) or eval_every
      if step % every and not final:
        continue
      for metric, value in evaluator.run(state):
        results[f"{name}/{metric}"] = float(value)
    return results

  def record(step: int) -> dict:
    return {"step": step, "early_stopping": early_stopping.to_json(), "last_eval": last_eval,
            "data": _data_record(config, len(train_input.source)),
            "config": json.loads(config.to_json_best_effort())}

  # ---------------------------------------------------------------- Loop.
  writer = MetricWriter(workdir, resume_step=start_step)
  if start_step >= total_steps or early_stopping.stopped:
    reason = "early-stopped" if early_stopping.stopped else f"trained to step {start_step}"
    logging.info("nothing to do: %s already %s; last evaluation: %s", workdir, reason,
                 json.dumps(last_eval, sort_keys=True))
    writer.close()
    checkpointer.close()
    return last_eval

  # Each process reads only its rows of every global batch; the log says which, so a
  # multi-host run can be checked (the rows of all processes make up the sampler's batch).
  local_rows = train_input.sampler.local_indices(start_step)
  logging.info("input: process %d of %d reads %d of the %d rows of each batch; step %d "
               "examples %s", jax.process_index(), jax.process_count(), len(local_rows),
               config.batch_size, start_step, ",".join(map(str, local_rows)))
  batches = train_input.iterate(start_step=start_step)
  window: list[dict[str, jax.Array]] = []
  window_start = time.perf_counter()
  window_first_step = start_step
  step = start_step
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = train_fn(state, next(batches).arrays)
    window.append(metrics)
    if step == start_step + 1:  # Keep compilation out of the steps/s figure.
      jax.block_until_ready(metrics)
      window_start, window_first_step = time.perf_counter(), step

    if step % config.log_every_steps == 0 or step == total_steps:
      averaged = {k: float(np.mean([m[k] for m in jax.device_get(window)])) for k in window[0]}
      nonfinite = int(state.nonfinite_steps)
      elapsed = time.perf_counter() - window_start
      steps_per_second = (step - window_first_step) / max(elapsed, 1e-9)
      averaged["train/steps_per_second"] = steps_per_second
      averaged["train/epoch"] = step / steps_per_epoch
      writer.write_scalars(step, averaged)
      logging.info("step %d/%d | loss %.4f | %.1f steps/s | ETA %s", step, total_steps,
                   averaged["train/loss"], steps_per_second,
                   _format_duration((total_steps - step) / max(steps_per_second, 1e-9)))
      if nonfinite >= config.max_nonfinite_steps:
        checkpointer.close()
        raise FloatingPointError(
            f"training diverged: {nonfinite} consecutive steps had a non-finite loss or gradient "
            f"at step {step} (those updates were skipped); lower config.optimizer.learning_rate "
            f"or check the data. Checkpoints so far are in {checkpointer.directory}")
      window, window_start, window_first_step = [], time.perf_counter(), step

    if step % eval_every == 0 or step == total_steps:
      last_eval = evaluate(state, step, final=step == total_steps)
      writer.write_scalars(step, last_eval)
      summary = ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()
                          if k == "val/loss" or (k.endswith(("/hits@1", "/mrr")) and
                                                 k.count("/") == 2))
      logging.info("eval at step %d: %s", step, summary)
      monitored = last_eval.get(config.early_stopping.metric)
      if monitored is None:
        raise ConfigError(f"config.early_stopping.metric={config.early_stopping.metric!r} is not "
                          f"among the evaluation results {sorted(last_eval)}")
      if early_stopping.update(monitored, step):
        logging.info("early stopping at step %d: %s has not improved on %.5f (step %s) for %d "
                     "evaluations", step, config.early_stopping.metric, early_stopping.best,
                     early_stopping.best_step, early_stopping.evals_without_improvement)
      if early_stopping.best_step == step:
        checkpointer.save_best(step, state, record(step))

    final = step == total_steps or early_stopping.stopped
    if checkpointer.save(step, state, record(step), force=final):
      logging.info("checkpoint saved at step %d", step)
    if early_stopping.stopped:
      break

  writer.close()
  checkpointer.close()
  logging.info("done at step %d; workdir %s (best: step %s, %s %s)", step, workdir,
               early_stopping.best_step, config.early_stopping.metric, early_stopping.best)
  return last_eval
