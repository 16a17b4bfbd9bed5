"""Reference searches on the NAS-Bench-201 12-epoch table, in plain Python (no JAX).

These are the yardsticks of ``bench_quality.py``: independent re-implementations
that share nothing with jaxnas but the packaged table, so a bug in jaxnas'
strategies or search loop cannot hide in both.

* ``regularized_evolution``: Real, Aggarwal, Huang & Le (AAAI 2019), as in the
  NAS-Bench-201 reference ``R_EA.py`` (Dong & Yang, ICLR 2020): the first
  ``population_size`` evaluations are uniform samples; then the parent is the
  fittest of ``tournament_size`` members drawn with replacement, the child is a
  one-edge mutation and replaces the oldest member. ``count_duplicates=True``
  is the reference (every evaluation counts, repeats included);
  ``count_duplicates=False`` re-draws a proposal (tournament and mutation, or
  the uniform sample) until it is novel, which is what jaxnas does.
  ``mutation="edge"`` picks the edge uniformly; ``mutation="node"`` is the
  reference code's ``mutate_arch``, which picks a node uniformly and then one
  of its input edges, so edge 1<-0 is chosen with p=1/3 and the three edges
  into node 3 with p=1/9 each.
* ``tpe``: Optuna's TPESampler (Bergstra et al., NeurIPS 2011) over 6
  categorical parameters; Optuna is imported lazily.
* ``random_search``: uniform samples, repeats counted (the reference
  ``RANDOM.py``).

Every search sees only the validation accuracy; each returns, per seed, the
architecture it chose (best validation, first on ties), that architecture's
test accuracy, and the best-so-far validation trajectory.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
from typing import Callable, NamedTuple

import numpy as np

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NUM_EDGES = 6
NUM_OPS = len(OPS)
# Edges in string order (1<-0), (2<-0), (2<-1), (3<-0), (3<-1), (3<-2), grouped by target node.
NODE_EDGES = ((0,), (1, 2), (3, 4, 5))
# As jaxnas.strategies.base: re-draws of a non-novel proposal before uniform fallback.
MAX_TRIES = 64
MAX_FALLBACK_TRIES = 512
_WEIGHTS = tuple(NUM_OPS ** (NUM_EDGES - 1 - e) for e in range(NUM_EDGES))


class PeerResult(NamedTuple):
  """One search: the chosen architecture and what it scored."""
  arch: tuple[int, ...]        # op indices of the chosen architecture
  val_accuracy: float          # its validation accuracy (what the search saw)
  test_accuracy: float         # its test accuracy (the reported number)
  trajectory: np.ndarray       # float32[budget], best validation so far per evaluation
  num_unique: int              # distinct architectures among the evaluations


def rank(arch) -> int:
  """Mixed-radix index of an architecture, first edge most significant (the table's order)."""
  return sum(int(a) * w for a, w in zip(arch, _WEIGHTS))


@functools.lru_cache(maxsize=None)
def load_tables(dataset: str) -> tuple[np.ndarray, np.ndarray]:
  """(validation, test) accuracy tables float32[15625] indexed by ``rank``.

  Read from the packaged file with numpy and re-indexed here, without jaxnas'
  loader, so that an indexing bug there would show up as a disagreement.
  """
  root = importlib.util.find_spec("jaxnas").submodule_search_locations[0]  # does not import it
  with np.load(os.path.join(root, "data", "nb201_12epoch.npz")) as raw:
    if tuple(str(o) for o in raw["ops"]) != OPS:
      raise ValueError(f"nb201 table ops {raw['ops']} differ from {OPS}")
    columns = {str(d).lower(): i for i, d in enumerate(raw["datasets"])}
    if dataset not in columns:
      raise ValueError(f"unknown dataset {dataset!r}; the table has {', '.join(columns)}")
    val = np.full(NUM_OPS ** NUM_EDGES, np.nan, np.float32)
    test = np.full(NUM_OPS ** NUM_EDGES, np.nan, np.float32)
    for arch, v, t in zip(raw["arch"], raw["val12"][:, columns[dataset]],
                          raw["test12"][:, columns[dataset]]):
      i = rank(arch)
      val[i], test[i] = v, t
  if np.isnan(val).any() or np.isnan(test).any():
    raise ValueError("nb201 table does not cover all 15,625 cells")
  return val, test


def _result(history: list[tuple[int, ...]], val: np.ndarray, test: np.ndarray) -> PeerResult:
  scores = np.asarray([val[rank(a)] for a in history], np.float32)
  best = int(np.argmax(scores))  # first maximum, as jnp.argmax in jaxnas.search.results_of
  arch = history[best]
  return PeerResult(arch=tuple(arch), val_accuracy=float(val[rank(arch)]),
                    test_accuracy=float(test[rank(arch)]),
                    trajectory=np.maximum.accumulate(scores),
                    num_unique=len(set(history)))


def _random_arch(rng: random.Random) -> tuple[int, ...]:
  return tuple(rng.randrange(NUM_OPS) for _ in range(NUM_EDGES))


def _mutate(rng: random.Random, arch: tuple[int, ...], mutation: str) -> tuple[int, ...]:
  if mutation == "edge":
    edge = rng.randrange(NUM_EDGES)
  elif mutation == "node":
    edge = rng.choice(NODE_EDGES[rng.randrange(len(NODE_EDGES))])
  else:
    raise ValueError(f"unknown mutation {mutation!r}; choose edge or node")
  op = rng.choice([o for o in range(NUM_OPS) if o != arch[edge]])
  child = list(arch)
  child[edge] = op
  return tuple(child)


def _novel(rng: random.Random, propose: Callable[[], tuple[int, ...]],
           seen: set) -> tuple[int, ...]:
  """A proposal not in ``seen``: re-drawn, then uniform samples, as jaxnas' propose_batch."""
  for _ in range(MAX_TRIES):
    arch = propose()
    if arch not in seen:
      return arch
  for _ in range(MAX_FALLBACK_TRIES):
    arch = _random_arch(rng)
    if arch not in seen:
      return arch
  return arch


def regularized_evolution(dataset: str, seed: int, budget: int = 100, population_size: int = 10,
                          tournament_size: int = 3, count_duplicates: bool = True,
                          mutation: str = "edge") -> PeerResult:
  """Regularized evolution for ``budget`` evaluations (see module docstring)."""
  val, test = load_tables(dataset)
  rng = random.Random(seed)
  population: list[tuple[tuple[int, ...], float]] = []  # oldest first
  history: list[tuple[int, ...]] = []
  seen: set = set()

  def propose():
    if len(population) < population_size:
      return _random_arch(rng)
    sample = [rng.choice(population) for _ in range(tournament_size)]
    parent = max(sample, key=lambda m: m[1])  # first of the fittest, as the reference
    return _mutate(rng, parent[0], mutation)

  while len(history) < budget:
    arch = propose() if count_duplicates else _novel(rng, propose, seen)
    seen.add(arch)
    history.append(arch)
    population.append((arch, float(val[rank(arch)])))
    if len(population) > population_size:
      population.pop(0)  # aging: the oldest dies, however fit
  return _result(history, val, test)


def random_search(dataset: str, seed: int, budget: int = 100) -> PeerResult:
  """Uniform samples with replacement, every evaluation counted."""
  val, test = load_tables(dataset)
  rng = random.Random(seed)
  return _result([_random_arch(rng) for _ in range(budget)], val, test)


def tpe_available() -> bool:
  try:
    import optuna  # noqa: F401
  except ImportError:
    return False
  return True


def tpe(dataset: str, seed: int, budget: int = 100) -> PeerResult:
  """Optuna TPE (default settings, seeded) for ``budget`` trials; repeats are counted."""
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  val, test = load_tables(dataset)
  history: list[tuple[int, ...]] = []

  def objective(trial):
    arch = tuple(OPS.index(trial.suggest_categorical(f"edge{e}", OPS)) for e in range(NUM_EDGES))
    history.append(arch)
    return float(val[rank(arch)])

  study = optuna.create_study(direction="maximize",
                              sampler=optuna.samplers.TPESampler(seed=seed))
  study.optimize(objective, n_trials=budget)
  return _result(history, val, test)


# name -> (description, run(dataset, seed, budget) -> PeerResult, available() -> bool)
PEERS = {
    "python_re": ("plain-Python RE, repeats counted (NB201 R_EA, edge-uniform mutation)",
                  lambda d, s, b: regularized_evolution(d, s, b, count_duplicates=True),
                  lambda: True),
    "python_re_nodup": ("plain-Python RE, repeats re-drawn and not counted (as jaxnas)",
                        lambda d, s, b: regularized_evolution(d, s, b, count_duplicates=False),
                        lambda: True),
    "python_re_node": ("plain-Python RE, repeats counted, NB201 code's node-then-edge mutation",
                       lambda d, s, b: regularized_evolution(d, s, b, count_duplicates=True,
                                                         mutation="node"),
                       lambda: True),
    "tpe": ("Optuna TPESampler(seed), 6 categorical params", tpe, tpe_available),
    "python_random": ("plain-Python random search, repeats counted", random_search,
                      lambda: True),
}


def run_peer(name: str, dataset: str, seeds: int, budget: int) -> dict:
  """Runs peer ``name`` for seeds 0..seeds-1: per-seed arrays and the wall time."""
  _, run, _ = PEERS[name]
  results = [run(dataset, s, budget) for s in range(seeds)]
  return {
      "test_accuracy": np.asarray([r.test_accuracy for r in results], np.float32),
      "val_accuracy": np.asarray([r.val_accuracy for r in results], np.float32),
      "trajectory": np.stack([r.trajectory for r in results]),
      "num_unique": np.asarray([r.num_unique for r in results], np.int32),
      "archs": [r.arch for r in results],
  }
