"""Hyperband's host logic in both spaces, with a cheap deterministic evaluator (no training:
the real-training Hyperband search is in test_train_search.py)."""

import json
import os

import jax
import numpy as np
import pytest

from jaxnas import multifidelity, runner
from jaxnas.spaces import darts_space, nb201_space

from byo_model import SPACE as BYO_SPACE  # conditional: kernel.1 exists only at depth 2


@pytest.mark.parametrize("space", [nb201_space(), darts_space()], ids=lambda s: s.name)
def test_novel_cells_are_distinct_valid_unseen_and_sorted(space):
  rng = np.random.default_rng(0)
  seen = multifidelity.novel_cells(space, [], 20, rng)
  new = multifidelity.novel_cells(space, seen, 30, rng)
  cells = seen + new
  assert len({tuple(v) for v in cells}) == 50
  for v in cells:
    space.validate_vector(np.asarray(v))
  assert new == sorted(new)


def test_novel_cells_exhaust_a_small_space_and_then_refuse():
  space = nb201_space()
  everything = multifidelity.novel_cells(space, [], space.size, np.random.default_rng(1))
  ranks = np.asarray(jax.vmap(space.rank)(np.asarray(everything, np.int32)))
  np.testing.assert_array_equal(ranks, np.arange(space.size))  # all of them, in rank order
  with pytest.raises(ValueError, match="unseen networks left"):
    multifidelity.novel_cells(space, everything[1:], 2, np.random.default_rng(1))


@pytest.mark.parametrize("enumerate_pool", [True, False], ids=["pool", "rejection"])
def test_novel_cells_of_a_conditional_space_are_distinct_networks(enumerate_pool, monkeypatch):
  """A declared space with conditions: every drawn vector is canonical (inactive decisions
  0), so distinct vectors are distinct networks, and all num_networks() of them (not the
  box's size) are drawn before the space refuses; both the enumerated pool and the
  rejection sampler of large spaces."""
  if not enumerate_pool:
    monkeypatch.setattr(multifidelity, "ENUMERABLE", 0)
  space = BYO_SPACE
  total = space.num_networks()
  assert total < space.size  # 24 networks, 32 vectors
  rng = np.random.default_rng(2)
  first = multifidelity.novel_cells(space, [], 10, rng)
  rest = multifidelity.novel_cells(space, first, total - 10, rng)
  cells = first + rest
  canonical = np.asarray(jax.vmap(space.canonical)(np.asarray(cells, np.int32)))
  np.testing.assert_array_equal(canonical, cells)
  assert len({tuple(v) for v in cells}) == total
  strings = {space.encode(space.from_vector(np.asarray(v, np.int32))) for v in cells}
  assert len(strings) == total
  with pytest.raises(ValueError, match="0 unseen networks left"):
    multifidelity.novel_cells(space, cells, 1, rng)


@pytest.mark.parametrize("enumerate_pool", [True, False], ids=["pool", "rejection"])
def test_novel_cells_are_uniform_over_networks(enumerate_pool, monkeypatch):
  """Networks with an inactive decision are drawn no more often than the others (as
  canonicalised uniform vectors would be: one block as often as two, though 8 of the 24
  networks have one block)."""
  if not enumerate_pool:
    monkeypatch.setattr(multifidelity, "ENUMERABLE", 0)
  rng = np.random.default_rng(0)
  draws = [multifidelity.novel_cells(BYO_SPACE, [], 1, rng)[0] for _ in range(2400)]
  shallow = np.mean([v[1] == 0 for v in draws])  # decision 1: depth (1, 2)
  assert abs(shallow - 8 / 24) < 0.04, shallow


class _Scorer:
  """Deterministic 'accuracy': a fixed random weighting of the decisions, scaled by epochs."""

  def __init__(self, space, epochs):
    self.space, self.epochs = space, epochs
    self.w = np.random.default_rng(7).normal(size=space.num_decisions)

  def evaluate(self, key, archs):
    del key
    vectors = np.asarray(jax.vmap(self.space.to_vector)(archs))
    return vectors @ self.w * self.epochs


