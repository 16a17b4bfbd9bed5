"""Predictor-guided search in the style of BANANAS (White, Neiswanger & Savani, AAAI 2021).

After ``num_init`` uniform samples, every step:
  1. trains an ensemble of ``ensemble_size`` small MLPs (one-hot encoding of the
     decisions -> standardised fitness) from scratch on the archive, all members
     in one vmapped optax loop;
  2. builds a pool of candidates by mutating the best archived architectures
     (one or two decisions; BANANAS' "mutation" acquisition optimiser) plus a
     share of uniform samples, dropping archived and repeated ones;
  3. scores the pool with independent Thompson sampling (ITS: one draw from
     N(ensemble mean, ensemble std) per candidate) and proposes the top
     ``batch_size``.
Training is a fixed number of full-batch Adam steps with the archive's empty
rows masked out, so the whole step is one fixed-shape jittable program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxnas.spaces import Space
from jaxnas.strategies.base import (Strategy, acquire, check_acquisition, contains, from_vectors,
                                    propose_batch)


@struct.dataclass
class PredictorState:
  pass


def _mlp_init(key, sizes):
  params = []
  for k, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
    w = jax.random.normal(k, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_in)
    params.append((w, jnp.zeros((fan_out,))))
  return params


def _mlp_apply(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return (x @ w + b)[..., 0]


def predictor_search(space: Space, num_init: int = 10, batch_size: int = 10,
                     ensemble_size: int = 5, hidden: int = 32, layers: int = 2,
                     train_steps: int = 200, learning_rate: float = 1e-2,
                     weight_decay: float = 1e-4, num_candidates: int = 100,
                     num_parents: int = 10, random_fraction: float = 0.1,
                     pool: str = "mutation", encoding: str = "onehot",
                     acquisition: str = "its") -> Strategy:
  """BANANAS-style search with an MLP ensemble and ITS acquisition.

  pool: "mutation" (BANANAS' mutation acquisition optimiser) or "all" (score
    every unevaluated architecture; spaces of at most 100,000 only).
  encoding: "onehot" (decisions one-hot) or "space" (``space.featurize``, e.g.
    the NAS-Bench-201 path encoding).
  acquisition: "its" (independent Thompson sampling), "ucb" (mean + std) or
    "mean" (pure exploitation).
  """
  check_acquisition(acquisition)
  if pool not in ("mutation", "all"):
    raise ValueError(f"pool must be 'mutation' or 'all', got {pool!r}")
  if pool == "all" and space.size > 100_000:
    raise ValueError(f"pool='all' needs a small space; {space.name} has {space.size} architectures")
  if encoding not in ("onehot", "space"):
    raise ValueError(f"encoding must be 'onehot' or 'space', got {encoding!r}")
  featurize = space.one_hot if encoding == "onehot" else space.featurize
  if pool == "all":
    num_candidates = space.size
  num_features = jax.eval_shape(featurize, jnp.zeros((space.num_decisions,), jnp.int32)).shape[0]
  sizes = [num_features] + [hidden] * layers + [1]
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
  n_random = int(round(num_candidates * random_fraction))

  def fit_ensemble(key, x, y, mask):
    def train_one(k):
      params = _mlp_init(k, sizes)

      def loss_fn(p):
        err = (_mlp_apply(p, x) - y) ** 2
        return jnp.sum(jnp.where(mask, err, 0.0)) / jnp.maximum(mask.sum(), 1)

      def step(carry, _):
        p, s = carry
        g = jax.grad(loss_fn)(p)
        u, s = optimizer.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

      (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None,
                                    length=train_steps)
      return params

    return jax.vmap(train_one)(jax.random.split(key, ensemble_size))

  @jax.custom_batching.sequential_vmap
  def acquisition_scores(k_fit, k_its, vectors, fitness, mask, candidates):
    """Fits the ensemble to the archive and scores ``candidates`` (``float[C]``).

    Under a vmap over seeds this runs seed by seed (a loop), so every seed's
    floats are computed exactly as when it runs alone: XLA:CPU's batched and
    unbatched matmuls and reductions can round differently (measured on an AMD
    EPYC without AVX-512: vmap changed one seed's 16th architecture), and 200
    training steps turn an ulp into another top-k. The integer work around it
    (pools, dedup, proposals) stays vectorised.
    """
    fit = jnp.where(mask, fitness, 0.0)
    n = jnp.maximum(mask.sum(), 1)
    mean = jnp.sum(fit) / n
    std = jnp.sqrt(jnp.sum(jnp.where(mask, (fit - mean) ** 2, 0.0)) / n) + 1e-6
    ensemble = fit_ensemble(k_fit, jax.vmap(featurize)(vectors), (fit - mean) / std, mask)
    feats = jax.vmap(featurize)(candidates)
    preds = jax.vmap(lambda p: _mlp_apply(p, feats))(ensemble)  # [E, C]
    return acquire(acquisition, k_its, preds.mean(0), preds.std(0))

  def init(key):
    del key
    return PredictorState()

  def ask(key, state, archive):
    k_fit, k_pool, k_its, k_prop = jax.random.split(key, 4)
    mask = archive.valid()

    # Candidate pool: mutations of the best archived architectures + uniform samples.
    order = jnp.argsort(-archive.masked_fitness())
    n_parents = jnp.clip(archive.count, 1, num_parents)
    n_mut = num_candidates - n_random

    def mutant(k, c):
      k1, k2, k3 = jax.random.split(k, 3)
      parent = archive.vectors[order[c % n_parents]]
      child = space.mutate_vector(k1, parent)
      return jnp.where(jax.random.bernoulli(k3), space.mutate_vector(k2, child), child)

    if pool == "all":
      candidates = space.unrank(jnp.arange(space.size))
      seen = jnp.zeros((space.size,), bool).at[archive.keys].max(mask, mode="drop")
      repeat = jnp.zeros((space.size,), bool)
    else:
      keys = jax.random.split(k_pool, num_candidates)
      candidates = jnp.concatenate([
          jax.vmap(mutant)(keys[:n_mut], jnp.arange(n_mut)),
          jax.vmap(space.sample_vector)(keys[n_mut:])])
      seen = jax.vmap(lambda v: contains(space, archive, v))(candidates)
      same = jnp.all(candidates[:, None] == candidates[None], -1)
      repeat = jnp.any(jnp.tril(same, -1), axis=1)  # equal to an earlier candidate

    score = jnp.where(seen | repeat, -jnp.inf,
                      acquisition_scores(k_fit, k_its, archive.vectors, archive.fitness, mask,
                                         candidates))
    n_ranked = min(num_candidates, 4 * batch_size)
    _, top = jax.lax.top_k(score, n_ranked)
    ranked = candidates[top]

    # Before the predictor has data, propose uniform samples.
    warm = archive.count >= num_init

    def propose(k, i, t):
      j = i + t * batch_size
      return jnp.where(warm & (j < n_ranked),
                       ranked[jnp.minimum(j, n_ranked - 1)], space.sample_vector(k))

    vectors, _ = propose_batch(k_prop, space, archive, batch_size, propose)
    return from_vectors(space, vectors), state

  def tell(key, archs, fitness, state, archive):
    del key, archs, fitness, archive
    return state, {}

  return Strategy("predictor", space, batch_size, init, ask, tell)
