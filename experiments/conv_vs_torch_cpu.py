"""One convolution's forward + backward on one CPU core: jaxnas' ``conv2d`` vs PyTorch.

  taskset -c 0 python experiments/conv_vs_torch_cpu.py [--impls=onednn,taps] [--reps=5]

The issue-3 benchmark's convolutions (batch 128, Fashion-MNIST-sized NB201
network at C=16): 3x3 stride 1 at each stage, the reduction blocks' stride-2
3x3s, a 1x1. Each case is ReLU -> conv, forward and both gradients. JAX runs
it as a training step does, inside a ``lax.scan`` (10 steps; XLA:CPU treats
loop bodies differently from the entry computation), one device with Eigen's
threads off, LLVM -O1 as ``train.CPU_COMPILER_OPTIONS``. PyTorch runs one
thread, channels_last (the memory format the peer,
torch_peer_population.py, gets from its permuted NHWC input). Prints one
JSON line per case: best-of-``--reps`` milliseconds per conv fwd + bwd.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name: (image size, input channels, output channels, stride, kernel size)
CASES = {"3x3_28x28x16": (28, 16, 16, 1, 3), "3x3_14x14x32": (14, 32, 32, 1, 3),
         "3x3_7x7x64": (7, 64, 64, 1, 3), "3x3_s2_16to32": (28, 16, 32, 2, 3),
         "3x3_s2_32to64": (14, 32, 64, 2, 3), "1x1_14x14x32": (14, 32, 32, 1, 1)}


def time_jax(case, impl, reps):
  import jax
  import jax.numpy as jnp
  from jaxnas.models import train
  from jaxnas.ops import conv2d
  h, ci, co, s, k = case
  ho = (h - 1) // s + 1
  x = jax.random.normal(jax.random.PRNGKey(0), (128, h, h, ci))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, ci, co)) * 0.1
  g = jax.random.normal(jax.random.PRNGKey(2), (128, ho, ho, co))

  def body(carry, _):
    xx, kk = carry
    f = lambda a, b: jnp.sum(conv2d(jax.nn.relu(a), b, s, impl=impl) * g)
    gx, gk = jax.grad(f, (0, 1))(xx, kk)
    return (xx + 1e-3 * gx, kk + 1e-3 * gk), None

  steps = 10
  fn = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps)[0],
               compiler_options=train.CPU_COMPILER_OPTIONS)
  jax.block_until_ready(fn((x, kernel)))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn((x, kernel)))
    best = min(best, time.perf_counter() - t)
  return best / steps * 1e3


def time_torch(case, reps):
  import torch
  torch.set_num_threads(1)
  h, ci, co, s, k = case
  ho = (h - 1) // s + 1
  conv = torch.nn.Conv2d(ci, co, k, s, k // 2, bias=False).to(memory_format=torch.channels_last)
  x = torch.randn(128, h, h, ci).permute(0, 3, 1, 2).detach().requires_grad_(True)
  g = torch.randn(128, ho, ho, co).permute(0, 3, 1, 2)
  for _ in range(3):
    conv(torch.relu(x)).backward(g)
  best = float("inf")
  for _ in range(reps * 2):
    t = time.perf_counter()
    conv(torch.relu(x)).backward(g)
    best = min(best, time.perf_counter() - t)
  return best * 1e3


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--impls", default="onednn,taps", help="jaxnas.ops.CONV_IMPLS, comma-separated")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no_torch", action="store_true")
  args = p.parse_args()
  import jax
  jax.config.update("jax_platforms", "cpu")
  for name, case in CASES.items():
    row = {"case": name}
    for impl in args.impls.split(","):
      row[f"jax_{impl}_ms"] = round(time_jax(case, impl, args.reps), 2)
    if not args.no_torch:
      row["torch_channels_last_ms"] = round(time_torch(case, args.reps), 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
