"""Wall time of training a population of random NAS-Bench-201 networks in JAX.

Trains ``--population`` random cells (BN, SGD momentum + weight decay, cosine
LR) for ``--steps`` steps each on Fashion-MNIST (or random data of the same
shape when it is not installed), then scores them on a validation split.

  python experiments/bench_population.py --population=16 --steps=50 --channels=16 \
      --cells=1 --batch=128 --image=28 --in_channels=1 [--plan=map|vmap|sequential|...]

On CPU it exposes one single-threaded XLA device per core (``--cpu_devices``)
and the ``map`` plan runs a slice of the population on each.

``end_to_end_s`` counts everything from nothing (process start after imports:
data loading, compilation, training, validation) to all members scored;
``compile_s`` is the lowering+compilation time, measured separately with
``jit(...).lower(...).compile()`` in the same process (null with
``--no_compile_timing``). ``steady_s`` is a second, already-compiled call, which
initialises, trains and scores every member:
``candidate_steps_per_s_incl_init_eval`` is population x steps / ``steady_s``
(what ``candidate_steps_per_s`` measured until it was split in two: the
candidate-steps/s of earlier notes and results). The population program
is one XLA program, so its training steps are timed apart from initialisation
and evaluation by difference: the same population with ``--short_steps`` steps
(default steps / 5; its own compile, not timed), ``short_steady_s``, gives
``candidate_steps_per_s`` = population x (steps - short_steps) /
(``steady_s`` - ``short_steady_s``), training steps only (as in
torch_peer_population.py), and ``init_eval_s``, the rest of a steady call
(initialisation, evaluation, dispatch). ``--short_steps=0`` skips it (then
``candidate_steps_per_s`` is null). The LAST line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnas.datasets import DatasetError, load_fashion_mnist, train_val_split  # noqa: E402
from jaxnas import ops  # noqa: E402
from jaxnas.models import train as train_lib  # noqa: E402
from jaxnas.spaces import nb201_space  # noqa: E402


def load_data(args):
  """Fashion-MNIST if installed and the shape matches, else random uint8 data of that shape."""
  if args.image == 28 and args.in_channels == 1 and not args.random_data:
    try:
      ds = load_fashion_mnist(args.data_dir)
      tx, ty, vx, vy = train_val_split(ds.train_images, ds.train_labels, args.val_fraction,
                                       seed=args.seed)
      return "fashion_mnist", (tx, ty, vx[:args.val_examples], vy[:args.val_examples], ds.mean,
                               ds.std)
    except DatasetError as e:
      print(f"Fashion-MNIST unavailable ({e}); using random data", file=sys.stderr)
  rng = np.random.default_rng(args.seed)
  shape = (args.image, args.image, args.in_channels)
  tx = rng.integers(0, 256, (10000,) + shape, dtype=np.uint8)
  ty = rng.integers(0, 10, 10000).astype(np.int32)
  vx = rng.integers(0, 256, (args.val_examples,) + shape, dtype=np.uint8)
  vy = rng.integers(0, 10, args.val_examples).astype(np.int32)
  return "random", (tx, ty, vx, vy, (0.5,) * args.in_channels, (0.25,) * args.in_channels)


def population(args):
  space = nb201_space()
  keys = jax.random.split(jax.random.PRNGKey(args.seed), args.population)
  return jax.vmap(space.sample)(keys)


def setup_cpu_devices(n: int) -> int:
  """One single-threaded CPU device per core, before the backend starts.

  XLA:CPU's intra-op threads help little for these small convs and much of a
  step is small elementwise work (NOTES_population.md); members are
  independent, so running one slice of the population per core is the better
  use of the cores, and the ``map`` plan shards over local devices.
  """
  n = n or os.cpu_count() or 1
  if n > 1:
    jax.config.update("jax_num_cpu_devices", n)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
  return n


def time_compile(config, archs, key, data, population) -> float:
  """Seconds to compile, on a fresh trace, the program(s) ``config.plan`` runs."""
  t = time.perf_counter()
  data_key, init_key = jax.random.split(key)
  keys = jax.random.split(init_key, population)
  scales = jnp.ones(population, jnp.float32)
  if config.plan in ("map", "vmap"):
    train_lib._compiled.cache_clear()
    train_lib._compiled(config, config.plan).lower(archs, keys, data_key, data, scales).compile()
  elif config.plan == "sequential":
    train_lib._compiled.cache_clear()
    train_lib._compiled(config, "sequential").lower(archs[0], keys[0], data_key, data,
                                                    scales[0]).compile()
  else:
    seen = set()
    for a in np.asarray(archs):
      fixed = tuple(int(o) for o in a)
      if fixed not in seen:
        seen.add(fixed)
        jax.jit(train_lib.make_train(config, fixed)).lower(archs[0], keys[0], data_key, data,
                                                           scales[0]).compile()
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--population", type=int, default=16)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--channels", type=int, default=16)
  p.add_argument("--cells", type=int, default=1)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--in_channels", type=int, default=1)
  p.add_argument("--plan", default="auto", help="auto, " + ", ".join(train_lib.PLANS))
  p.add_argument("--op_impl", default="auto", help="auto, switch, onehot, kernel")
  p.add_argument("--map_batch", type=int, default=1)
  p.add_argument("--conv_impl", default="auto",
                 help="auto (per backend), " + ", ".join(ops.CONV_IMPLS))
  p.add_argument("--pool_impl", default="auto",
                 help="auto (per backend), " + ", ".join(ops.POOL_IMPLS))
  p.add_argument("--val_examples", type=int, default=1000)
  p.add_argument("--val_fraction", type=float, default=1 / 12)
  p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
  p.add_argument("--random_data", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="CPU backend: expose this many single-threaded CPU devices and shard the "
                 "population over them (0: one per core; 1: one multi-threaded device)")
  p.add_argument("--no_steady", action="store_true", help="skip the steady-state second call")
  p.add_argument("--short_steps", type=int, default=-1,
                 help="steps of the shorter steady-state run that times the training steps "
                 "apart from init and evaluation (-1: steps // 5; 0: skip it and its compile)")
  p.add_argument("--no_compile_timing", action="store_true",
                 help="skip the fresh compile that times compile_s (sequential_static compiles "
                 "one program per distinct cell)")
  args = p.parse_args()
  cpu_devices = setup_cpu_devices(args.cpu_devices)

  source, arrays = load_data(args)
  data = train_lib.make_data(*arrays)
  archs = population(args)
  config = train_lib.resolve_plan(train_lib.TrainConfig(
      steps=args.steps, batch_size=args.batch, channels=args.channels, cells=args.cells,
      num_classes=10, plan=args.plan, op_impl=args.op_impl, map_batch=args.map_batch,
      execution=ops.Execution(args.conv_impl, args.pool_impl)))
  key = jax.random.PRNGKey(args.seed + 1)

  metrics = train_lib.train_population_metrics(archs, key, data, config)
  acc = np.asarray(jax.block_until_ready(metrics["val_accuracy"]))
  end_to_end = time.perf_counter() - T_START
  print(f"end_to_end_s {end_to_end:.3f} (steady state and compile_s follow)", file=sys.stderr,
        flush=True)

  # Steady state: the same call again, every program already compiled.
  steady = float("nan")
  if not args.no_steady:
    t = time.perf_counter()
    jax.block_until_ready(train_lib.train_population(archs, key, data, config))
    steady = time.perf_counter() - t

  # The training steps alone: init and evaluation are the same work at any step count,
  # so the steady-state difference to a shorter run is (steps - short) steps' time.
  short = args.steps // 5 if args.short_steps < 0 else args.short_steps
  short_steady = float("nan")
  if steady == steady and 0 < short < args.steps:
    short_config = config._replace(steps=short)
    jax.block_until_ready(train_lib.train_population(archs, key, data, short_config))
    t = time.perf_counter()
    jax.block_until_ready(train_lib.train_population(archs, key, data, short_config))
    short_steady = time.perf_counter() - t
  else:
    short = 0
  step_s = (steady - short_steady) / (args.steps - short) if short else float("nan")
  if not step_s > 0:  # timing noise larger than the steps' time: no estimate
    step_s = float("nan")

  compile_s = (None if args.no_compile_timing else
               round(time_compile(config, archs, key, data, args.population), 3))

  steps_total = args.population * args.steps
  out = {
      "framework": "jax", "jax": jax.__version__, "backend": jax.default_backend(),
      "plan": config.plan, "op_impl": config.op_impl, "map_batch": args.map_batch,
      "conv_impl": config.execution.conv, "pool_impl": config.execution.pool,
      "devices": jax.local_device_count(), "cpu_devices_flag": cpu_devices,
      "data": source, "population": args.population, "steps": args.steps,
      "channels": args.channels, "cells": args.cells, "batch": args.batch, "image": args.image,
      "end_to_end_s": round(end_to_end, 3), "compile_s": compile_s,
      "steady_s": round(steady, 3),
      "short_steps": short,
      "short_steady_s": round(short_steady, 3) if short_steady == short_steady else None,
      "candidate_steps_per_s": (round(args.population / step_s, 2) if step_s == step_s
                                else None),
      "init_eval_s": round(steady - args.steps * step_s, 3) if step_s == step_s else None,
      "candidate_steps_per_s_incl_init_eval": (round(steps_total / steady, 2)
                                               if steady == steady else None),
      "end_to_end_candidate_steps_per_s": round(steps_total / end_to_end, 2),
      "val_accuracy_mean": float(np.nanmean(acc)), "failed": int(np.isnan(acc).sum()),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
