"""Wall and CPU time per candidate-step of population training, per plan, on CPU.

  python experiments/bench_step_cpu.py --plans=map,sequential_static --population=2 \
      --steps=10 --devices=1

A finer instrument than bench_population.py for comparing implementations of
the step: each plan trains the first ``--population`` members of the
benchmark population (random Fashion-MNIST-shaped data, batch 128, C=16, N=1)
for ``--steps`` steps, once to compile, then ``--repeats`` times; it prints
the best wall and process-CPU milliseconds per candidate-step, the CPU
utilisation (threads busy) and the compile time (first call minus the best
repeat). Process CPU time is what another job on the same
cores distorts least. ``--devices`` XLA CPU devices with Eigen's intra-op
threads off (as bench_population.py runs them); XLA:CPU still runs independent
ops of a program concurrently, so one device shows a utilisation of ~1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--plans", default="map,sequential_static")
  p.add_argument("--population", type=int, default=2)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--arch", default="", help="one cell for every member, e.g. 222222 (all 1x1)")
  p.add_argument("--conv_impl", default="auto", help="jaxnas.ops.CONV_IMPLS, or auto")
  args = p.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false").strip()
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp
  import numpy as np
  from jaxnas.models import train as train_lib
  from jaxnas.ops import Execution
  from jaxnas.spaces import nb201_space

  rng = np.random.default_rng(0)
  tx = rng.integers(0, 256, (5000, 28, 28, 1), dtype=np.uint8)
  ty = rng.integers(0, 10, 5000).astype(np.int32)
  data = train_lib.make_data(tx, ty, tx[:500], ty[:500], (0.3,), (0.3,))
  archs = jax.vmap(nb201_space().sample)(jax.random.split(jax.random.PRNGKey(0), 16))
  archs = archs[:args.population]
  if args.arch:
    archs = jnp.asarray([[int(c) for c in args.arch]] * args.population, jnp.int32)
  n = args.population * args.steps
  for plan in args.plans.split(","):
    config = train_lib.resolve_plan(train_lib.TrainConfig(
        steps=args.steps, batch_size=128, channels=16, cells=1, eval_batch_size=500, plan=plan,
        execution=Execution(conv=args.conv_impl)))
    run = lambda: jax.block_until_ready(train_lib.train_population_metrics(
        archs, jax.random.PRNGKey(1), data, config))
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0  # compile + one run
    wall, cpu = [], []
    for _ in range(args.repeats):
      r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      run()
      t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
      wall.append(t1 - t0)
      cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    print(json.dumps({"plan": plan, "devices": jax.local_device_count(),
                      "population": args.population, "steps": args.steps,
                      "wall_ms_per_candidate_step": round(min(wall) / n * 1e3, 1),
                      "cpu_ms_per_candidate_step": round(min(cpu) / n * 1e3, 1),
                      "cpu_utilisation": round(sum(cpu) / sum(wall), 2),
                      "compile_s": round(first - min(wall), 1),
                      "load_average": open("/proc/loadavg").read().split()[0]}), flush=True)


if __name__ == "__main__":
  main()
