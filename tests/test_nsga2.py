"""NSGA-II: non-dominated sorting and crowding against brute force, elitist selection, and
fronts that beat random search's and evolution's in hypervolume on NAS-Bench-201.

(The protocol, jit, vmap-over-seeds and no-duplicate checks run for every strategy in
test_strategies.py.)"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import jaxnas
from jaxnas import pareto, runner
from jaxnas.strategies.nsga2 import front_crowding, survivors


def _brute_ranks(v, valid):
  """Deb et al.'s fronts by repeated peeling, written out with Python loops."""
  n = len(v)
  rank = np.full(n, n)
  remaining = {i for i in range(n) if valid[i]}
  front = 0
  while remaining:
    current = {i for i in remaining
               if not any(np.all(v[j] >= v[i]) and np.any(v[j] > v[i]) for j in remaining)}
    for i in current:
      rank[i] = front
    remaining -= current
    front += 1
  return rank


def _brute_crowding(v, members):
  """Crowding distance of ``members`` (a list of row indices of one front)."""
  dist = {i: 0.0 for i in members}
  for j in range(v.shape[1]):
    order = sorted(members, key=lambda i: v[i, j])
    span = v[order[-1], j] - v[order[0], j]
    dist[order[0]] = dist[order[-1]] = np.inf
    for k in range(1, len(order) - 1):
      if span > 0:
        dist[order[k]] += (v[order[k + 1], j] - v[order[k - 1], j]) / span
  return dist


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_crowding_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  n, m = 24, 2 + seed % 2
  # Distinct values per objective (crowding's order is then unambiguous); a few rows invalid.
  v = np.stack([rng.permutation(n) for _ in range(m)], 1).astype(np.float32)
  valid = rng.random(n) > 0.15
  rank = np.asarray(pareto.non_dominated_rank(jnp.asarray(v), jnp.asarray(valid)))
  np.testing.assert_array_equal(rank, _brute_ranks(v, valid))
  crowd = np.asarray(front_crowding(jnp.asarray(v), jnp.asarray(rank), jnp.asarray(valid)))
  for r in set(rank[valid].tolist()):
    members = [i for i in range(n) if valid[i] and rank[i] == r]
    for i, d in _brute_crowding(v, members).items():
      assert crowd[i] == pytest.approx(d, rel=1e-5), (r, i)
  assert np.all(crowd[~valid] == 0)


def test_survivors_fill_by_fronts_then_by_spread():
  # Front 0: (0, 4), (2, 2), (4, 0) and the middle point (1, 3); front 1: (0, 3), (3, 0);
  # front 2: (0, 0). Invalid rows (huge values) must never be kept.
  v = jnp.asarray([[0, 0], [0, 4], [1, 3], [2, 2], [4, 0], [0, 3], [3, 0], [9, 9]], jnp.float32)
  valid = jnp.asarray([True] * 7 + [False])
  keep, rank, crowding = survivors(v, valid, 4)
  keep = np.asarray(keep).tolist()
  # All four of front 0, boundaries first (infinite crowding).
  assert sorted(keep) == [1, 2, 3, 4] and np.all(np.asarray(rank) == 0)
  assert set(keep[:2]) == {1, 4} and np.isinf(np.asarray(crowding)[:2]).all()
  keep, rank, _ = survivors(v, valid, 6)
  assert sorted(np.asarray(keep).tolist()) == [1, 2, 3, 4, 5, 6]
  # Three of front 0's four points: the boundaries, then (2, 2), whose neighbours span more
  # of both objectives than (1, 3)'s (crowding 1.0 + 1.0 vs 0.5 + 0.5 after scaling).
  keep, _, _ = survivors(v, valid, 3)
  assert sorted(np.asarray(keep).tolist()) == [1, 3, 4]


def test_nsga2_checks_its_settings():
  space = jaxnas.nb201_space()
  with pytest.raises(ValueError, match=r"costs must map 10 architectures to float32\[10, K\]"):
    jaxnas.STRATEGIES["nsga2"](space, costs=lambda archs: jnp.zeros((10,)))
  with pytest.raises(ValueError, match="population_size"):
    jaxnas.STRATEGIES["nsga2"](space, population_size=1)


