"""Successive halving and Hyperband over training epochs (Li et al., JMLR 2018).

``--strategy=hyperband`` with ``--evaluator=train``: ``--epochs`` is the
maximum fidelity R, ``--eta`` the halving rate and ``--rungs`` the number of
fidelities (R / eta^(rungs-1), ..., R / eta, R). A bracket samples n cells,
trains all of them at its lowest fidelity, keeps the best 1/eta, retrains those
from scratch at eta times the epochs, and so on; Hyperband cycles through the
brackets (most aggressive first) until ``--budget`` trainings are used.
``--rungs=1`` is plain random search at R, and a single bracket is successive
halving (``--hyperband_brackets=1``).

Every rung of every seed is *one* population-parallel call of the training
evaluator (the seeds' candidates are concatenated), so the expensive work is
the same compiled program as any other training search.

Because the search is driven by the proxy, the classic risk is that the best
cell at a low fidelity is not the best at the target. Each promotion therefore
logs the Spearman rank correlation between the promoted cells' scores at the
lower and the higher fidelity (``fidelity_correlation`` in metrics.jsonl and
results.json; null where it is undefined, e.g. fewer than 3 promoted cells).

Budget accounting: each training of a cell at any fidelity is one evaluation;
``epochs_used`` records the cost in epochs. The host state (bracket, rung,
per-seed candidates and history as decision vectors and floats) is saved as
JSON after each rung (``hyperband_state.json``, atomic), and the rung key is
``fold_in(PRNGKey(seed), rung_counter)``, so a killed search resumes at the
next rung and ends with the same results.json.
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxnas import distributed, host_loop
from jaxnas import results as results_lib
from jaxnas.checkpoint import truncate_log

STATE_FILE = "hyperband_state.json"


def spearman(a, b) -> float:
  """Spearman's rho with average ranks for ties (numpy only); NaN if undefined."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if len(a) < 3:
    return float("nan")

  def ranks(x):
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # average ranks of ties
      m = x == v
      r[m] = r[m].mean()
    return r

  ra, rb = ranks(a), ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def brackets(max_epochs: float, eta: int, rungs: int, num_brackets: int | None = None):
  """Hyperband's brackets: lists of rungs ``(num_cells, epochs)``, most aggressive first."""
  s_max = rungs - 1
  out = []
  for s in range(s_max, -1, -1):
    n = math.ceil((s_max + 1) / (s + 1) * eta ** s)
    out.append([(max(1, n // eta ** i), max_epochs * eta ** (i - s)) for i in range(s + 1)])
  return out[:num_brackets] if num_brackets else out


# Spaces up to this size draw new cells from the explicit pool of unseen ones.
ENUMERABLE = 1_000_000


@functools.lru_cache(maxsize=8)
def _network_ranks(space) -> np.ndarray:
  """Ranks of the canonical vectors of a conditional space (one per distinct network),
  ascending: those whose inactive decisions are already 0."""
  ranks = jnp.arange(space.size)
  canonical = jax.jit(jax.vmap(lambda i: space.rank(space.canonical(space.unrank(i)))))(ranks)
  return np.nonzero(np.asarray(canonical) == np.arange(space.size))[0]


@functools.lru_cache(maxsize=8)
def _large_space(space):
  """``(networks, is_canonical)`` of a space too large to enumerate here: its number of
  distinct networks (the box's size where it cannot be counted) and a host test of one
  vector (None in an unconditional space, where every vector is)."""
  if space.active is None:
    return space.size, None
  canonical = jax.jit(space.canonical)
  return (space.num_networks() or space.size,
          lambda v: tuple(np.asarray(canonical(np.asarray(v, np.int32))).tolist()) == v)


def novel_cells(space, seen: list, n: int, rng: np.random.Generator) -> list[list[int]]:
  """``n`` distinct networks, uniformly at random among those not in ``seen``, as canonical
  decision vectors (``Space.canonical``: a conditional space's inactive decisions 0, so
  two vectors are one network only if they are equal).

  Small spaces (NAS-Bench-201: 15,625 cells) draw from the pool of unseen ranks of
  canonical vectors; large ones (the DARTS space) draw vectors and reject repeats and,
  in a conditional space, non-canonical vectors: each network has exactly one canonical
  vector, so what is kept is uniform over networks. Ordered by rank (lexicographically),
  so the order does not depend on how they were drawn.
  """
  cards = space.cardinalities
  known = {tuple(int(d) for d in v) for v in seen}
  if space.size <= ENUMERABLE:
    pool = np.arange(space.size) if space.active is None else _network_ranks(space)
    networks, is_canonical = len(pool), None
  else:
    networks, is_canonical = _large_space(space)
  if networks - len(known) < n:
    raise ValueError(f"the {space.name} space has {networks - len(known)} unseen networks left, "
                     f"fewer than the {n} a bracket needs; lower --budget")
  if space.size <= ENUMERABLE:
    taken = (np.ravel_multi_index(np.asarray(sorted(known), np.int64).T, cards) if known
             else np.zeros(0, np.int64))
    ranks = np.sort(rng.choice(np.setdiff1d(pool, taken), n, replace=False))
    return np.stack(np.unravel_index(ranks, cards), -1).tolist()
  out = []
  while len(out) < n:
    v = tuple(int(rng.integers(k)) for k in cards)
    if v not in known and (is_canonical is None or is_canonical(v)):
      known.add(v)
      out.append(list(v))
  return sorted(out)


def _initial_state(config) -> dict:
  return {"bracket": 0, "rung": 0, "rung_counter": 0, "evaluations": 0, "epochs_used": 0.0,
          "seeds": [{"candidates": [], "history": [], "failed": 0}
                    for _ in range(config.num_seeds)],
          "correlations": []}


def run(config, workdir: str, make_evaluator_at, space, options: dict) -> dict:
  """Runs (or resumes) Hyperband in ``workdir``; returns results (without config) and writes
  timing.json."""
  eta, rungs = int(options.get("eta", 3)), int(options.get("rungs", 3))
  max_epochs = float(options["max_epochs"])
  schedule = brackets(max_epochs, eta, rungs, options.get("hyperband_brackets"))
  state_path = os.path.join(workdir, STATE_FILE)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(state_path):
    with open(state_path) as f:
      state = json.load(f)
    for seed_state in state["seeds"]:
      seed_state.setdefault("failed", 0)  # states written before failures were counted
    logging.info("resuming from hyperband state at rung %d", state["rung_counter"])
    if host_loop.primary():
      truncate_log(metrics_path, state["rung_counter"])
  else:
    state = _initial_state(config)
    if host_loop.primary() and os.path.exists(metrics_path):
      os.remove(metrics_path)
  # Across processes: every process has read the state (the same file: one workdir) before
  # process 0 writes the next, and nobody reads a log being cut. Every rung's scores come
  # back to every process (the evaluator gathers them), so the states stay equal.
  distributed.barrier("jaxnas-hyperband-start")
  evaluators = {}

  def done(rung_counter):
    n = schedule[state["bracket"] % len(schedule)][state["rung"]][0]
    return state["evaluations"] + n > config.budget

  def advance(rung_counter):
    """One rung of the current bracket: n cells per seed trained ``epochs`` epochs, in one call."""
    bracket = schedule[state["bracket"] % len(schedule)]
    n, epochs = bracket[state["rung"]]
    rung_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), rung_counter)
    archs = []
    for i, seed_state in enumerate(state["seeds"]):
      if state["rung"] == 0:  # a new bracket: n novel cells per seed
        rng = np.random.default_rng([config.seed + i, rung_counter])
        seed_state["candidates"] = novel_cells(space, [h[0] for h in seed_state["history"]],
                                               n, rng)
      archs.append(seed_state["candidates"][:n])
    vectors = np.asarray(archs, np.int32)  # [seeds, n, decisions]
    if epochs not in evaluators:
      evaluators[epochs] = make_evaluator_at(epochs)
    flat = jax.vmap(space.from_vector)(jnp.asarray(vectors.reshape(-1, space.num_decisions)))
    scores = np.asarray(evaluators[epochs].evaluate(rung_key, flat),
                        np.float64).reshape(vectors.shape[:2])
    failed = ~np.isfinite(scores)  # NaN/inf training: scored 0 (as every search does), counted
    scores = np.where(failed, 0.0, scores)
    line = {"step": rung_counter + 1, "bracket": state["bracket"],
            "rung": state["rung"], "epochs": epochs, "cells": n}
    rhos = []
    for i, seed_state in enumerate(state["seeds"]):
      previous = {tuple(h[0]): h[2] for h in seed_state["history"]
                  if state["rung"] and h[3] == rung_counter - 1}
      cells = vectors[i].tolist()
      for v, s in zip(cells, scores[i].tolist()):
        seed_state["history"].append([v, epochs, s, rung_counter])
      seed_state["failed"] += int(failed[i].sum())
      if previous:
        rhos.append(spearman([previous[tuple(v)] for v in cells], scores[i]))
      keep = max(1, n // eta)
      order = np.argsort(-scores[i], kind="stable")[:keep]
      seed_state["candidates"] = [cells[j] for j in order]
    if rhos:
      # null (not NaN, which is not JSON) where undefined: fewer than 3 cells, or ties only.
      rho = None if np.all(np.isnan(rhos)) else float(np.nanmean(rhos))
      state["correlations"].append({"bracket": state["bracket"], "from_epochs": epochs / eta,
                                    "to_epochs": epochs, "cells": n, "spearman": rho})
      line["fidelity_correlation"] = rho
    state["evaluations"] += n
    state["epochs_used"] += n * epochs  # per seed, like evaluations
    line.update(evaluations=state["evaluations"], best=float(scores.max(1).mean()),
                batch_mean=float(scores.mean()),
                failed=sum(seed_state["failed"] for seed_state in state["seeds"]))
    state["rung_counter"] = rung_counter + 1
    state["rung"] += 1
    if state["rung"] == len(bracket):
      state["bracket"], state["rung"] = state["bracket"] + 1, 0
    return state["rung_counter"], line

  def commit(rung_counter, line, seconds, elapsed):
    state["elapsed_s"] = elapsed
    host_loop.append_jsonl(metrics_path, [line])
    logging.info("rung %d (bracket %d, %d cells x %g epochs)  evaluations %d/%d  best %.2f%s "
                 "(%.1fs)", line["step"], line["bracket"], line["cells"], line["epochs"],
                 state["evaluations"], config.budget, line["best"],
                 f"  fidelity rho {line['fidelity_correlation']:.2f}"
                 if line.get("fidelity_correlation") is not None else "", seconds)
    host_loop.write_json_atomic(state_path, state)

  _, elapsed, stopped = host_loop.drive(state["rung_counter"], float(state.get("elapsed_s", 0.0)),
                                        advance, commit, done, config.max_hours)
  host_loop.write_json_atomic(os.path.join(workdir, "timing.json"), host_loop.timing(elapsed))
  return _results(config, space, state, max_epochs, stopped)


def _results(config, space, state, max_epochs, stopped) -> dict:
  runs = []
  for i, seed_state in enumerate(state["seeds"]):
    hist = seed_state["history"]
    if not hist:
      raise ValueError(f"--budget={config.budget} is smaller than the first rung")
    top = max(h[1] for h in hist)  # the incumbent is chosen at the highest fidelity reached
    best = max((h for h in hist if h[1] == top), key=lambda h: h[2])
    arch = space.from_vector(jnp.asarray(best[0], jnp.int32))
    runs.append({"seed": config.seed + i, "best_arch": space.encode(arch),
                 "best_score": round(best[2], 6), "best_epochs": best[1],
                 "trajectory": [round(x, 6) for x in np.maximum.accumulate(
                     [h[2] for h in hist]).tolist()],
                 "failed_evaluations": seed_state["failed"],
                 "duplicate_evaluations": 0})  # novel_cells: never a cell twice at one fidelity
  return results_lib.document(
      config, results_lib.summary_of(runs), runs,
      {"x": "trainings, all rungs", "y": "best validation accuracy so far, any fidelity (%)"},
      {"evaluations": config.budget, "evaluations_used": state["evaluations"],
       "epochs_used": state["epochs_used"], "max_epochs": max_epochs,
       "max_hours": config.max_hours, "stopped_early": stopped},
      fidelity_correlation=state["correlations"])
