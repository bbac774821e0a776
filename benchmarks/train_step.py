"""Steps/s of the paper's fusion encoder training step: JAX (this project) vs eager PyTorch.

Both train the concat fusion encoder (1024-d speech + 1000-d spectrogram features -> 768-d)
with the symmetric InfoNCE loss, Adam, batch 32, on this machine's CPU, in one process:

  python benchmarks/train_step.py [--steps=200] [--batch_size=32] [--threads=N]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import numpy as np


def jax_steps_per_second(batch: dict, steps: int) -> float:
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from clasp_jax.models import clasp
  from clasp_jax.trainer import optim, state as state_lib, steps as step_lib
  from configs import base

  config = base.get_config("synthetic")  # The full-size fusion encoder on feature vectors.
  config.optimizer.name, config.optimizer.grad_clip_norm = "adam", 0.0
  config.schedule.kind = "constant"
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  model = clasp.build(config, axis_name="data").model
  state, tx, _ = state_lib.create_train_state(
      model, {k: v[:2] for k, v in batch.items()}, seed=0, mesh=mesh, frozen_pattern="",
      make_optimizer=lambda params: optim.make_optimizer(config, params, total_steps=steps,
                                                         steps_per_epoch=1)[0])
  train_fn = step_lib.shard_over_mesh(
      functools.partial(step_lib.train_step, model=model, tx=tx, loss_kind="softmax"), mesh,
      donate_state=True)
  global_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  for _ in range(5):  # Compile and warm up.
    state, metrics = train_fn(state, global_batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = train_fn(state, global_batch)
  jax.block_until_ready(metrics)
  return steps / (time.perf_counter() - start)


def torch_steps_per_second(batch: dict, steps: int) -> float:
  import torch
  import torch.nn.functional as F

  from tests.helpers.torch_fusion import ConcatFusion

  torch.manual_seed(0)
  model = ConcatFusion(batch["speech"].shape[1], batch["spectrogram"].shape[1]).train()
  log_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
  optimizer = torch.optim.Adam(list(model.parameters()) + [log_scale], lr=1e-3)
  speech, spectrogram, text = (torch.from_numpy(batch[k]) for k in ("speech", "spectrogram",
                                                                    "text"))
  labels = torch.arange(len(text))

  def step():
    zspeech = F.normalize(model(speech, spectrogram), dim=-1)
    ztext = F.normalize(text, dim=-1)
    logits = log_scale.exp().clamp(max=100) * zspeech @ ztext.T
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  for _ in range(5):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="PyTorch intra-op threads (JAX uses every core).")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(args.threads)

  rng = np.random.default_rng(0)
  batch = {"speech": rng.standard_normal((args.batch_size, 1024)).astype(np.float32),
           "spectrogram": rng.standard_normal((args.batch_size, 1000)).astype(np.float32),
           "text": rng.standard_normal((args.batch_size, 768)).astype(np.float32)}
  jax_rate = jax_steps_per_second(batch, args.steps)
  torch_rate = torch_steps_per_second(batch, args.steps)
  print(f"fusion encoder train step, batch {args.batch_size}, Adam, {os.cpu_count()} CPU cores, "
        f"{allocator.loaded_allocator()} malloc")
  print(f"  JAX (jit, this project) : {jax_rate:8.1f} steps/s")
  print(f"  PyTorch eager           : {torch_rate:8.1f} steps/s")
  print(f"  ratio JAX / PyTorch     : {jax_rate / torch_rate:8.2f}x")


if __name__ == "__main__":
  import sys
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clasp_jax.common import allocator  # pylint: disable=g-import-not-at-top
  allocator.reexec_under_tcmalloc()
  main()
