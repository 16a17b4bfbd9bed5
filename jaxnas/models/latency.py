"""Latency lookup tables: a network's latency as the sum of its blocks' measured latencies.

Hardware-aware NAS scores a candidate's latency without running it: each distinct
block configuration is timed once on the target device, and a network's latency is
the sum of its blocks' entries plus the fixed parts (ProxylessNAS, Cai et al. 2019,
section 3.3; Once-for-All, Cai et al. 2020, its latency lookup tables). Here the sum
is a gather and a sum inside jit (``lut_sum``), so the ``latency`` objective of
``SearchableModel`` runs in the same compiled program as the search, vmapped over
a population, with no host callback.

Convention (every table and ``latency`` function of this package): **milliseconds of
inference (evaluation mode: BN with its running statistics) of one batch of ``BATCH``
= 1 image** on the device the table was measured on. Batch 1 is the deployment
latency ProxylessNAS and Once-for-All search for (a phone or an edge CPU serving one
request), and what a latency constraint is stated in; a training step's time at the
search's batch size would instead measure the cost of the *search* (which
``SearchableModel.work`` already balances), and at batch 1 the small layers that
dominate deployed latency are not hidden behind the large ones as at batch 256.

Measuring (``measure_table``): every part is its *specialised* flax module (the
searchable blocks called with Python ints build exactly the chosen layers), jitted,
warmed up, then called ``repeats`` times one at a time (``block_until_ready`` each),
in two passes over all parts, and the minimum (default; or the median of a pass) is its
entry. The minimum is the estimate least disturbed by other processes on a shared
machine, and the second pass keeps a burst of load (or the first part's one-time
start-up costs: 10 ms instead of 0.03 ms, once) from setting an entry. A network's
latency is the plain sum of its parts' entries. Each entry includes one jitted call's
dispatch (``overhead_ms``, an empty jitted call, recorded with the table), which a whole
network pays only once, and a whole network's time is not the sum of its parts'
(``experiments/mbconv_latency.py``, 2-core CPU, the shipped table: the plain sum
over-predicts by 17 %, measured / table 0.86 +- 0.05 at 28x28 and 32x32; Spearman's rho
0.94-0.95, against 0.80-0.84 for FLOPs): a part timed alone, called again and again,
keeps its weights and input in cache or not depending on its size (with stage 1 at
stride 2, smaller blocks, the sum under-predicted by 16-19 %). The bias is close to a
constant factor, which changes no dominance relation and so no NSGA-II selection; for
an absolute latency constraint, scale by it. Tables are
JSON files with the backend, device, conv implementation and jax version they were
measured with (``save_tables`` / ``load_tables``).

The MBConv space's table (``mbconv_parts``, ``mbconv_latency``): the stem, one entry
per block configuration ``(stage, first block or not, input width, output width,
kernel, expansion)`` at that stage's resolution (blocks 2-4 of a stage share one
shape, so one entry each), and the head per last-stage width; 378 blocks + 1 + 3
entries per image shape. The package ships one measured on a CPU
(``jaxnas/data/mbconv_latency_cpu.json``, ``builtin_mbconv_latency``; made by
``experiments/mbconv_latency.py``), which the built-in ``mbconv`` model's ``latency``
uses on every backend: a fixed, CPU-measured proxy, so that a search's objective is
the same function wherever and whenever it runs (a resumed or repeated search
reproduces its results bit for bit, which a table measured on first use on a shared
machine would not). Where the backend is not the table's, the first use logs one
warning saying so, and ``latency.source`` records the table. For another device,
measure its table (``measure_table(..., mbconv_parts(...))``, ``save_tables``) and
search ``mbconv_model(config)._replace(latency=mbconv_latency(load_tables(path)))``
(``--model``).
"""

from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
import os
import platform
import time
from typing import Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

from jaxnas import nn as jnn
from jaxnas.models.mbconv_net import MBConv
from jaxnas.ops import Execution
from jaxnas.spaces.mbconv import (DEPTHS, EXPANSIONS, HEAD, KERNELS, MULTIPLIERS, STAGES,
                                  STEM, stage_widths)

UNIT = "ms"
BATCH = 1  # images per timed call: deployment latency (module docstring)
FORMAT = "jaxnas-latency-table/1"
BUILTIN = "mbconv_latency_cpu.json"  # in jaxnas/data


