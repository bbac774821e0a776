"""The pure, per-device train and evaluation steps, and their data-parallel wrappers.

Steps are written pmap-style over the axis 'data': each device holds a slice of the global
batch, the loss gathers embeddings from every device, and gradients are averaged with `pmean`.
`shard_over_mesh` runs such a function under `jit` + `shard_map` (the trainer's way); the same
function runs unchanged under `jax.pmap(axis_name='data')`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from clasp_jax.common.mesh import DATA_AXIS as AXIS
from clasp_jax.trainer import chunked_losses, losses, optim
from clasp_jax.trainer.state import TrainState


def mean_over_devices(tree):
  """pmean over 'data'; on a single device the collective would only add copies."""
  if jax.lax.axis_size(AXIS) == 1:
    return tree
  return jax.lax.pmean(tree, AXIS)


def _step_inputs(state: TrainState, frozen: Any) -> tuple[jax.Array, Any, Any]:
  """(this step's dropout key on this device, trainable parameters, fixed parameters).

  Dropout differs per step and per device, yet is a pure function of (seed, step); `frozen`
  (None: nothing frozen) splits the parameters as `optim.split_trainable` does.
  """
  dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                   jax.lax.axis_index(AXIS))
  if frozen is None:
    return dropout_rng, state.params, {}
  return (dropout_rng, *optim.split_trainable(state.params, frozen))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, loss_kind: str,
               schedule: optax.Schedule | None = None,
               frozen: Any = None, ctc_weight: float = 0.0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's slice of the global batch.

  `ctc_weight` > 0 adds that multiple of the auxiliary CTC loss of the speech tower's
  per-frame logits against the batch's `ctc_labels` (losses.ctc_loss).

  `frozen` (a tree of Python bools like the parameters; None: nothing frozen) splits the
  parameters: only the trainable ones are differentiated, clipped, updated and counted in
  `train/grad_norm`; `tx` and `state.opt_state` cover the trainable subtree alone.

  No NaN or infinity ever reaches the model: a step with a non-finite loss leaves parameters
  and BatchNorm statistics unchanged (the optimizer sees a zero gradient, so its moment
  estimates decay by one step), non-finite gradient elements are zeroed, and every step with
  a non-finite loss or gradient is counted in `nonfinite_steps`.
  """
  dropout_rng, trainable, fixed = _step_inputs(state, frozen)

  def loss_fn(trainable):
    params = optim.merge_params(trainable, fixed) if frozen is not None else trainable
    variables = {"params": params, "batch_stats": state.batch_stats}
    (zspeech, ztext, out), updates = model.apply(
        variables, batch, train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    contrastive = losses.contrastive_loss(loss_kind, zspeech, ztext, out, axis_name=AXIS)
    parts = {"contrastive": contrastive}
    loss = contrastive
    if ctc_weight:
      parts["ctc"] = losses.ctc_loss(out["ctc/logits"], out["ssl/frame_mask"],
                                     batch["ctc_labels"], batch["ctc_label_mask"])
      loss = loss + ctc_weight * parts["ctc"]
    return loss, (updates["batch_stats"], out, parts)

  (loss, (batch_stats, out, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      trainable)
  return apply_gradients(state, trainable, fixed, grads, loss, batch_stats, out, tx=tx,
                         schedule=schedule, frozen=frozen,
                         loss_parts=parts if ctc_weight else None)


def accumulated_train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
                           tx: optax.GradientTransformation, loss_kind: str,
                           accumulation_steps: int, schedule: optax.Schedule | None = None,
                           frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` over `accumulation_steps` micro-batches, one of them in memory at a time.

  Each device cuts its rows into K consecutive micro-batches and runs GradCache
  (chunked_losses.grad_cache_value_and_grad): the contrastive loss still scores every pair of
  the whole global batch, so in-batch negatives do not shrink with K; activations are held
  for one micro-batch; the cost is one extra forward pass per micro-batch.

  What differs from `train_step` over the same global batch, because of BatchNorm (the
  fusion encoder has it) and dropout:
  - training-mode BatchNorm normalises each micro-batch (its rows on every device, B / K
    rows) with that micro-batch's statistics, not the whole batch's, so embeddings, loss and
    gradients are those of K smaller BatchNorm batches (equal to the plain step only when
    K = 1, or with BatchNorm in evaluation mode);
  - the running statistics take one momentum update per step towards the mean of the K
    micro-batches' statistics: the mean is the whole batch's mean, the variance misses the
    spread between micro-batch means;
  - micro-batch k draws its dropout masks from fold_in(step key, k), the same key in both
    GradCache passes, so they differ from the plain step's masks.
  The result equals plain back-propagation through that same computation (tested), holding
  every micro-batch's activations at once.
  """
  dropout_rng, trainable, fixed = _step_inputs(state, frozen)
  merge = (lambda t: optim.merge_params(t, fixed)) if frozen is not None else (lambda t: t)
  micro_batches = {
      "batch": jax.tree.map(lambda x: x.reshape((accumulation_steps, -1) + x.shape[1:]), batch),
      "rng": jax.vmap(lambda k: jax.random.fold_in(dropout_rng, k))(
          jnp.arange(accumulation_steps)),
  }

  def embed(trainable, micro_batch):
    variables = {"params": merge(trainable), "batch_stats": state.batch_stats}
    (zspeech, ztext, out), updates = model.apply(
        variables, micro_batch["batch"], train=True, rngs={"dropout": micro_batch["rng"]},
        mutable=["batch_stats"])
    return zspeech, ztext, (updates["batch_stats"], out["speech/norm"])

  def loss_fn(trainable, zspeech, ztext):
    scale, bias = model.apply({"params": merge(trainable)}, method="scale_and_bias")
    return losses.contrastive_loss(loss_kind, zspeech, ztext, {"scale": scale, "bias": bias},
                                   axis_name=AXIS)

  (loss, (batch_stats, speech_norm)), grads = chunked_losses.grad_cache_value_and_grad(
      embed, loss_fn, trainable, micro_batches, has_aux=True)
  scale, _ = model.apply({"params": merge(trainable)}, method="scale_and_bias")
  out = {"scale": scale, "speech/norm": jnp.mean(speech_norm)}
  return apply_gradients(state, trainable, fixed, grads, loss,
                         jax.tree.map(lambda s: jnp.mean(s, axis=0), batch_stats), out, tx=tx,
                         schedule=schedule, frozen=frozen)


def apply_gradients(state: TrainState, trainable: Any, fixed: Any, grads: Any, loss: jax.Array,
                    batch_stats: Any, out: dict[str, jax.Array], *,
                    tx: optax.GradientTransformation, schedule: optax.Schedule | None,
                    frozen: Any, loss_parts: dict[str, jax.Array] | None = None
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """The update of `train_step` from this device's loss and gradients (its non-finite
  guards, documented there), and the step's metrics (`loss_parts`, the terms of a loss made
  of several, logged as train/<name>_loss)."""
  grads, loss, loss_parts = mean_over_devices((grads, loss, loss_parts or {}))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # The guards are elementwise selects on a scalar known before the backward pass (the loss)
  # or on each element itself, so XLA fuses them into the optimizer's loops. Gating on the
  # gradient norm instead forces every gradient to be stored and re-read (1.7x slower on CPU).
  loss_finite = jnp.isfinite(loss)
  sanitize = lambda tree: jax.tree.map(
      lambda x: jnp.where(loss_finite & jnp.isfinite(x), x, 0.0), tree)
  updates, opt_state = tx.update(sanitize(grads), state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, sanitize(updates))
  new_state = state.replace(
      step=state.step + 1,
      params=optim.merge_params(trainable, fixed) if frozen is not None else trainable,
      batch_stats=jax.tree.map(lambda n, o: jnp.where(loss_finite, n, o), batch_stats,
                               state.batch_stats),
      opt_state=opt_state,
      nonfinite_steps=jnp.where(finite, 0, state.nonfinite_steps + 1),
  )
  metrics = {
      "train/loss": loss,
      "train/grad_norm": grad_norm,
      "train/logit_scale": out["scale"],
      "train/speech_norm": mean_over_devices(out["speech/norm"]),
  }
  metrics.update({f"train/{name}_loss": value for name, value in loss_parts.items()})
  if schedule is not None:
    metrics["train/learning_rate"] = schedule(state.step)
  return new_state, metrics


def eval_loss_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
                   loss_kind: str) -> jax.Array:
  """The loss of one global batch in evaluation mode (running BatchNorm statistics)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  zspeech, ztext, out = model.apply(variables, batch, train=False)
  loss = losses.contrastive_loss(loss_kind, zspeech, ztext, out, axis_name=AXIS)
  return mean_over_devices(loss)


def embed_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module
               ) -> tuple[jax.Array, jax.Array]:
  """Normalised (zspeech, ztext) of a batch in evaluation mode; no collectives needed."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  zspeech, ztext, _ = model.apply(variables, batch, train=False)
  return zspeech, ztext


def shard_over_mesh(per_device_fn: Callable, mesh: Mesh, *, batch_out: bool = False,
                    donate_state: bool = False) -> Callable:
  """jit(shard_map(fn)) with the state replicated and the batch split over 'data'.

  `check_vma=False` keeps pmap's semantics: gradients are per device until `pmean`.
  """
  out_specs = P(AXIS) if batch_out else P()
  mapped = jax.shard_map(per_device_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=out_specs,
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())
