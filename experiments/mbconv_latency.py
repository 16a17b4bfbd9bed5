"""How well does the MBConv latency lookup table predict measured whole-network latency?

  python experiments/mbconv_latency.py [--table_out=jaxnas/data/mbconv_latency_cpu.json]

For each ``--image_shapes`` (H x W x C): (a) measures the latency table of every distinct
MBConv part on the current backend (``jaxnas.models.latency.measure_table`` of
``mbconv_parts``: the function the package's built-in table was made with), (b) times
``--num_archs`` distinct random MBConv networks end to end by the table's own method
(``latency.time_parts`` of their specialised networks: batch ``latency.BATCH`` = 1,
evaluation mode, min of ``--net_repeats`` calls in each of ``--passes`` passes, the
least of them; the first and last passes' agreement is the measurement's own noise
floor), and (c) reports Pearson's r and Spearman's rho of the lookup-table sum
(``mbconv_latency``: the plain sum of the entries) against the measured latency, its
mean absolute and mean relative error, the same for the sum with each part's
jitted-call dispatch (``overhead_ms``) counted once instead of once per part and, as
the baselines a table must beat, Spearman's rho of the FLOPs and of the parameter
count (``mbconv_net.cost``). The machine's load average before and after each phase is
recorded: on a shared machine min-of-repeats timing is the estimate least disturbed by
other jobs, but contention still adds noise. The LAST line printed is the JSON summary,
also written to ``--out`` (with per-network data); ``--table_out`` also writes the
measured tables (``latency.save_tables``).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import jax  # noqa: E402

from jaxnas.models import latency as lat  # noqa: E402
from jaxnas.models import mbconv_net  # noqa: E402
from jaxnas.multifidelity import spearman  # noqa: E402  (average ranks for ties)
from jaxnas.ops import Execution  # noqa: E402
from jaxnas.spaces.declared import to_python  # noqa: E402
from jaxnas.spaces.mbconv import mbconv_space  # noqa: E402

flags.DEFINE_list("image_shapes", ["28x28x1", "32x32x3"], "Image shapes (HxWxC) to measure "
                  "tables for (Fashion-MNIST/MNIST, CIFAR).")
flags.DEFINE_integer("num_archs", 50, "Distinct random networks timed end to end per shape.")
flags.DEFINE_integer("seed", 0, "Seed of the network sample.")
flags.DEFINE_integer("repeats", 100, "Timed calls per table part (min taken).")
flags.DEFINE_integer("net_repeats", 100, "Timed calls per whole network (min taken).")
flags.DEFINE_integer("passes", 2, "Passes over all parts (and over all networks); an entry "
                     "is the least of its passes.")
flags.DEFINE_integer("num_classes", 10, "Classes of the head.")
flags.DEFINE_string("out", os.path.join(HERE, "results", "mbconv_latency.json"),
                    "Results JSON.")
flags.DEFINE_string("table_out", "", "Also write the measured tables here (e.g. "
                    "jaxnas/data/mbconv_latency_cpu.json).")
FLAGS = flags.FLAGS


def load() -> float:
  return round(os.getloadavg()[0], 2)


def agreement(predicted, measured) -> dict:
  """Pearson's r, Spearman's rho, mean absolute (ms) and mean relative error."""
  p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
  return {"pearson": round(float(np.corrcoef(p, m)[0, 1]), 4),
          "spearman": round(float(spearman(p, m)), 4),
          "mean_abs_error_ms": round(float(np.mean(np.abs(p - m))), 4),
          "mean_rel_error": round(float(np.mean(np.abs(p - m) / m)), 4),
          "mean_signed_rel_error": round(float(np.mean((p - m) / m)), 4)}


def sample_archs(space, n: int, seed: int) -> np.ndarray:
  """``n`` distinct canonical decision vectors, uniformly sampled."""
  key, seen, out = jax.random.PRNGKey(seed), set(), []
  sample = jax.jit(lambda k: space.canonical(space.sample_vector(k)))
  while len(out) < n:
    key, k = jax.random.split(key)
    v = tuple(int(x) for x in np.asarray(sample(k)))
    if v not in seen:
      seen.add(v)
      out.append(v)
  return np.asarray(out, np.int32)


def run_shape(shape: tuple, execution: Execution) -> tuple[lat.LatencyTable, dict]:
  t0 = time.time()
  log = lambda p, i, n, key, ms: (i % 50 == 0 or i == n) and print(
      f"  [{shape}] table pass {p + 1} {i}/{n} {key}: {ms:.4f} ms ({time.time() - t0:.0f}s, "
      f"load {load()})", flush=True)
  load_before = load()
  table = lat.measure_table("mbconv", lat.mbconv_parts(shape, FLAGS.num_classes, execution),
                            shape, repeats=FLAGS.repeats, passes=FLAGS.passes, log=log,
                            conv=execution.resolve().conv, num_classes=FLAGS.num_classes,
                            layout=lat.mbconv_layout())
  table_s = time.time() - t0

  space = mbconv_space()
  vectors = sample_archs(space, FLAGS.num_archs, FLAGS.seed)
  archs = jax.vmap(space.from_vector)(vectors)
  lut = lat.mbconv_latency([table])
  predicted = np.asarray(jax.jit(jax.vmap(lambda a: lut(a, shape)))(archs))
  # The alternative: each part's jitted-call dispatch (``overhead_ms``) counted once.
  num_parts = 2 + sum(np.asarray(archs[f"stage{s}"]["depth"]) for s in range(1, 5))
  predicted_once = predicted - (num_parts - 1) * table.overhead_ms
  params, flops = (np.asarray(x) for x in jax.jit(jax.vmap(lambda a: mbconv_net.cost(
      a, FLAGS.num_classes, shape[-1], shape[0])))(archs))

  net = mbconv_net.MBConvNetwork(num_classes=FLAGS.num_classes, execution=execution)
  nets = {space.encode(arch): lat.Part(net, (lat.BATCH,) + shape, (to_python(arch),))
          for arch in (jax.tree.map(lambda x: np.asarray(x)[i], archs)
                       for i in range(len(vectors)))}
  t1 = time.time()
  load_nets = load()
  log = lambda p, i, n, key, ms: i % 10 == 0 and print(
      f"  [{shape}] pass {p + 1} network {i}/{n}: measured {ms:.4f} ms, table "
      f"{predicted[i - 1]:.4f} ms ({time.time() - t1:.0f}s, load {load()})", flush=True)
  times = lat.time_parts(nets, FLAGS.net_repeats, passes=FLAGS.passes, log=log)
  nets_s = time.time() - t1
  first, again = (np.asarray([t[p] for t in times.values()]) for p in (0, -1))
  measured = np.asarray([min(t) for t in times.values()])  # as a table entry

  summary = {
      "image_shape": list(shape), "num_archs": len(vectors),
      "table_entries": len(table.ms), "overhead_ms": table.overhead_ms,
      "measured_ms": {"min": round(float(measured.min()), 4),
                      "median": round(float(np.median(measured)), 4),
                      "max": round(float(measured.max()), 4)},
      "lut_vs_measured": agreement(predicted, measured),
      "lut_dispatch_counted_once_vs_measured": agreement(predicted_once, measured),
      "flops_spearman_vs_measured": round(float(spearman(flops, measured)), 4),
      "params_spearman_vs_measured": round(float(spearman(params, measured)), 4),
      "noise_floor_first_vs_last_pass": agreement(first, again),
      "seconds": {"table": round(table_s, 1), "networks": round(nets_s, 1)},
      "load_average": {"before_table": load_before, "before_networks": load_nets,
                       "after": load()},
  }
  per_net = [{"arch": arch, "measured_ms": round(float(measured[i]), 5),
              "passes_ms": [round(float(t), 5) for t in times[arch]],
              "lut_ms": round(float(predicted[i]), 5), "flops": int(flops[i]),
              "params": int(params[i])} for i, arch in enumerate(nets)]
  return table, {"summary": summary, "networks": per_net}


def main(argv):
  del argv
  t0 = time.time()
  execution = Execution()
  meta = lat.device_meta()
  print(f"devices: {jax.devices()} conv={execution.resolve().conv} cpu={meta['cpu']} "
        f"load {load()}", flush=True)
  tables, results = [], []
  for text in FLAGS.image_shapes:
    shape = tuple(int(d) for d in text.split("x"))
    table, result = run_shape(shape, execution)
    tables.append(table)
    results.append(result)
    print(json.dumps(result["summary"]), flush=True)
  if FLAGS.table_out:
    lat.save_tables(FLAGS.table_out, tables)
  doc = {"device": meta, "conv": execution.resolve().conv, "batch": lat.BATCH,
         "unit": lat.UNIT, "statistic": "min", "repeats": FLAGS.repeats,
         "passes": FLAGS.passes, "net_repeats": FLAGS.net_repeats, "seed": FLAGS.seed,
         "seconds": round(time.time() - t0, 1),
         "note": "shared machine (other jobs running; see load_average): min-of-repeats "
                 "timing; the noise floor compares the first and last passes over the same "
                 "compiled networks",
         "results": results}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
  print(json.dumps({"seconds": doc["seconds"],
                    "summaries": [r["summary"] for r in results]}))


if __name__ == "__main__":
  app.run(main)