class Part(NamedTuple):
  """One timed piece of a network: ``module.apply(variables, x, *args, train=False)`` on
  ``x`` of ``shape`` (batch first); ``args`` are Python values (the specialised form)."""
  module: nn.Module
  shape: tuple
  args: tuple = ()


class LatencyTable(NamedTuple):
  """Measured latencies (ms) of the parts of a network family on one device.

  ``ms[key]``: one part alone (one jitted call, batch ``meta["batch"]``);
  ``overhead_ms``: an empty jitted call, for reference (not subtracted); ``image_shape``:
  the network input it was measured for (H, W, C); ``meta``: how and where it was
  measured (backend, device, conv, jax version, statistic, repeats, load average).
  """
  name: str
  image_shape: tuple
  ms: dict
  overhead_ms: float
  meta: dict


def time_call(f: Callable, *args, repeats: int = 100, warmup: int = 3,
              statistic: str = "min") -> float:
  """Milliseconds of one call ``f(*args)`` (jitted by the caller), waited for with
  ``block_until_ready``: the ``statistic`` ("min" or "median") of ``repeats`` calls after
  ``warmup`` calls (the first compiles)."""
  if statistic not in ("min", "median"):
    raise ValueError(f"statistic must be min or median, got {statistic!r}")
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = np.empty(repeats)
  for r in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times[r] = time.perf_counter() - t
  return float(1e3 * (times.min() if statistic == "min" else np.median(times)))


def part_variables(part: Part, seed: int = 0):
  """Variables of ``part``'s module with its shapes, filled on the host (no compile):
  uniform(-0.1, 0.1), BN variances 1 (their values do not change the time)."""
  x = jax.ShapeDtypeStruct(tuple(part.shape), jnp.float32)
  shapes = jax.eval_shape(lambda k, x: part.module.init(k, x, *part.args, train=False),
                          jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  values = {p: (np.ones(v.shape, v.dtype) if p[-1] == "var" else
                rng.uniform(-0.1, 0.1, v.shape).astype(v.dtype)) for p, v in flat.items()}
  return jax.device_put(flax.traverse_util.unflatten_dict(values))


def part_call(part: Part) -> tuple[Callable, tuple]:
  """``(f, args)``: ``part``'s specialised module jitted (evaluation mode) and its
  arguments (``part_variables``, a random input)."""
  variables = part_variables(part)
  x = jnp.asarray(np.random.default_rng(1).standard_normal(part.shape), jnp.float32)
  f = jax.jit(lambda v, x: part.module.apply(v, x, *part.args, train=False))
  return f, (variables, x)


def time_part(part: Part, repeats: int = 100, statistic: str = "min") -> float:
  """Milliseconds of ``part`` (``part_call``, ``time_call``)."""
  f, args = part_call(part)
  return time_call(f, *args, repeats=repeats, statistic=statistic)


def overhead(shape: tuple, repeats: int = 100, statistic: str = "min") -> float:
  """Milliseconds of an (almost) empty jitted call on an input of ``shape``: the dispatch
  cost that every timed part includes once (recorded with a table, not subtracted)."""
  x = jnp.zeros(shape, jnp.float32)
  return time_call(jax.jit(lambda x: x + 1.0), x, repeats=repeats, statistic=statistic)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_meta() -> dict:
  """Where a table is measured: backend, device kind (and the CPU's model), versions."""
  return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "jax_version": jax.__version__,
          "jaxlib_version": jaxlib.__version__, "cpu": _cpu_model(),
          "cpu_count": os.cpu_count()}


def time_parts(parts: Mapping[str, Part], repeats: int = 100, statistic: str = "min",
               passes: int = 2, log: Callable | None = None) -> dict[str, list[float]]:
  """Milliseconds of each of ``parts`` (key -> ``Part``) in each of ``passes`` passes over
  all of them (``time_call``; each part compiled once, in the first pass). Several passes
  spread each part's calls over the whole measurement, so a burst of load from other
  processes (or the first part's one-time start-up costs) does not set an entry.
  ``log(pass, i, n, key, ms)`` is called after each part."""
  calls, out = {}, {key: [] for key in parts}
  for p in range(passes):
    for i, (key, part) in enumerate(parts.items()):
      if key not in calls:
        calls[key] = part_call(part)
      f, args = calls[key]
      out[key].append(time_call(f, *args, repeats=repeats, statistic=statistic,
                                warmup=3 if p == 0 else 1))
      if log is not None:
        log(p, i + 1, len(parts), key, out[key][-1])
  return out


