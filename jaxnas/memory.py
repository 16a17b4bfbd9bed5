"""How much device memory a compiled program needs, and how many seeds of a search fit.

A search vectorised over seeds (``jit(vmap(f))``) needs memory in proportion
to its seeds: the DARTS-space supernet at C=8, 5 cells needs ~5.6 GB per seed
on a CPU, so ten seeds ask a 24 GB machine for 56 GB and stop with XLA's
out-of-memory error. ``fit_seeds`` reads XLA's memory analysis of the compiled
program before anything runs and, when it does not fit, compiles the same
computation over chunks of ``k`` seeds (``lax.map(f, states, batch_size=k)``:
a loop over chunks, each chunk vmapped), with ``k`` the most that fit; when
not even one seed fits it refuses up front with the number needed. Each seed's
computation is the same in both forms, so its results are too
(tests/test_memory.py compares them bit for bit).

The budget is a fixed share of the device: the allocator's limit on an
accelerator, physical memory on a CPU (not what happens to be free, so the
chunking of a run, and a resumed run, does not depend on the machine's load).
``JAXNAS_MEMORY_LIMIT`` (bytes; suffixes K, M, G) sets it instead.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
from absl import logging

# Share of the device a program may plan for: XLA's analysis leaves out the runtime's own
# buffers and fragmentation, and a CPU's memory is also the host process's (the README's
# DARTS-space search planned 10.6 GiB and the process held 14.9 GiB while it ran).
CPU_FRACTION = 0.7  # of physical memory
ACCELERATOR_FRACTION = 0.85  # of the allocator's limit


class MemoryFitError(ValueError):
  """Not even one seed of a program fits the device; the message says what it needs."""


def gib(n: float) -> str:
  return f"{n / 2**30:.1f} GiB"


def _parse_bytes(text: str) -> int:
  text = text.strip().upper().removesuffix("B")
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
  try:
    return int(float(text[:-1] if scale > 1 else text) * scale)
  except ValueError:
    raise MemoryFitError(f"JAXNAS_MEMORY_LIMIT={os.environ['JAXNAS_MEMORY_LIMIT']!r} is not "
                         "a size in bytes (e.g. 20G)") from None


def device_bytes(device=None) -> int:
  """Memory a program on ``device`` (default: the first local one) may plan for, in bytes."""
  if os.environ.get("JAXNAS_MEMORY_LIMIT"):
    return _parse_bytes(os.environ["JAXNAS_MEMORY_LIMIT"])
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(int(stats["bytes_limit"]) * ACCELERATOR_FRACTION)
  # CPU: the machine's physical memory, shared by its host devices
  total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return int(total * CPU_FRACTION) // max(1, jax.local_device_count())


def program_bytes(compiled) -> int:
  """Peak memory XLA planned for ``compiled`` (arguments, outputs, temporaries, code)."""
  m = compiled.memory_analysis()
  if m is None:  # a backend without the analysis: nothing to go by
    return 0
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
             m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def over_seed_chunks(f: Callable, num_seeds: int, chunk: int) -> Callable:
  """``f(states, data)`` over a leading seed axis of ``states``: one vmap of all seeds when
  ``chunk >= num_seeds``, else ``lax.map`` over chunks of ``chunk`` seeds."""
  if chunk >= num_seeds:
    return jax.vmap(f, in_axes=(0, None))
  return lambda states, data: jax.lax.map(lambda s: f(s, data), states, batch_size=chunk)


def fit_seeds(f: Callable, states: Any, data: Any, *, what: str, knobs: str,
              options: dict | None = None) -> tuple[Any, int]:
  """``(compiled, chunk)``: ``f(state, data)`` over the seeds of ``states`` compiled to fit.

  First all seeds in one vmap; if XLA plans more memory than ``device_bytes()``,
  the per-seed share of that plan (beyond ``data``, which all seeds share) sizes
  the chunk, and the chunked program is compiled and checked in turn. Raises
  ``MemoryFitError`` naming the memory one seed needs and ``knobs`` (the flags
  that shrink it) when one seed alone does not fit.
  """
  n = jax.tree.leaves(states)[0].shape[0]
  limit = device_bytes()
  shared = sum(x.nbytes for x in jax.tree.leaves(data))

  def compile_for(k):
    lowered = jax.jit(over_seed_chunks(f, n, k)).lower(states, data)
    return lowered.compile(compiler_options=options or None)

  compiled = compile_for(n)
  need = program_bytes(compiled)
  if need <= limit:
    return compiled, n
  one = shared + max(1, (need - shared) // n)  # linear in seeds beyond the shared data
  k = min(n - 1, (limit - shared) // (one - shared))
  while k >= 1:
    compiled = compile_for(k)
    need_k = program_bytes(compiled)
    if need_k <= limit:
      logging.info("%s: %d seeds need %s, more than the %s planned for %s; running %d "
                   "seeds at a time (%s)", what, n, gib(need), gib(limit),
                   jax.default_backend(), k, gib(need_k))
      return compiled, k
    if k == 1:
      one = need_k
    k = min(k - 1, int(k * limit / need_k))
  raise MemoryFitError(
      f"{what}: one seed needs {gib(one)} of {jax.default_backend()} memory, more than "
      f"the {gib(limit)} available to it (JAXNAS_MEMORY_LIMIT sets this); lower {knobs}")
