"""Optimizer and learning-rate schedule from config, and which parameters train.

Freezing is config, through one mechanism: a regex over '/'-joined parameter paths. The
effective regex joins `config.frozen_params` with the patterns that the towers' settings
imply (`config.model.text.trainable_top_layers`, `config.model.speech.trainable_top_layers`:
-1 trains the whole tower, 0 freezes it, K > 0 trains only its top K layers). Frozen
parameters are not differentiated and have no optimizer state: the optimizer sees the
trainable subtree only.
"""

from __future__ import annotations

import re

import flax
import jax
import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "step")


def parameter_path(path) -> str:
  return "/".join(str(getattr(key, "key", key)) for key in path)


def _layer_indices(params, tower: str, layer_pattern: str) -> list[int]:
  regex = re.compile(layer_pattern)
  found = set()
  for path in jax.tree_util.tree_flatten_with_path(params.get(tower, {}))[0]:
    match = regex.search(parameter_path(path[0]))
    if match:
      found.add(int(match.group(1)))
  return sorted(found)


def tower_frozen_pattern(params, tower: str, layer_pattern: str, trainable_top: int,
                         always_trainable: tuple[str, ...] = ()) -> str:
  """The regex freezing `tower/` except its top `trainable_top` layers (and, when any layer
  trains, the sub-trees named in `always_trainable`, e.g. a sentence encoder's Dense head).

  `layer_pattern` finds a layer's index in a path inside the tower (one capture group).
  '' when nothing is frozen (no such tower, or trainable_top < 0).
  """
  if tower not in params or trainable_top < 0:
    return ""
  layers = _layer_indices(params, tower, layer_pattern)
  if trainable_top > len(layers):
    raise ValueError(f"{tower}: {trainable_top} trainable top layers asked for, but it has "
                     f"{len(layers)}")
  if trainable_top == 0:
    return f"^{re.escape(tower)}/"
  top = "|".join(str(index) for index in layers[len(layers) - trainable_top:])
  layer_prefix = layer_pattern.replace(r"(\d+)", f"(?:{top})")
  keep = [f".*{layer_prefix}"] + [f"{re.escape(name)}/" for name in always_trainable]
  return f"^{re.escape(tower)}/(?!{'|'.join(keep)})"


TEXT_TOWER_LAYERS = r"transformer/encoder/layer_(\d+)/"
SSL_ENCODER_LAYERS = r"encoder/layers_(\d+)/"


def frozen_pattern(config: ml_collections.ConfigDict, params) -> str:
  """The effective freezing regex of a config, for a parameter tree."""
  model = config.get("model", {})
  patterns = [config.get("frozen_params", "")]
  text = model.get("text", None)
  if text is not None and "text_encoder" in params:
    head = tuple(name for name in params["text_encoder"] if name != "transformer")
    patterns.append(tower_frozen_pattern(params, "text_encoder", TEXT_TOWER_LAYERS,
                                         int(text.get("trainable_top_layers", 0)), head))
  speech = model.get("speech", None)
  if speech is not None and "ssl_encoder" in params:
    patterns.append(tower_frozen_pattern(params, "ssl_encoder", SSL_ENCODER_LAYERS,
                                         int(speech.get("trainable_top_layers", -1))))
  return "|".join(f"(?:{p})" for p in patterns if p)


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
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam/AdamW/SGD with optional global-norm clipping, for `params` (the trainable subtree)."""
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
  elif opt.name == "sgd":
    # Momentum b1. Unlike Adam it does not divide by the gradient's own size, so gradients
    # that are rounding noise (a bias whose only path runs through BatchNorm) stay noise:
    # runs over different device layouts agree to float32 rounding.
    base = optax.sgd(schedule, momentum=opt.b1 or None)
  else:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
  chain = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  return optax.chain(*chain, base), schedule


def split_trainable(params, frozen) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts: the parameters under each label, others left out."""
  flat = flax.traverse_util.flatten_dict(params)
  flat_frozen = flax.traverse_util.flatten_dict(frozen)
  trainable = {path: value for path, value in flat.items() if not flat_frozen[path]}
  rest = {path: value for path, value in flat.items() if flat_frozen[path]}
  return (flax.traverse_util.unflatten_dict(trainable),
          flax.traverse_util.unflatten_dict(rest))


def merge_params(trainable, frozen) -> dict:
  """The inverse of split_trainable."""
  flat = flax.traverse_util.flatten_dict(trainable)
  flat.update(flax.traverse_util.flatten_dict(frozen))
  return flax.traverse_util.unflatten_dict(flat)


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