def test_hypervolume_2d_against_hand_areas():
  # Staircase of (3, 1), (2, 2), (1, 3) above (0, 0): 3*1 + 2*1 + 1*1 = 6; a dominated
  # point, duplicates and points not above the reference add nothing.
  pts = [(1, 3), (3, 1), (2, 2), (1, 1), (2, 2), (-1, 5)]
  assert pareto.hypervolume_2d(pts) == pytest.approx(6.0)
  assert pareto.hypervolume_2d(pts, reference=(1, 0)) == pytest.approx(2 * 1 + 1 * 1)
  assert pareto.hypervolume_2d(np.zeros((0, 2))) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_front_mask_2d_equals_the_dominance_matrix_front(seed):
  """The host-side O(N log N) front is ``pareto_front_mask``'s, ties and duplicates included."""
  pts = np.random.default_rng(seed).integers(0, 12, (300, 2)).astype(np.float32)
  want = np.asarray(pareto.pareto_front_mask(jnp.asarray(pts)))
  np.testing.assert_array_equal(pareto.front_mask_2d(pts), want)
  assert pareto.front_mask_2d(np.zeros((0, 2))).shape == (0,)


def test_table_front_gaps_span_zero_to_hundred():
  """The table's own front has gap 0, the worst corner 100, a single front cell between."""
  evaluator = jaxnas.nb201_evaluator("cifar10")
  archs = evaluator.space.enumerate()
  acc = np.asarray(evaluator.evaluate(None, archs))
  params = np.asarray(evaluator.report(archs)["params"])
  mask = pareto.front_mask_2d(np.stack([acc, -params], -1))
  front = [{"accuracy": a, "params": p} for a, p in zip(acc[mask], params[mask])]
  worst = [{"accuracy": acc.min(), "params": params.max()}]
  table = pareto.TableFront(evaluator, "params")
  assert table.size == len(front)
  gaps = table.gaps([front, worst, front[:1]])
  assert gaps[0] == pytest.approx(0.0, abs=1e-9)
  assert gaps[1] == pytest.approx(100.0)
  assert 0 < gaps[2] < 100


def _hypervolume_gaps(table, strategy, seeds, tmp_path):
  """Per-run gap (%) of the (accuracy, params) front's hypervolume to the ``table``'s."""
  config = runner.SearchConfig(strategy=strategy, budget=100, num_seeds=seeds,
                               objectives=("accuracy", "params"))
  runner.run(config, str(tmp_path / strategy))
  with open(tmp_path / strategy / "pareto.json") as f:
    fronts = json.load(f)["per_run"]
  return table.gaps(fronts)


def test_nsga2_fronts_beat_random_and_evolution_in_hypervolume(tmp_path):
  """Budget 100, 100 seeds, NB201 cifar10, accuracy vs parameters: NSGA-II's per-run fronts
  cover more of the table's front than random search's or (accuracy-driven) evolution's, by
  more than 3 standard errors. Measured (experiments/bench_pareto.py, these seeds): gaps of
  1.22 / 1.95 / 2.09 % (standard errors 0.07 / 0.06 / 0.10)."""
  table = pareto.TableFront(jaxnas.nb201_evaluator("cifar10"), "params")
  gaps = {s: _hypervolume_gaps(table, s, 100, tmp_path) for s in ("nsga2", "random", "evolution")}
  for other in ("random", "evolution"):
    diff = gaps[other].mean() - gaps["nsga2"].mean()
    se = np.sqrt(gaps[other].var(ddof=1) / 100 + gaps["nsga2"].var(ddof=1) / 100)
    assert diff > 3 * se, f"nsga2 {gaps['nsga2'].mean():.3f} vs {other} {gaps[other].mean():.3f}"


def test_nsga2_cli_settings():
  runner.validate(runner.SearchConfig(strategy="nsga2", objectives=("accuracy", "flops"),
                                      strategy_args=(("population_size", 20),)))
  with pytest.raises(runner.UserError, match="--population does not apply to --strategy=nsga2"):
    runner.validate(runner.SearchConfig(strategy="nsga2", strategy_args=(("batch_size", 4),)))


def test_nsga2_search_resumes_bit_identically(tmp_path):
  """A multi-objective search cut after its second generation's checkpoint ends with the
  same results, front and metrics as the uncut one."""
  config = runner.SearchConfig(strategy="nsga2", budget=50, num_seeds=3, checkpoint_every=1,
                               objectives=("accuracy", "params", "flops"),
                               strategy_args=(("population_size", 10),))
  full, cut = tmp_path / "full", tmp_path / "cut"
  runner.run(config, str(full))
  shutil.copytree(full, cut)
  for name in ("results.json", "pareto.json"):
    os.remove(cut / name)
  for step in os.listdir(cut / "checkpoints"):
    if step.isdigit() and int(step) > 2:
      shutil.rmtree(cut / "checkpoints" / step)
  assert runner.run(config, str(cut))["already_finished"] is False
  for name in ("results.json", "pareto.json", "metrics.jsonl"):
    assert (cut / name).read_bytes() == (full / name).read_bytes(), name
