"""Training and evaluation of the CLASP fusion encoder, read top to bottom.

Sections: config checks, mesh, input, model and optimizer, checkpoint restore, steps,
evaluators, loop. Everything device-side is a pure jitted function (see steps.py); logging,
non-finite checks, checkpoints and evaluation live here, outside the step.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clasp_jax.trainer import optim, steps
from clasp_jax.models import text_tower
from clasp_jax.common.config_args import ConfigError
from clasp_jax.inference.workdir import embed_feature_split, freeze_text_tower, tokenize_split
from clasp_jax.trainer.checkpointing import Checkpointer, abstract_like
from clasp_jax.data import feature_pipeline, features
from clasp_jax.data.sampling import EpochSampler
from clasp_jax.trainer.early_stopping import EarlyStopping
from clasp_jax.evaluators import get_evaluator_class
from clasp_jax.trainer.losses import LOSSES
from clasp_jax.trainer.metric_writer import MetricWriter
from clasp_jax.models.clasp import model_from_config
from clasp_jax.models import precision
from clasp_jax.models.fusion import FUSIONS, MODES


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
  ]
  for ok, message in checks:
    if not ok:
      raise ConfigError(message)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _write_text(path: str, text: str) -> None:
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(text)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last evaluation's metrics."""
  # ---------------------------------------------------------------- Mesh and config checks.
  mesh = Mesh(np.asarray(jax.devices()), (steps.AXIS,))
  validate_config(config, mesh.size)
  os.makedirs(workdir, exist_ok=True)
  replicated = NamedSharding(mesh, P())
  logging.info("mesh: %d devices (%s) over %d processes", mesh.size, jax.devices()[0].platform,
               jax.process_count())

  # ---------------------------------------------------------------- Text tower and input.
  tower = None
  if config.text.encoder:
    tower = text_tower.load(config.text.encoder, max_length=config.text.max_length or None)
    logging.info("text tower: %s (%d-d), top %d layers trainable", config.text.encoder,
                 tower.embedding_dim, config.text.trainable_top_layers)

  def load_split(name: str) -> features.FeatureSplit:
    split = features.load_split(config.data, name)
    if tower is not None:
      tokenize_split(split, name, tower)
    return split

  train_split = load_split("train")
  eval_splits = {"validation": load_split("validation")}
  text_dim = tower.embedding_dim if tower is not None else train_split.dims["text"]
  if text_dim != config.model.embed_dim:
    raise ConfigError(f"config.model.embed_dim={config.model.embed_dim} must equal the text "
                      f"embedding width ({text_dim})")
  sampler = EpochSampler(train_split.num_examples, config.batch_size, seed=config.seed,
                         process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = sampler.steps_per_epoch
  total_steps = (config.num_epochs * steps_per_epoch if config.num_epochs > 0
                 else config.total_steps)
  eval_every = config.eval_every_steps or steps_per_epoch
  if eval_splits["validation"].num_examples < config.eval_batch_size:
    raise ConfigError(f"the validation split has {eval_splits['validation'].num_examples} "
                      f"examples, fewer than config.eval_batch_size={config.eval_batch_size}")
  logging.info("data: %s, %d train examples (%d steps per epoch), %d validation; %d steps",
               config.data.kind, train_split.num_examples, steps_per_epoch,
               eval_splits["validation"].num_examples, total_steps)

  # ---------------------------------------------------------------- Model and optimizer.
  model = model_from_config(config.model, config.loss, axis_name=steps.AXIS,
                            text_encoder=tower.model if tower is not None else None)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  variables = jax.jit(functools.partial(model.init, train=False))(
      init_rng, train_split.take(np.arange(2)))
  params, batch_stats = dict(variables["params"]), variables.get("batch_stats", {})
  frozen = optim.frozen_mask(params, config.frozen_params)
  if tower is not None:
    params["text_encoder"] = tower.params  # Pretrained weights replace the random init.
    frozen = freeze_text_tower(frozen, tower, config.text.trainable_top_layers)
  tx, schedule = optim.make_optimizer(config, params, total_steps=total_steps,
                                      steps_per_epoch=steps_per_epoch, frozen=frozen)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=batch_stats, opt_state=tx.init(params),
                           rng=jax.random.key_data(dropout_rng),
                           nonfinite_steps=jnp.zeros((), jnp.int32))
  state = jax.device_put(state, replicated)
  _write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n")
  _write_text(os.path.join(workdir, "parameters.txt"),
              optim.parameter_overview(params, frozen))

  # ---------------------------------------------------------------- Checkpoint restore.
  checkpointer = Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                              keep=config.keep_checkpoints)
  early_stopping = EarlyStopping(patience=config.early_stopping.patience,
                                 mode=config.early_stopping.mode)
  last_eval: dict[str, float] = {}
  latest = checkpointer.latest_step()
  if latest is not None:
    state, record = checkpointer.restore(latest, abstract_like(state))
    early_stopping = EarlyStopping.from_json(record["early_stopping"])
    last_eval = record.get("last_eval", {})
    if record.get("data") != {"seed": config.seed, "batch_size": config.batch_size,
                              "num_train": train_split.num_examples}:
      logging.warning("the data settings differ from the checkpoint's %s: the resumed run will "
                      "not see the batches an uninterrupted run would", record.get("data"))
    logging.info("resumed from %s at step %d", checkpointer.directory, latest)
  start_step = int(state.step)

  # ---------------------------------------------------------------- Steps.
  loss_kind = config.loss.kind
  train_fn = steps.shard_over_mesh(
      functools.partial(steps.train_step, model=model, tx=tx, loss_kind=loss_kind,
                        schedule=schedule), mesh, donate_state=True)
  eval_loss_fn = steps.shard_over_mesh(
      functools.partial(steps.eval_loss_step, model=model, loss_kind=loss_kind), mesh)
  embed_fn = steps.shard_over_mesh(functools.partial(steps.embed_step, model=model), mesh,
                                   batch_out=True)

  # ---------------------------------------------------------------- Evaluators.
  evaluators = {}
  for name, eval_config in config.evals.items():
    split = eval_config.get("split", "validation")
    if split not in eval_splits:
      eval_splits[split] = load_split(split)
    evaluators[name] = (get_evaluator_class(eval_config.type)(eval_config, mesh=mesh), split)

  def evaluate(state, step: int, final: bool) -> dict[str, float]:
    """Validation loss, then each evaluator due at `step` (all of them at the end)."""
    losses = [eval_loss_fn(state, batch) for batch, _ in feature_pipeline.eval_batches(
        eval_splits["validation"], config.eval_batch_size, mesh, drop_remainder=True)]
    results = {"val/loss": float(np.mean(jax.device_get(losses)))}
    embedded = {}
    for name, (evaluator, split) in evaluators.items():
      every = config.evals[name].get("every_steps", 0) or eval_every
      if step % every and not final:
        continue
      if split not in embedded:
        embedded[split] = embed_feature_split(functools.partial(embed_fn, state),
                                              eval_splits[split], config.eval_batch_size, mesh)
      for metric, value in evaluator.run(embedded[split]):
        results[f"{name}/{metric}"] = float(value)
    return results

  def record(step: int) -> dict:
    return {"step": step, "early_stopping": early_stopping.to_json(), "last_eval": last_eval,
            "data": {"seed": config.seed, "batch_size": config.batch_size,
                     "num_train": train_split.num_examples},
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

  batches = feature_pipeline.train_batches(train_split, sampler, mesh, start_step=start_step,
                                           prefetch=config.data.prefetch)
  window: list[dict[str, jax.Array]] = []
  window_start = time.perf_counter()
  window_first_step = start_step
  step = start_step
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = train_fn(state, next(batches))
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

    final = step == total_steps or early_stopping.stopped
    if checkpointer.save(step, state, record(step), force=final):
      logging.info("checkpoint saved at step %d", step)
    if early_stopping.stopped:
      break

  writer.close()
  checkpointer.close()
  logging.info("done at step %d; workdir %s", step, workdir)
  return last_eval
