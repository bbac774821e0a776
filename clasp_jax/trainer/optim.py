"""Optimizer and learning-rate schedule from config, with regex-frozen parameters."""

from __future__ import annotations

import re

import flax
import jax
import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine", "step")


def parameter_path(path) -> str:
  return "/".join(str(getattr(key, "key", key)) for key in path)


def frozen_mask(params, pattern: str):
  """A pytree of bools: True where the parameter's '/'-joined path matches `pattern`."""
  if not pattern:
    return jax.tree.map(lambda _: False, params)
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(regex.search(parameter_path(path))), params)


def learning_rate_schedule(config: ml_collections.ConfigDict, *, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  peak = config.optimizer.learning_rate
  schedule = config.schedule
  if schedule.kind == "constant":
    return optax.constant_schedule(peak)
  if schedule.kind == "warmup_cosine":
    warmup = min(schedule.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * schedule.final_fraction)
  if schedule.kind == "step":
    # PyTorch StepLR stepped once per epoch: lr * gamma ** (epoch // step_epochs).
    return optax.exponential_decay(peak, transition_steps=schedule.step_epochs * steps_per_epoch,
                                   decay_rate=schedule.gamma, staircase=True)
  raise ValueError(f"config.schedule.kind must be one of {SCHEDULES}, got {schedule.kind!r}")


def make_optimizer(config: ml_collections.ConfigDict, params, *, total_steps: int,
                   steps_per_epoch: int, frozen=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam/AdamW with optional global-norm clipping; frozen parameters get zero updates.

  `frozen` (a pytree of bools like `params`) defaults to `config.frozen_params`' matches.
  """
  opt = config.optimizer
  schedule = learning_rate_schedule(config, total_steps=total_steps,
                                    steps_per_epoch=steps_per_epoch)
  if opt.name == "adam":
    base = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
  elif opt.name == "adamw":
    # Decay matrices only, not biases, norms or the logit scale.
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    base = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=decay_mask)
  else:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
  chain = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  trainable = optax.chain(*chain, base)
  if frozen is None:
    frozen = frozen_mask(params, config.frozen_params)
  labels = jax.tree.map(lambda is_frozen: "frozen" if is_frozen else "trainable", frozen)
  tx = optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def parameter_overview(params, frozen) -> str:
  """A table of every parameter (path, shape, count, frozen) and the totals."""
  rows = []
  flat_params = flax.traverse_util.flatten_dict(params, sep="/")
  flat_frozen = flax.traverse_util.flatten_dict(frozen, sep="/")
  width = max([len(name) for name in flat_params] + [9])
  total = trainable = 0
  for name, value in sorted(flat_params.items()):
    count = int(value.size)
    total += count
    trainable += 0 if flat_frozen[name] else count
    rows.append(f"{name:<{width}}  {str(tuple(value.shape)):<14} {count:>12,}  "
                f"{'frozen' if flat_frozen[name] else ''}")
  header = f"{'parameter':<{width}}  {'shape':<14} {'count':>12}"
  footer = f"total {total:,} parameters, {trainable:,} trainable"
  return "\n".join([header, "-" * len(header)] + rows + [footer]) + "\n"