def test_hyperband_promotes_the_best_cells_in_the_darts_space(tmp_path):
  space = darts_space()
  config = runner.SearchConfig(evaluator="train", dataset="fashion_mnist", strategy="hyperband",
                               space="darts", budget=9, num_seeds=2)
  evaluators = []

  def at(epochs):
    evaluators.append(_Scorer(space, epochs))
    return evaluators[-1]

  options = {"eta": 3, "rungs": 2, "hyperband_brackets": 1, "max_epochs": 3.0}
  results = multifidelity.run(config, str(tmp_path), at, space, options)
  assert [e.epochs for e in evaluators] == [1.0, 3.0]  # one evaluator per fidelity
  state = json.load(open(os.path.join(tmp_path, multifidelity.STATE_FILE)))
  w = evaluators[0].w
  for run, seed_state in zip(results["runs"], state["seeds"]):
    hist = seed_state["history"]  # [vector, epochs, score, rung counter]
    # Two brackets of (3 cells x 1 epoch, the best 1 x 3 epochs); the second has new cells.
    assert [(h[1], h[3]) for h in hist] == [(1.0, 0)] * 3 + [(3.0, 1)] + [(1.0, 2)] * 3 + [
        (3.0, 3)]
    assert len({tuple(h[0]) for h in hist if h[1] == 1.0}) == 6
    for low, high in ((hist[0:3], hist[3]), (hist[4:7], hist[7])):
      assert high[0] == max(low, key=lambda h: h[2])[0]
      assert high[2] == pytest.approx(np.dot(high[0], w) * 3.0)
    high = [hist[3], hist[7]]
    top = max(high, key=lambda h: h[2])
    assert run["best_score"] == pytest.approx(np.dot(top[0], w) * 3.0)
    assert run["best_arch"] == space.encode(space.from_vector(np.asarray(top[0], np.int32)))
    assert run["best_arch"].startswith("Genotype(")
  assert results["budget"]["evaluations_used"] == 8
  # One promoted cell per bracket: no rank correlation, recorded as JSON null (not NaN).
  assert [c["spearman"] for c in results["fidelity_correlation"]] == [None, None]
  for line in open(os.path.join(tmp_path, "metrics.jsonl")):
    json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


class _FailingScorer(_Scorer):
  """A positive ``_Scorer`` (accuracies are), whose training 'diverges' (NaN) for every cell
  whose first edge is op 0."""

  def evaluate(self, key, archs):
    scores = 1.0 + np.abs(super().evaluate(key, archs))
    return np.where(np.asarray(jax.vmap(self.space.to_vector)(archs))[:, 0] == 0, np.nan, scores)


def test_hyperband_scores_failed_trainings_zero_and_counts_them(tmp_path):
  space = nb201_space()
  config = runner.SearchConfig(evaluator="train", dataset="fashion_mnist", strategy="hyperband",
                               budget=40, num_seeds=3)
  options = {"eta": 3, "rungs": 2, "max_epochs": 3.0}
  results = multifidelity.run(config, str(tmp_path), lambda e: _FailingScorer(space, e + 10.0),
                              space, options)
  state = json.load(open(os.path.join(tmp_path, multifidelity.STATE_FILE)))
  total = 0
  for run, seed_state in zip(results["runs"], state["seeds"]):
    failed = [h for h in seed_state["history"] if h[0][0] == 0]
    assert failed and all(h[2] == 0.0 for h in failed)  # scored 0, not NaN
    assert run["failed_evaluations"] == len(failed)
    assert not run["best_arch"].startswith("|none~0|")  # a failed cell never wins
    total += len(failed)
  lines = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
           for x in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert lines[-1]["failed"] == total
  assert [x["failed"] for x in lines] == sorted(x["failed"] for x in lines)  # cumulative


def test_hyperband_on_a_declared_space_reports_its_string_form(tmp_path):
  """Hyperband over a user model's conditional space: distinct networks per bracket, and
  each run's best_arch is the space's ``encode`` form, which ``decode`` (``--arch``) takes."""
  space = BYO_SPACE
  config = runner.SearchConfig(evaluator="train", dataset="fashion_mnist", strategy="hyperband",
                               model="byo_model:MODEL", budget=12, num_seeds=2)
  options = {"eta": 2, "rungs": 2, "max_epochs": 2.0}
  results = multifidelity.run(config, str(tmp_path), lambda e: _Scorer(space, e), space, options)
  assert results["config"]["model"] == "byo_model:MODEL" and "space" not in results["config"]
  state = json.load(open(os.path.join(tmp_path, multifidelity.STATE_FILE)))
  for run, seed_state in zip(results["runs"], state["seeds"]):
    first_rungs = [tuple(h[0]) for h in seed_state["history"] if h[1] < 2.0]
    assert len(set(first_rungs)) == len(first_rungs)
    arch = space.decode(run["best_arch"])
    assert space.encode(arch) == run["best_arch"]
    assert list(np.asarray(space.to_vector(arch))) in [h[0] for h in seed_state["history"]]