def measure_table(name: str, parts: Mapping[str, Part], image_shape: tuple, *,
                  repeats: int = 100, statistic: str = "min", passes: int = 2,
                  log: Callable | None = None, **meta) -> LatencyTable:
  """The ``LatencyTable`` of ``parts`` (key -> ``Part``) timed on the current backend: each
  entry the least of its ``passes`` measurements (``time_parts``; module docstring), with
  ``overhead_ms`` (``overhead``, likewise) and where it was measured; ``meta`` adds fields
  to its record (e.g. the conv implementation)."""
  batch = sorted({int(p.shape[0]) for p in parts.values()})
  t0 = time.time()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  times = time_parts(parts, repeats, statistic, passes, log)
  shape = (batch[0],) + tuple(image_shape)
  over = min(overhead(shape, repeats, statistic) for _ in range(passes))
  record = {**device_meta(), "batch": batch[0] if len(batch) == 1 else batch,
            "unit": UNIT, "statistic": statistic, "repeats": repeats, "passes": passes,
            "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "seconds": round(time.time() - t0, 1),
            "load_average": [round(load, 2) if load is not None else None,
                             round(os.getloadavg()[0], 2) if load is not None else None],
            **meta}
  return LatencyTable(name, tuple(int(d) for d in image_shape),
                      {key: round(min(t), 6) for key, t in times.items()}, round(over, 6),
                      record)


def save_tables(path: str, tables: Sequence[LatencyTable]) -> None:
  """Writes ``tables`` as one JSON file (``load_tables`` reads it back)."""
  doc = {"format": FORMAT, "unit": UNIT,
         "tables": [{"name": t.name, "image_shape": list(t.image_shape),
                     "overhead_ms": t.overhead_ms, "meta": t.meta, "ms": t.ms} for t in tables]}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def load_tables(path) -> list[LatencyTable]:
  """The tables of a ``save_tables`` file (ValueError with one line for another file)."""
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"latency table {path}: cannot read it ({e})") from None
  if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("unit") != UNIT:
    raise ValueError(f"latency table {path}: not a {FORMAT} file in {UNIT}")
  return [LatencyTable(t["name"], tuple(t["image_shape"]),
                       {k: float(v) for k, v in t["ms"].items()}, float(t["overhead_ms"]),
                       dict(t["meta"])) for t in doc["tables"]]


def lut_sum(values, index, present) -> jax.Array:
  """``sum_i present_i values[index_i]`` (float32, jittable, vmappable): the latency of a
  network whose parts are the table entries ``index`` (int[S]) where ``present`` (bool or
  0/1 [S]): a gather and a sum, the same program for every member."""
  values = jnp.asarray(values, jnp.float32)
  return jnp.sum(jnp.where(jnp.asarray(present, bool), values[index], jnp.float32(0)))


# ---- the MBConv space's table ----

class _Stem(nn.Module):
  """``MBConvNetwork``'s stem: 3x3 conv to ``STEM`` channels, BN, ReLU6."""
  conv: str

  @nn.compact
  def __call__(self, x, train=False):
    x = jnn.ElasticConv(STEM, 3, conv=self.conv, name="stem")(x)
    return nn.relu6(jnn.BatchNorm(name="stem_bn")(x, train))


class _Head(nn.Module):
  """``MBConvNetwork``'s head: 1x1 conv to ``HEAD`` channels, BN, ReLU6, global average
  pooling, the classifier."""
  conv: str
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    x = jnn.ElasticConv(HEAD, 1, conv=self.conv, name="head")(x)
    x = nn.relu6(jnn.BatchNorm(name="head_bn")(x, train))
    return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, (1, 2)))


def first_key(s: int, w_in: int, w_out: int, kernel: int, expand: int) -> str:
  """The table key of stage ``s``'s first block (it changes width and resolution)."""
  return f"stage{s}.first.in{w_in}.out{w_out}.k{kernel}.e{expand}"


def rest_key(s: int, width: int, kernel: int, expand: int) -> str:
  """The table key of a later block of stage ``s`` (blocks 2-4 share a shape)."""
  return f"stage{s}.rest.w{width}.k{kernel}.e{expand}"


def head_key(width: int) -> str:
  return f"head.in{width}"


def _resolutions(image_size: int) -> list[int]:
  """Input resolution of each stage (padding k // 2: ``h -> (h - 1) // stride + 1``)."""
  out, h = [], image_size
  for stage in STAGES:
    out.append(h)
    h = (h - 1) // stage.stride + 1
  return out + [h]


