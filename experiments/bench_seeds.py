"""Vectorization over seeds: wall time of the CLI for few vs many seeds.

The issue's target: 2000 seeds of `evolution` at budget 100 cost at most twice
the wall time of 10 seeds, same CLI, start-up included. Also reports the
in-process marginal cost per seed (compiled search only, no start-up).

  python experiments/bench_seeds.py [--strategy=evolution] [--budget=100] [--seeds=10,2000]

The last line printed is a JSON object with all numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def cli_seconds(strategy: str, budget: int, seeds: int, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    with tempfile.TemporaryDirectory() as tmp:
      cmd = [sys.executable, "-m", "jaxnas.main", f"--strategy={strategy}", f"--budget={budget}",
             f"--num_seeds={seeds}", f"--workdir={os.path.join(tmp, 'w')}"]
      t = time.perf_counter()
      subprocess.run(cmd, check=True, capture_output=True)
      best = min(best, time.perf_counter() - t)
  return best


def in_process(strategy: str, budget: int, seeds: list[int], repeats: int = 21) -> dict:
  import jax
  import jax.numpy as jnp
  from jaxnas.estimators import nb201_evaluator
  from jaxnas.search import make_search
  from jaxnas.strategies import STRATEGIES

  ev = nb201_evaluator("cifar10")
  search = make_search(STRATEGIES[strategy](ev.space), ev, budget)
  run = jax.jit(jax.vmap(lambda s: search.run_chunk(s, 0, search.num_steps)))
  out = {}
  for n in seeds:
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n))
    state = jax.jit(jax.vmap(search.init))(keys)
    jax.block_until_ready(run(state))  # compile
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(run(state))
      times.append(time.perf_counter() - t)
    out[n] = sorted(times)[len(times) // 2]  # the median: robust to this machine's bursts
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--strategy", default="evolution")
  p.add_argument("--budget", type=int, default=100)
  p.add_argument("--seeds", default="10,2000")
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  seeds = [int(s) for s in a.seeds.split(",")]
  cli = {n: cli_seconds(a.strategy, a.budget, n, a.repeats) for n in seeds}
  for n, t in cli.items():
    print(f"CLI {a.strategy} budget {a.budget}, {n:5d} seeds: {t:6.2f} s (best of {a.repeats})")
  compiled = in_process(a.strategy, a.budget, seeds)
  for n, t in compiled.items():
    print(f"compiled search only, {n:5d} seeds: {t * 1e3:8.2f} ms (median of 21)")
  lo, hi = min(seeds), max(seeds)
  result = {
      "strategy": a.strategy, "budget": a.budget,
      "cli_s": {str(k): round(v, 3) for k, v in cli.items()},
      "cli_ratio": round(cli[hi] / cli[lo], 3),
      "cli_marginal_ms_per_seed": round((cli[hi] - cli[lo]) / (hi - lo) * 1e3, 4),
      "compiled_marginal_ms_per_seed": round((compiled[hi] - compiled[lo]) / (hi - lo) * 1e3, 4),
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
