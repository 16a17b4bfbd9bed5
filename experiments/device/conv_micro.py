"""Forward + backward time of one population conv for each ``conv2d`` implementation.

  python experiments/device/conv_micro.py [--population=16 --batch=128 --image=28 --channels=16]

A population's conv is ``vmap(conv2d)`` over per-member inputs and kernels
(the ``vmap`` plan); ``--population=0`` times one unbatched member (the
sequential plan). Cases: 3x3 stride 1 (cell edges), 3x3 stride 2 to 2C (the
reduction block), 1x1. Prints one JSON line per (impl, case), median of
``--reps`` calls of the jitted value-and-grad of ``sum(conv * g)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from jaxnas import ops  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--population", type=int, default=16)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--channels", type=int, default=16)
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--impls", default=",".join(ops.CONV_IMPLS))
  args = p.parse_args()
  c, h, n, pop = args.channels, args.image, args.batch, args.population
  lead = (pop,) if pop else ()
  rng = np.random.default_rng(0)
  for k, stride, cout in [(3, 1, c), (3, 2, 2 * c), (1, 1, c)]:
    x = jnp.asarray(rng.standard_normal(lead + (n, h, h, c), np.float32))
    w = jnp.asarray(rng.standard_normal(lead + (k, k, c, cout), np.float32) * 0.1)
    for impl in args.impls.split(","):
      def loss(x, w, impl=impl):
        y = ops.conv2d(x, w, stride, impl=impl)
        return jnp.sum(y * y)
      f = jax.value_and_grad(loss, argnums=(0, 1))
      f = jax.jit(jax.vmap(f) if pop else f)
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, w))
      first = time.perf_counter() - t0
      times = []
      for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times.append(time.perf_counter() - t0)
      print(json.dumps({"impl": impl, "k": k, "stride": stride, "cin": c, "cout": cout,
                        "population": pop, "batch": n, "image": h,
                        "backend": jax.default_backend(), "compile_and_first_s": round(first, 3),
                        "median_ms": round(1e3 * statistics.median(times), 3)}), flush=True)


if __name__ == "__main__":
  main()