def _configs():
  """``(key, stage, first, w_in, w_out, kernel, expand)`` of every distinct MBConv block
  (stage 1-based), in table order."""
  w_prev = (STEM,)
  for s, stage in enumerate(STAGES, 1):
    widths = stage_widths(stage)
    for w_in in w_prev:
      for w in widths:
        for k in KERNELS:
          for e in EXPANSIONS:
            yield first_key(s, w_in, w, k, e), s, True, w_in, w, k, e
    for w in widths:
      for k in KERNELS:
        for e in EXPANSIONS:
          yield rest_key(s, w, k, e), s, False, w, w, k, e
    w_prev = widths


def mbconv_layout() -> dict:
  """The MBConv layout a table is measured for (``spaces.mbconv``'s constants), recorded in
  its ``meta["layout"]``: a table of another layout is refused, not silently misread."""
  return {"stem": STEM, "stages": [[s.width, s.stride] for s in STAGES], "head": HEAD,
          "multipliers": list(MULTIPLIERS), "depths": list(DEPTHS), "kernels": list(KERNELS),
          "expansions": list(EXPANSIONS)}


def mbconv_keys() -> list[str]:
  """The keys of an MBConv table: the stem, every block configuration, the heads."""
  return (["stem"] + [c[0] for c in _configs()] +
          [head_key(w) for w in stage_widths(STAGES[-1])])


def mbconv_parts(image_shape: tuple = (28, 28, 1), num_classes: int = 10,
                 execution: Execution = Execution(), batch: int = BATCH) -> dict[str, Part]:
  """Every distinct part of the MBConv networks for ``image_shape`` images (module
  docstring), keyed as ``mbconv_latency`` looks them up (``mbconv_keys``), as specialised
  modules built as ``MBConvNetwork`` builds them (same blocks, same conv implementation)."""
  conv = execution.resolve().conv
  size, channels = image_shape[0], image_shape[-1]
  res = _resolutions(size)
  parts = {"stem": Part(_Stem(conv), (batch, size, size, channels))}
  for key, s, first, w_in, w, k, e in _configs():
    stage = STAGES[s - 1]
    h = res[s - 1] if first else res[s]
    parts[key] = Part(MBConv(w_in, w, stage.stride if first else 1, residual=not first,
                             conv=conv), (batch, h, h, w_in), ((k, e, w_in, w),))
  for w in stage_widths(STAGES[-1]):
    parts[head_key(w)] = Part(_Head(conv, num_classes), (batch, res[-1], res[-1], w))
  return parts


def _position(values: tuple, v) -> jax.Array:
  """Index of the candidate value ``v`` (int32 array) in ``values``."""
  return jnp.argmax(jnp.asarray(values, jnp.int32) == v).astype(jnp.int32)


def mbconv_slots(keys: Sequence[str]) -> Callable:
  """``slots(arch) -> (index int32[18], present bool[18])``: the table entries (positions
  in ``keys``) of an MBConv architecture's stem, 16 blocks and head, and which exist
  (blocks past a stage's depth do not). Jittable, vmappable."""
  pos = {k: i for i, k in enumerate(keys)}
  firsts, rests, w_prev = [], [], (STEM,)
  for s, stage in enumerate(STAGES, 1):
    widths = stage_widths(stage)
    firsts.append(np.asarray([[[[pos[first_key(s, a, w, k, e)] for e in EXPANSIONS]
                                for k in KERNELS] for w in widths] for a in w_prev], np.int32))
    rests.append(np.asarray([[[pos[rest_key(s, w, k, e)] for e in EXPANSIONS] for k in KERNELS]
                             for w in widths], np.int32))
    w_prev = widths
  heads = np.asarray([pos[head_key(w)] for w in w_prev], np.int32)

  def slots(arch):
    index, present = [jnp.int32(pos["stem"])], [jnp.bool_(True)]
    w_in = jnp.int32(0)  # position among the previous stage's widths (the stem: one)
    for s, stage in enumerate(STAGES, 1):
      a = arch[f"stage{s}"]
      w = _position(stage_widths(stage), a["width"])
      for b in range(1, max(DEPTHS) + 1):
        k = _position(KERNELS, a[f"block{b}"]["kernel"])
        e = _position(EXPANSIONS, a[f"block{b}"]["expand"])
        index.append(jnp.asarray(firsts[s - 1])[w_in, w, k, e] if b == 1 else
                     jnp.asarray(rests[s - 1])[w, k, e])
        present.append(jnp.asarray(a["depth"]) >= b)
      w_in = w
    index.append(jnp.asarray(heads)[w_in])
    present.append(jnp.bool_(True))
    return jnp.stack(index), jnp.stack(present)

  return slots


