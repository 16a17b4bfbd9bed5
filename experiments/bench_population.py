"""Wall time of training a population of random NAS-Bench-201 (or MBConv) networks in JAX.

Trains ``--population`` random architectures of ``--space`` (BN, SGD momentum +
weight decay, cosine LR) for ``--steps`` steps each on Fashion-MNIST (or random
data of the same shape when it is not installed), then scores them on a
validation split. ``--space=nb201``: NAS-Bench-201 cells in a network of
``--channels`` and ``--cells``; ``--space=mbconv``: the MBConv macro space
(``jaxnas.spaces.mbconv``), whose layout is fixed (no ``--channels``/``--cells``).

  python experiments/bench_population.py --population=16 --steps=50 --channels=16 \
      --cells=1 --batch=128 --image=28 --in_channels=1 [--plan=map|vmap|sequential|...]
  python experiments/bench_population.py --space=mbconv --population=16 --steps=50 \
      --batch=128 --image=28 --in_channels=1

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
``candidate_steps_per_s`` is null).

``step_memory_mb`` is XLA's buffer assignment (``memory_analysis()``) of the
compiled program(s) that ``compile_s`` times: the scratch (temp) bytes, which
hold a member's parameters, optimizer state, BN statistics and the activations
and gradients of its training step (arguments, i.e. the dataset, not counted;
buffers of library calls such as oneDNN's not seen). Under ``map`` that is the
population program per device, which trains one member at a time with the
arch-as-data network (every member the same buffers: the widest); under
``vmap`` the whole population at once; under ``sequential`` one member's
program; under ``sequential_static`` the largest of the specialised members'
programs. Null with ``--no_compile_timing``. The LAST line printed is a JSON
object.
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
from jaxnas.models.registry import model_of  # noqa: E402


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


def population(args, space):
  """``args.population`` uniform architectures of ``space`` (canonical: inactive choices 0),
  batched; torch_peer_population.py draws the same ones."""
  keys = jax.random.split(jax.random.PRNGKey(args.seed), args.population)
  return jax.vmap(lambda k: space.from_vector(space.canonical(space.sample_vector(k))))(keys)


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


def time_compile(config, archs, key, data, population):
  """Seconds to compile, on a fresh trace, the program(s) ``config.plan`` runs, and the
  compiled programs (for their ``memory_analysis``)."""
  t = time.perf_counter()
  data_key, init_key = jax.random.split(key)
  keys = jax.random.split(init_key, population)
  scales = jnp.ones(population, jnp.float32)
  member = lambda p: jax.tree.map(lambda a: a[p], archs)
  compiled = []
  if config.plan in ("map", "vmap"):
    devices = jax.local_device_count()
    if config.plan == "map" and devices > 1:  # the padded, balanced order it runs in
      order = train_lib.device_layout(archs, config, devices)[0]
      archs, keys, scales = jax.tree.map(lambda a: a[order], (archs, keys, scales))
    train_lib._compiled.cache_clear()
    compiled.append(train_lib._compiled(config, config.plan).lower(
        archs, keys, data_key, data, scales).compile())
  elif config.plan == "sequential":
    train_lib._compiled.cache_clear()
    compiled.append(train_lib._compiled(config, "sequential").lower(
        member(0), keys[0], data_key, data, scales[0]).compile())
  else:
    model, seen = model_of(config), set()
    for p in range(population):
      fixed = model.static(member(p))
      if fixed not in seen:
        seen.add(fixed)
        compiled.append(jax.jit(train_lib.make_train(config, fixed)).lower(
            member(p), keys[p], data_key, data, scales[p]).compile())
  return time.perf_counter() - t, compiled


def step_memory_mb(compiled) -> float | None:
  """The largest scratch (temp) allocation of ``compiled``'s programs, MB (None: the
  backend does not say)."""
  temps = []
  for c in compiled:
    try:
      stats = c.memory_analysis()
    except Exception:  # a backend without buffer statistics
      stats = None
    if stats is not None:
      temps.append(stats.temp_size_in_bytes)
  return round(max(temps) / 2**20, 1) if temps else None


STEP_MEMORY_WHAT = {
    "map": "XLA temp bytes of the population program per device (one member at a time, "
           "arch-as-data: the widest network's buffers)",
    "vmap": "XLA temp bytes of the population program (every member at once)",
    "sequential": "XLA temp bytes of one member's program (arch-as-data: the widest "
                  "network's buffers)",
    "sequential_static": "XLA temp bytes of the largest specialised member's program",
}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--space", default="nb201", choices=("nb201", "mbconv"))
  p.add_argument("--population", type=int, default=16)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--channels", type=int, default=None, help="nb201 only (default 16)")
  p.add_argument("--cells", type=int, default=None, help="nb201 only (default 1)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--in_channels", type=int, default=1)
  p.add_argument("--plan", default="auto", help="auto, " + ", ".join(train_lib.PLANS))
  p.add_argument("--op_impl", default="auto", help="auto, switch, onehot, kernel")
  p.add_argument("--map_batch", type=int, default=1)
  p.add_argument("--width_impl", default="mask", help="mask, switch (models with widths)")
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
  p.add_argument("--scan_cells", action="store_true",
                 help="--cells > 1: each stage's cells as one nn.scan over stacked variables "
                 "(TrainConfig.scan_cells) instead of unrolled")
  p.add_argument("--no_steady", action="store_true", help="skip the steady-state second call")
  p.add_argument("--short_steps", type=int, default=-1,
                 help="steps of the shorter steady-state run that times the training steps "
                 "apart from init and evaluation (-1: steps // 5; 0: skip it and its compile)")
  p.add_argument("--no_compile_timing", action="store_true",
                 help="skip the fresh compile that times compile_s (sequential_static compiles "
                 "one program per distinct cell)")
  args = p.parse_args()
  if args.space == "mbconv" and (args.channels is not None or args.cells is not None):
    p.error("--channels/--cells apply to --space=nb201 only (the MBConv layout is fixed)")
  if args.space == "nb201":
    args.channels = 16 if args.channels is None else args.channels
    args.cells = 1 if args.cells is None else args.cells
  cpu_devices = setup_cpu_devices(args.cpu_devices)

  source, arrays = load_data(args)
  data = train_lib.make_data(*arrays)
  sizes = {} if args.space == "mbconv" else {"channels": args.channels, "cells": args.cells}
  config = train_lib.resolve_plan(train_lib.TrainConfig(
      steps=args.steps, batch_size=args.batch, num_classes=10, plan=args.plan,
      op_impl=args.op_impl, map_batch=args.map_batch, space=args.space,
      execution=ops.Execution(args.conv_impl, args.pool_impl),
      scan_cells=args.scan_cells, width_impl=args.width_impl, **sizes))
  archs = population(args, model_of(config).space)
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

  compile_s = memory = None
  if not args.no_compile_timing:
    seconds, compiled = time_compile(config, archs, key, data, args.population)
    compile_s, memory = round(seconds, 3), step_memory_mb(compiled)

  steps_total = args.population * args.steps
  out = {
      "framework": "jax", "jax": jax.__version__, "backend": jax.default_backend(),
      "space": args.space, "plan": config.plan, "op_impl": config.op_impl,
      "map_batch": args.map_batch, "width_impl": config.width_impl,
      "conv_impl": config.execution.conv, "pool_impl": config.execution.pool,
      "devices": jax.local_device_count(), "cpu_devices_flag": cpu_devices,
      "data": source, "population": args.population, "steps": args.steps,
      "channels": args.channels, "cells": args.cells,
      "scan_cells": bool(args.space == "nb201" and args.cells > 1 and args.scan_cells),
      "batch": args.batch, "image": args.image,
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
      "step_memory_mb": memory,
      "step_memory_what": STEP_MEMORY_WHAT[config.plan] if memory is not None else None,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
