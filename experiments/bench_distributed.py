"""The cost of going multi-process: one training search on 1 process x 4 devices vs 2
processes x 2 devices (gloo collectives between the processes), on this machine.

  python experiments/bench_distributed.py --budget=48 --population=8 \
      --out=experiments/results/bench_distributed.json

runs the same ``python -m jaxnas.main --evaluator=train --strategy=evolution`` search
(Fashion-MNIST, ``--population`` members per generation, sharded over the 4 devices
either way; ``--repeats`` times per layout, the layouts alternating, the compilation
cache off so each run is a cold start) and reports per layout:

* ``end_to_end_s``: launch to the last process's exit (start-up, data, compiles, search);
* ``search_wall_s``: the search loop's wall time from the workdir's timing.json
  (generations with their compiles, checkpoints);
* ``results_identical``: whether results.json is the same bytes in every run (it is
  meant to be, whatever the layout);
* ``collectives``: what is communicated, read from XLA's HLO after optimisation of every
  program the run compiled (``--xla_dump_to``, process 0's): per program that contains
  cross-device collectives, each collective's op, result shape and result bytes;
* ``per_generation``: what crosses devices once per generation. The trainer's own
  program (``jit_per_shard``) has no collectives (members are independent); each of its
  outputs (a member block per device, from the ENTRY signature of its HLO) is gathered
  whole by the program with a collective of that shape: ``gathers`` lists them, ``bytes``
  their sum.

The data and keys that every generation places on the devices (host to device, not
collectives) are not counted. Without ``--out`` it prints the JSON.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("budget", 48, "Architectures evaluated (budget / population generations).")
flags.DEFINE_integer("population", 8, "Members trained per generation (sharded over 4 devices).")
flags.DEFINE_integer("channels", 16, "Channels of the networks.")
flags.DEFINE_float("train_fraction", 0.1, "Fraction of the search split the proxy trains on.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST folder (default: jaxnas's default).")
flags.DEFINE_integer("repeats", 1, "Runs per layout (alternating layouts).")
flags.DEFINE_string("extra", "", "Further CLI flags for both layouts, space separated.")
flags.DEFINE_string("out", None, "Write the JSON here.")
FLAGS = flags.FLAGS

LAYOUTS = {"1x4": (1, 4), "2x2": (2, 2)}
COLLECTIVE = re.compile(r"=\s*(\(?[a-z0-9\[\]{},: ]+?\)?)\s+(all-gather|all-reduce|"
                        r"collective-permute|all-to-all|reduce-scatter|collective-broadcast)"
                        r"(?:-start)?\(")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * BYTES.get(dtype, 4)
  return total


def collectives(dump_dir: str) -> list[dict]:
  """The programs under ``dump_dir`` (XLA's text dumps after optimisation) that hold
  cross-device collectives: name, each collective's op, shape and result bytes."""
  programs = []
  for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
    ops = []
    with open(path) as f:
      for line in f:
        m = COLLECTIVE.search(line)
        if m and "-done(" not in line:
          ops.append({"op": m.group(2), "shape": m.group(1).strip(),
                      "bytes": _shape_bytes(m.group(1))})
    if ops:
      name = os.path.basename(path).split(".", 2)[1] if "." in os.path.basename(path) else path
      programs.append({"program": name, "collectives": ops,
                       "bytes": sum(o["bytes"] for o in ops)})
  return programs


def trainer_outputs(dump_dir: str) -> list[str]:
  """The per-device result shapes of the population trainer's program (``jit_per_shard``,
  ``models/sharded.py``): each is one member block of one metric, gathered to every
  process after each generation."""
  for path in sorted(glob.glob(os.path.join(dump_dir, "*jit_per_shard*after_optimizations.txt"))):
    with open(path) as f:
      for line in f:
        if line.startswith("ENTRY"):
          result = line.rsplit("->", 1)[1].rsplit("{", 1)[0].strip()
          return re.findall(r"[a-z]+\d*\[[\d,]*\]", result)
  return []


def per_generation(programs: list[dict], outputs: list[str], devices: int) -> dict:
  """What crosses devices once per generation: every trainer output gathered whole (its
  block times the devices) by the program whose collective has that result shape (across
  processes ``process_allgather``'s all-gather; in one process the indexing of the sharded
  outputs, which XLA partitions into an all-reduce)."""
  gathers = {}
  for p in programs:
    for op in p["collectives"]:
      gathers[re.sub(r"\{.*?\}", "", op["shape"])] = f"{p['program']} ({op['op']})"
  calls, total = [], 0
  for block in outputs:
    dtype, dims = re.match(r"([a-z]+\d*)\[([\d,]*)\]", block).groups()
    dims = [int(d) for d in dims.split(",") if d]
    whole = f"{dtype}[{','.join(str(d) for d in [dims[0] * devices] + dims[1:])}]"
    total += _shape_bytes(whole)
    calls.append({"gathered": whole, "bytes": _shape_bytes(whole),
                  "program": gathers.get(whole)})
  return {"gathers": calls, "bytes": total}


def run_layout(name: str, root: str, index: int) -> dict:
  processes, devices = LAYOUTS[name]
  workdir = os.path.join(root, f"{name}-{index}")
  dumps = [os.path.join(root, f"dump-{name}-{index}-p{i}") for i in range(processes)]
  flags_ = ["--evaluator=train", "--strategy=evolution", f"--budget={FLAGS.budget}",
            f"--population={FLAGS.population}", f"--population_size={FLAGS.population}",
            "--num_seeds=1", f"--channels={FLAGS.channels}",
            f"--train_fraction={FLAGS.train_fraction}", "--compilation_cache=",
            f"--cpu_devices={devices}",
            f"--workdir={workdir}", *FLAGS.extra.split()]
  if FLAGS.data_dir:
    flags_.append(f"--data_dir={FLAGS.data_dir}")
  port = _free_port()
  procs = []
  t0 = time.perf_counter()
  for i in range(processes):
    launch = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
               f"--process_id={i}"] if processes > 1 else [])
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_dump_to={dumps[i]} --xla_dump_hlo_as_text")
    procs.append(subprocess.Popen([sys.executable, "-m", "jaxnas.main", *flags_, *launch],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  outputs = [p.communicate() for p in procs]
  end_to_end = time.perf_counter() - t0
  for i, (p, (_, stderr)) in enumerate(zip(procs, outputs)):
    if p.returncode:
      raise RuntimeError(f"{name} process {i} exited {p.returncode}: {stderr[-2000:]}")
  with open(os.path.join(workdir, "timing.json")) as f:
    timing = json.load(f)
  with open(os.path.join(workdir, "results.json"), "rb") as f:
    results = f.read()
  programs = collectives(dumps[0])
  return {"layout": name, "processes": processes, "devices_per_process": devices,
          "end_to_end_s": round(end_to_end, 2), "search_wall_s": timing["wall_s"],
          "best_arch": json.loads(results)["summary"]["best_arch"],
          "results": results, "collectives": programs,
          "per_generation": per_generation(programs, trainer_outputs(dumps[0]),
                                           processes * devices)}


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="jaxnas-bench-distributed-")
  try:
    runs = [run_layout(name, root, r) for r in range(FLAGS.repeats) for name in LAYOUTS]
  finally:
    shutil.rmtree(root, ignore_errors=True)
  identical = len({r["results"] for r in runs}) == 1
  for r in runs:
    del r["results"]
  report = {"config": {"budget": FLAGS.budget, "population": FLAGS.population,
                       "channels": FLAGS.channels, "train_fraction": FLAGS.train_fraction,
                       "repeats": FLAGS.repeats, "cpu_count": os.cpu_count()},
            "results_identical": identical, "runs": runs}
  text = json.dumps(report, indent=1)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
