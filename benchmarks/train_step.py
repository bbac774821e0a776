"""Training-step throughput.

--mode=features (default): steps/s of the paper's fusion encoder training step, JAX (this
project) vs eager PyTorch. Both train the concat fusion encoder (1024-d speech + 1000-d
spectrogram features -> 768-d) with the symmetric InfoNCE loss, Adam, batch 32, on this
machine's CPU, in one process:

  python benchmarks/train_step.py [--steps=200] [--batch_size=32] [--threads=N]

--mode=audio: examples/s and model FLOP utilisation (MFU) of the audio-mode step (waveforms
through the SSL encoder and the spectrogram CNN, fusion, InfoNCE, Adam; text embeddings
precomputed) on the first device. The step's FLOPs are XLA's cost analysis of the compiled
step; the peak is measured in the same run by a large float32 (or --dtype) matmul on the same
device, so MFU = step FLOPs x steps/s / measured peak:

  python benchmarks/train_step.py --mode=audio [--size=small|tiny] [--batch_size=8] \
      [--seconds=2] [--dtype=float32|bfloat16] [--steps=10]
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


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per computation.
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))


def peak_flops_per_second(dtype: str, size: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of a jitted (size x size) @ (size x size) matmul on the first device: the
  attainable peak that MFU divides by, measured rather than read off a data sheet."""
  import jax
  import jax.numpy as jnp

  device = jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  b = jax.device_put(jnp.ones((size, size), dtype), device)
  chain = jax.jit(lambda a, b: a @ b * (1.0 / size))  # (n, n) @ (n, n) -> (n, n)
  out = chain(a, b).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = chain(out, b)
  out.block_until_ready()
  return 2.0 * size ** 3 * repeats / (time.perf_counter() - start)


def audio_step_throughput(size: str, batch_size: int, seconds: float, dtype: str,
                          steps: int) -> dict:
  """Examples/s, FLOPs per step and the compile time of the audio-mode train step."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from clasp_jax.models import clasp
  from clasp_jax.trainer import optim, state as state_lib, steps as step_lib
  from configs import base

  config = base.get_config("speech=audio" + (",tiny" if size == "tiny" else ""))
  config.model.dtype = dtype
  config.model.embed_dim = config.data.dims.text
  config.optimizer.name, config.schedule.kind = "adam", "constant"
  rng = np.random.default_rng(0)
  samples = int(seconds * 16000)
  batch = {"audio": (0.1 * rng.standard_normal((batch_size, samples))).astype(np.float32),
           "audio_mask": np.ones((batch_size, samples), bool),
           "text": rng.standard_normal((batch_size, config.data.dims.text)).astype(np.float32)}
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  built = clasp.build(config, axis_name="data")
  state, tx, frozen = state_lib.create_train_state(
      built.model, batch, seed=0, mesh=mesh, pretrained=built.pretrained,
      frozen_pattern=functools.partial(optim.frozen_pattern, config),
      make_optimizer=lambda params: optim.make_optimizer(config, params, total_steps=steps,
                                                         steps_per_epoch=1)[0])
  train_fn = step_lib.shard_over_mesh(
      functools.partial(step_lib.train_step, model=built.model, tx=tx, loss_kind="softmax",
                        frozen=frozen), mesh, donate_state=True)
  global_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  start = time.perf_counter()
  compiled = train_fn.lower(state, global_batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, global_batch)  # Warm-up.
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, global_batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  parameters = sum(x.size for x in jax.tree.leaves(state.params))
  return {"examples_per_s": batch_size / step_s, "step_s": step_s,
          "flops_per_step": _flops(compiled), "compile_s": compile_s,
          "parameters": parameters, "device": jax.devices()[0].device_kind}


def run_audio(args) -> None:
  result = audio_step_throughput(args.size, args.batch_size, args.seconds, args.dtype,
                                 args.steps)
  peak = peak_flops_per_second(args.dtype)
  achieved = result["flops_per_step"] / result["step_s"]
  print(f"audio-mode train step ({args.size} towers, {result['parameters']:,} parameters), "
        f"batch {args.batch_size} x {args.seconds:g} s, {args.dtype}, "
        f"{result['device']} ({os.cpu_count()} cores visible)")
  print(f"  compile                 : {result['compile_s']:8.1f} s")
  print(f"  step                    : {result['step_s'] * 1e3:8.1f} ms")
  print(f"  examples/s              : {result['examples_per_s']:8.2f}")
  print(f"  FLOPs per step (XLA)    : {result['flops_per_step'] / 1e9:8.2f} GFLOP")
  print(f"  achieved                : {achieved / 1e9:8.2f} GFLOP/s")
  print(f"  peak (measured matmul)  : {peak / 1e9:8.2f} GFLOP/s")
  print(f"  MFU                     : {100 * achieved / peak:8.1f} %")


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
  parser.add_argument("--mode", choices=("features", "audio"), default="features")
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps (default: 200 features, 10 audio)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="default: 32 features, 8 audio")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="PyTorch intra-op threads (JAX uses every core).")
  parser.add_argument("--size", choices=("small", "tiny"), default="small",
                      help="audio: configs/base.py speech=audio towers (4-layer 256-wide "
                      "HuBERT, 0.5x CNN) or the tiny test ones")
  parser.add_argument("--seconds", type=float, default=2.0, help="audio: clip length")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="audio: tower compute dtype (config.model.dtype)")
  args = parser.parse_args()
  for name in ("steps", "batch_size"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.mode == "audio":
    args.steps = args.steps or 10
    args.batch_size = args.batch_size or 8
    if args.seconds <= 0:
      parser.error("--seconds must be positive")
    run_audio(args)
    return
  args.steps = args.steps or 200
  args.batch_size = args.batch_size or 32
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
