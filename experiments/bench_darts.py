"""DARTS search step time and peak memory, with and without rematerialisation.

  python experiments/bench_darts.py --space=darts --channels=16 --cells=8 --batch=64 --image=32

(First order runs the fused step, the supernet traced once, as the CLI does;
``--nofused`` the two-pass step.)

times one bilevel step (alpha on a validation batch, then the weights on a
training batch; ``--order=2`` adds the unrolled step and the exact
Hessian-vector product) of the DARTS supernet, for ``--remat=0,1``. Each
setting runs in its own process so its memory peak is its own. Per setting it
prints one JSON line, and as the last line a JSON list of all:

* ``ready_s``: from the start until the supernet's state exists and the step is
  compiled (what a search waits for before its first step);
* ``init_s``: tracing the supernet's init; with ``--noinit_beside`` tracing, compiling
  and running it;
* ``compile_s``: tracing + XLA compilation of the step. As the CLI does it
  (``darts_runner.initialising``), the init compiles and runs on a thread during the
  step's trace and compile (``--noinit_beside``: one after the other);
* ``step_s``: median wall time of ``--steps`` steps after one warm-up step;
* ``xla_temp_bytes``: the compiled step's scratch memory from XLA's memory
  analysis (activations kept for the backward pass live here), available on
  every backend; ``xla_arg_bytes`` the arguments (state + data);
* ``peak_bytes_in_use``: the device allocator's peak (GPU/TPU; absent on CPU);
* ``cpu_run_peak_bytes`` (CPU): the process's peak resident memory during the
  timed steps above its resident memory before them (freed heap returned to
  the OS first with ``malloc_trim``), sampled every 0.5 ms. XLA:CPU's
  ``temp_size`` is not a live-memory peak (it does not move with
  rematerialisation), so this is the CPU figure to compare.

Data are random uint8 images (timing and memory do not depend on content).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

T0 = time.perf_counter()
from absl import app, flags

flags.DEFINE_enum("space", "darts", ["darts", "nb201"], "Supernet space.")
flags.DEFINE_integer("channels", 16, "C of the supernet.")
flags.DEFINE_integer("cells", 8, "Cells (DARTS space: in all; NB201: per stage).")
flags.DEFINE_integer("batch", 64, "Minibatch size (each of the train and validation batches).")
flags.DEFINE_integer("image", 32, "Image side.")
flags.DEFINE_integer("in_channels", 3, "Image channels.")
flags.DEFINE_integer("order", 1, "DARTS order (1 or 2).")
flags.DEFINE_string("variant", "darts", "darts | gdas | darts-.")
flags.DEFINE_bool("fused", True, "First order: the fused step (supernet traced once, "
                  "DartsConfig.fused, the CLI's default); --nofused times the two-pass step.")
flags.DEFINE_bool("init_beside", True, "Compile and run the init on a thread while the step "
                  "compiles, as the CLI does (--noinit_beside: one after the other).")
flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
flags.DEFINE_string("remat", "0,1", "Comma-separated remat settings; each runs in its own process.")
flags.DEFINE_string("step_lock", "", "A file to hold an exclusive lock on while timing the "
                    "steps, so settings compiled side by side (one process each) are timed one "
                    "at a time.")
flags.DEFINE_bool("child", False, "Internal: run one setting in this process.")
FLAGS = flags.FLAGS


class _PeakRss:
  """Peak resident memory above the starting point, sampled on a thread."""

  def __init__(self):
    import ctypes
    import threading
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    self.base = self.peak = self._rss()
    self.running = True
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()

  @staticmethod
  def _rss():
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * 4096

  def _run(self):
    while self.running:
      self.peak = max(self.peak, self._rss())
      time.sleep(0.0005)

  def stop(self) -> int:
    self.running = False
    self.thread.join()
    return self.peak - self.base


def _progress(msg: str):
  """Partial results on stderr, so a run cut off by a timeout still says how far it got."""
  print(f"[bench_darts +{time.perf_counter() - T0:.1f} s] {msg}", file=sys.stderr, flush=True)


def run_one(remat: bool) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxnas.darts_runner import compile_once, initialising
  from jaxnas.strategies.darts import DartsConfig, DartsData, make_darts

  n = 4 * FLAGS.batch
  rng = np.random.default_rng(0)
  shape = (n, FLAGS.image, FLAGS.image, FLAGS.in_channels)
  data = DartsData(*jax.device_put((
      rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32),
      rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32),
      np.full(FLAGS.in_channels, 0.5, np.float32), np.full(FLAGS.in_channels, 0.25, np.float32))))
  config = DartsConfig(variant=FLAGS.variant, space=FLAGS.space, order=FLAGS.order,
                       epochs=1, steps_per_epoch=FLAGS.steps + 1, batch_size=FLAGS.batch,
                       channels=FLAGS.channels, cells=FLAGS.cells, remat=remat,
                       fused=FLAGS.fused)
  darts = make_darts(config)
  key = jax.random.PRNGKey(0)
  options = darts.supernet.compiler_options  # as the CLI does it
  step = jax.jit(darts.step, donate_argnums=0, compiler_options=options)
  start = time.perf_counter()
  if FLAGS.init_beside:  # as the CLI does it: the init compiles and runs on a thread
    with initialising(darts.init, key, data, options=options) as (shapes, initialised):
      init_s = time.perf_counter() - start
      _progress(f"init traced {init_s:.1f} s")
      t0 = time.perf_counter()
      compiled = step.lower(shapes, data).compile()
      compile_s = time.perf_counter() - t0
      state = jax.block_until_ready(initialised())
  else:
    state = jax.block_until_ready(compile_once(darts.init, key, data, options=options)(key, data))
    init_s = time.perf_counter() - start
    _progress(f"init {init_s:.1f} s")
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
  ready_s = time.perf_counter() - start
  _progress(f"compile {compile_s:.1f} s, ready {ready_s:.1f} s")
  mem = compiled.memory_analysis()
  lock = None
  if FLAGS.step_lock:
    import fcntl
    lock = open(FLAGS.step_lock, "a")
    t0 = time.perf_counter()
    fcntl.flock(lock, fcntl.LOCK_EX)
    _progress(f"step lock after {time.perf_counter() - t0:.1f} s")
  state, m = compiled(state, data)  # warm-up
  jax.block_until_ready(m)
  sampler = _PeakRss() if jax.default_backend() == "cpu" else None
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, data)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  if lock is not None:
    lock.close()  # releases the lock
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  out = {"space": FLAGS.space, "channels": FLAGS.channels, "cells": FLAGS.cells,
         "batch": FLAGS.batch, "image": FLAGS.image, "order": FLAGS.order,
         "variant": FLAGS.variant, "remat": remat, "fused": FLAGS.fused, "backend": jax.default_backend(),
         "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "compiler_options": options,
         "device": jax.devices()[0].device_kind, "supernet_params": n_params,
         "init_s": round(init_s, 2), "compile_s": round(compile_s, 2),
         "ready_s": round(ready_s, 2), "step_s": round(statistics.median(times), 4),
         "step_s_all": [round(t, 4) for t in times],
         "xla_temp_bytes": int(getattr(mem, "temp_size_in_bytes", -1)),
         "xla_arg_bytes": int(getattr(mem, "argument_size_in_bytes", -1)),
         "train_loss": float(m["train_loss"])}
  if sampler is not None:
    out["cpu_run_peak_bytes"] = sampler.stop()
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  if not np.isfinite(out["train_loss"]):
    raise SystemExit("non-finite loss")
  del jnp
  return out


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(run_one(FLAGS.remat == "1")))
    return
  results = []
  for r in FLAGS.remat.split(","):
    args = [a for a in sys.argv[1:] if not a.startswith("--remat")]
    # The child's stderr (progress lines, errors) passes straight through.
    proc = subprocess.run([sys.executable, __file__, *args, f"--remat={r}", "--child"],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
      sys.exit(f"remat={r} failed (exit {proc.returncode})")
    line = proc.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    results.append(json.loads(line))
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main)
