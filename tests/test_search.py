"""The search loop: budget accounting, trajectories, failed evaluations, chunking."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnas
from jaxnas import runner
from jaxnas.estimators.nb201 import load_table
from jaxnas.search import make_search, results_of
from jaxnas.strategies import STRATEGIES

from conftest import fast_jit, tiny_space


def _run(search, key):
  state = search.init(key)
  state, metrics = search.run_chunk(state, jnp.int32(0), search.num_steps)
  return state, metrics


def _run_seeds(search, num_seeds):
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(num_seeds))
  return jax.device_get(fast_jit(jax.vmap(functools.partial(_run, search)))(keys))


def _seed(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


@pytest.mark.parametrize("name,kwargs,budget,steps", [
    ("predictor", {"batch_size": 10, "train_steps": 20, "ensemble_size": 2}, 95, 10),
    ("random", {"batch_size": 3}, 10, 4),
    ("evolution", {"batch_size": 4}, 37, 10),
    ("local", {}, 23, 23),
    ("nsga2", {"population_size": 8}, 37, 5),
])
def test_budget_is_exact(name, kwargs, budget, steps):
  evaluator = jaxnas.nb201_evaluator("cifar10")
  search = make_search(STRATEGIES[name](evaluator.space, **kwargs), evaluator, budget)
  assert search.num_steps == steps
  state, metrics = _run_seeds(search, 2)
  np.testing.assert_array_equal(state.archive.count, budget)
  np.testing.assert_array_equal(state.step, steps)
  np.testing.assert_array_equal(state.num_duplicates, 0)
  # The per-step evaluation count grows by the batch size, capped at the budget.
  b = search.strategy.batch_size
  np.testing.assert_array_equal(metrics["evaluations"][0],
                                np.minimum(b * np.arange(1, steps + 1), budget))
  r = jax.vmap(lambda s: results_of(search, s))(state)
  chex.assert_shape(r["trajectory"], (2, budget))
  for i in range(2):
    rows = state.archive.vectors[i, :budget]
    assert len(np.unique(rows, axis=0)) == budget
    # Rows past the budget are never counted: the best is among the first `budget` rows.
    assert int(r["best_index"][i]) < budget


@pytest.mark.parametrize("name", ["random", "evolution"])
def test_trajectory_and_best(name):
  evaluator = jaxnas.nb201_evaluator("cifar100")
  kwargs = {"train_steps": 20, "ensemble_size": 2} if name == "predictor" else {}
  search = make_search(STRATEGIES[name](evaluator.space, **kwargs), evaluator, 40)
  state, metrics = _run_seeds(search, 3)
  r = jax.device_get(jax.vmap(lambda s: results_of(search, s))(state))
  val = load_table()["val/cifar100"]
  test = load_table()["test/cifar100"]
  space = evaluator.space
  for i in range(3):
    traj = r["trajectory"][i]
    fitness = state.archive.fitness[i, :40]
    ranks = np.asarray(jax.vmap(space.rank)(jnp.asarray(state.archive.vectors[i, :40])))
    # The archive holds the table's validation accuracy of each evaluated cell.
    np.testing.assert_array_equal(fitness, val[ranks])
    assert (np.diff(traj) >= 0).all()
    np.testing.assert_array_equal(traj, np.maximum.accumulate(fitness))
    assert traj[-1] == r["best_score"][i] == fitness.max() == state.best[i]
    best_arch = _seed(r["best_arch"], i)
    again = evaluator.evaluate(None, best_arch[None])[0]
    assert float(again) == float(r["best_score"][i])
    assert float(r["report"]["test_accuracy"][i]) == test[space.rank(best_arch)]
    # The logged best-so-far per step agrees with the trajectory.
    b = search.strategy.batch_size
    steps = np.arange(1, search.num_steps + 1)
    np.testing.assert_array_equal(metrics["best"][i], traj[np.minimum(steps * b, 40) - 1])


def _failing_evaluator(threshold):
  """nb201/cifar10, but cells with validation accuracy >= threshold fail (NaN), and
  every 7th rank reports +inf (also a failure)."""
  base = jaxnas.nb201_evaluator("cifar10")
  space = base.space

  def evaluate(key, archs):
    fit = base.evaluate(key, archs)
    fit = jnp.where(fit >= threshold, jnp.nan, fit)
    return jnp.where(space.rank(archs) % 7 == 0, jnp.inf, fit)

  return jaxnas.Evaluator(name="failing", space=space, evaluate=evaluate, report=base.report,
                          jittable=True)


@pytest.mark.parametrize("name", ["random", "evolution", "local", "nsga2"])
def test_failed_evaluations(name):
  threshold = 83.0  # roughly the best 5% of cells fail
  evaluator = _failing_evaluator(threshold)
  search = make_search(STRATEGIES[name](evaluator.space), evaluator, 120)
  state, metrics = _run_seeds(search, 4)
  r = jax.device_get(jax.vmap(lambda s: results_of(search, s))(state))
  val = load_table()["val/cifar10"]
  space = evaluator.space
  for i in range(4):
    vectors = state.archive.vectors[i, :120]
    ranks = np.asarray(jax.vmap(space.rank)(jnp.asarray(vectors)))
    failed = (val[ranks] >= threshold) | (ranks % 7 == 0)
    assert failed.any(), "the test needs some failures"
    fitness = state.archive.fitness[i, :120]
    np.testing.assert_array_equal(fitness[failed], 0.0)
    np.testing.assert_array_equal(fitness[~failed], val[ranks[~failed]])
    assert int(state.num_failed[i]) == failed.sum() == int(r["num_failed"][i])
    assert int(metrics["failed"][i, -1]) == failed.sum()
    best_rank = int(space.rank(_seed(r["best_arch"], i)))
    assert not (val[best_rank] >= threshold or best_rank % 7 == 0)
    assert r["best_score"][i] == val[ranks[~failed]].max()
    assert np.isfinite(r["trajectory"][i]).all()


def test_all_failed_evaluations_never_win():
  space = tiny_space((3, 3))
  evaluator = jaxnas.Evaluator(
      name=space.name, space=space,
      evaluate=lambda key, archs: jnp.where(space.rank(archs) == 4, jnp.nan, -1.0 * space.rank(archs)),
      report=lambda archs: {}, jittable=True)
  search = make_search(STRATEGIES["random"](space), evaluator, 9, failed_fitness=-100.0)
  state, _ = _run_seeds(search, 2)
  r = jax.vmap(lambda s: results_of(search, s))(state)
  np.testing.assert_array_equal(state.num_failed, 1)
  # failed_fitness is what a failure is recorded as; the best is rank 0 (fitness -0).
  ranks = np.asarray(jax.vmap(jax.vmap(space.rank))(jnp.asarray(state.archive.vectors)))
  np.testing.assert_array_equal(state.archive.fitness[ranks == 4], -100.0)
  np.testing.assert_array_equal(np.asarray(jax.vmap(space.rank)(r["best_arch"])), 0)


def test_make_search_rejects_bad_budgets(tiny):
  space, evaluator = tiny
  strategy = STRATEGIES["random"](space)
  make_search(strategy, evaluator, 9)
  make_search(strategy, evaluator, 1)
  with pytest.raises(ValueError, match="exceeds"):
    make_search(strategy, evaluator, 10)
  for budget in (0, -3):
    with pytest.raises(ValueError, match="budget"):
      make_search(strategy, evaluator, budget)
  with pytest.raises(ValueError, match="darts"):
    make_search(STRATEGIES["random"](jaxnas.darts_space()), jaxnas.nb201_evaluator(), 10)


@pytest.mark.parametrize("name", ["reinforce"])
def test_run_chunk_past_the_end_is_a_no_op(name):
  evaluator = jaxnas.nb201_evaluator("cifar10")
  search = make_search(STRATEGIES[name](evaluator.space, batch_size=2), evaluator, 15)
  assert search.num_steps == 8
  chunk = fast_jit(search.run_chunk, static_argnums=2)
  state = search.init(jax.random.PRNGKey(3))
  full, _ = chunk(state, jnp.int32(0), 8)
  # A chunk entirely past the end changes nothing.
  after, metrics = chunk(full, jnp.int32(8), 3)
  chex.assert_trees_all_equal(after, full)
  assert not np.asarray(metrics["live"]).any()
  # A chunk that runs past the end stops at num_steps.
  partial, _ = chunk(state, jnp.int32(0), 6)
  end, metrics = chunk(partial, jnp.int32(6), 6)
  np.testing.assert_array_equal(metrics["live"], [True, True, False, False, False, False])
  assert int(end.step) == 8 and int(end.archive.count) == 15
  np.testing.assert_array_equal(end.archive.vectors, full.archive.vectors)
  np.testing.assert_array_equal(end.archive.fitness, full.archive.fitness)


@pytest.mark.parametrize("name", ["evolution", "local", "reinforce"])
def test_chunked_run_equals_uncut_run(name):
  """Resuming relies on this: steps derive their keys from (root key, step) only."""
  evaluator = jaxnas.nb201_evaluator("cifar10")
  search = make_search(STRATEGIES[name](evaluator.space), evaluator, 20)
  run = fast_jit(jax.vmap(search.run_chunk, in_axes=(0, None, None)), static_argnums=2)
  state = jax.vmap(search.init)(jax.vmap(jax.random.PRNGKey)(jnp.arange(3)))
  uncut, _ = run(state, jnp.int32(0), 20)
  chunked = state
  for first in range(0, 21, 7):  # chunks of 7; the last one runs past the end
    chunked, _ = run(chunked, jnp.int32(first), 7)
  np.testing.assert_array_equal(chunked.archive.vectors, uncut.archive.vectors)
  np.testing.assert_array_equal(chunked.archive.fitness, uncut.archive.fitness)
  chex.assert_trees_all_close(chunked, uncut, rtol=1e-6, atol=1e-6)


def test_host_driven_loop_matches_scanned_loop():
  """A non-jittable evaluator (real training) drives ask/tell from the host with equal results."""
  base = jaxnas.nb201_evaluator("cifar10")
  host = base._replace(jittable=False)
  results = []
  for evaluator in (base, host):
    search = make_search(STRATEGIES["evolution"](base.space, batch_size=2), evaluator, 30)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(3))
    state = jax.vmap(search.init)(keys)
    advance = runner.make_advance(search, 4, jax.random.PRNGKey(0))
    step = 0
    while step < search.num_steps:
      state, _ = advance(state, step)
      step = int(state.step[0])
    results.append(jax.device_get(state))
  np.testing.assert_array_equal(results[0].archive.vectors, results[1].archive.vectors)
  np.testing.assert_array_equal(results[0].archive.fitness, results[1].archive.fitness)
  search = make_search(STRATEGIES["random"](base.space), host, 5)
  with pytest.raises(ValueError, match="jittable"):
    search.run_chunk(search.init(jax.random.PRNGKey(0)), jnp.int32(0), 5)