def mbconv_latency(tables: Sequence[LatencyTable], source: str | None = None) -> Callable:
  """``latency(arch, image_shape) -> float32`` ms (batch 1; module docstring) of an MBConv
  architecture from ``tables`` (one per image shape, each with every ``mbconv_parts``
  key, measured for this ``mbconv_layout``): ``lut_sum`` of its stem, present blocks and
  head. Jittable and vmappable (the image shape is static). ``latency.source`` records
  the tables (name, file, backend, device, conv, jax version); where the running backend
  is not theirs, the first use logs one warning."""
  keys = mbconv_keys()
  slots = mbconv_slots(keys)
  by_shape = {}
  for t in tables:
    if t.meta.get("layout") != mbconv_layout():
      raise ValueError(f"latency table {t.name} {t.image_shape} was measured for another "
                       f"MBConv layout ({t.meta.get('layout')}); measure it again "
                       "(experiments/mbconv_latency.py)")
    missing = [k for k in keys if k not in t.ms]
    if missing:
      raise ValueError(f"latency table {t.name} {t.image_shape}: no entry for {missing[0]} "
                       f"(and {len(missing) - 1} more): not an MBConv table")
    by_shape[tuple(t.image_shape)] = (np.asarray([t.ms[k] for k in keys], np.float32),
                                      t.meta)
  warned = []

  def latency(arch, image_shape):
    shape = tuple(int(d) for d in image_shape)
    if shape not in by_shape:
      raise ValueError(f"no MBConv latency table for {'x'.join(map(str, shape))} images "
                       f"(tables: {', '.join('x'.join(map(str, s)) for s in by_shape)})")
    values, meta = by_shape[shape]
    if not warned and meta.get("backend") != jax.default_backend():
      warned.append(True)
      logging.warning("latency objective: %s measured on %s (%s), used on %s: a proxy of "
                      "the latency there, not a measurement", source or "the table",
                      meta.get("backend"), meta.get("cpu") or meta.get("device"),
                      jax.default_backend())
    index, present = slots(arch)
    return lut_sum(values, index, present)

  latency.source = {"tables": source, "unit": UNIT, "batch": BATCH,
                    "measured_on": [{k: t.meta.get(k) for k in (
                        "backend", "device", "cpu", "conv", "jax_version")} |
                        {"image_shape": list(t.image_shape)} for t in tables]}
  return latency


@functools.lru_cache(maxsize=1)
def builtin_mbconv_tables() -> tuple[LatencyTable, ...]:
  """The package's CPU-measured MBConv tables (``jaxnas/data/mbconv_latency_cpu.json``)."""
  path = importlib.resources.files("jaxnas.data").joinpath(BUILTIN)
  with importlib.resources.as_file(path) as p:
    return tuple(load_tables(p))


def builtin_mbconv_latency() -> Callable:
  """``mbconv_latency`` of the package's CPU tables (the built-in ``mbconv`` model's),
  read on first use."""
  source = f"jaxnas/data/{BUILTIN}"
  of_tables = functools.lru_cache(maxsize=1)(
      lambda: mbconv_latency(builtin_mbconv_tables(), source=source))

  def latency(arch, image_shape):
    return of_tables()(arch, image_shape)

  latency.source = {"tables": source, "unit": UNIT, "batch": BATCH}
  return latency


def table_of(tables: Sequence[LatencyTable], image_shape) -> LatencyTable:
  """The table of ``image_shape`` among ``tables`` (ValueError naming the shapes there)."""
  for t in tables:
    if tuple(t.image_shape) == tuple(image_shape):
      return t
  raise ValueError(f"no latency table for {tuple(image_shape)}; there are "
                   f"{[tuple(t.image_shape) for t in tables]}")


__all__ = ["BATCH", "LatencyTable", "Part", "UNIT", "builtin_mbconv_latency",
           "builtin_mbconv_tables", "first_key", "head_key", "load_tables", "lut_sum",
           "mbconv_keys", "mbconv_latency", "mbconv_layout", "mbconv_parts", "mbconv_slots",
           "measure_table", "overhead", "part_call", "part_variables", "rest_key",
           "save_tables", "table_of", "time_call", "time_part", "time_parts"]
