"""Gaussian-process Bayesian optimisation over a local-plus-global candidate pool.

After ``num_init`` uniform samples, every step:
  1. warps the archive's fitness to normal scores by rank (a Gaussian copula,
     as in HEBO: Cowen-Rivers et al., JAIR 2022), so that the few very bad cells of a
     table do not set the scale of the many good ones, and standardises it;
  2. fits a Gaussian process with the kernel ``exp(-||f(a) - f(b)||^2 / (2 l^2))``
     on an encoding ``f`` of the decisions (the one-hot by default, so the kernel
     decays with the Hamming distance: the categorical kernel of COMBO, Oh et al.,
     NeurIPS 2019, and CoCaBO, Ru et al., ICML 2020); the lengthscale ``l`` and the
     noise are chosen by marginal likelihood over a small grid (type-II maximum
     likelihood, Rasmussen & Williams 2006, ch. 5);
  3. builds a candidate pool: every one-decision neighbour of the ``num_parents``
     fittest archived cells (the neighbourhood of local search, White, Nolen &
     Savani, UAI 2021, and the mutation pool of BANANAS, White, Neiswanger & Savani,
     AAAI 2021) plus ``num_random`` uniform samples, dropping archived and repeated
     cells;
  4. scores the pool by independent Thompson sampling (one draw from each
     candidate's posterior marginal, as BANANAS' ITS) and proposes the top
     ``batch_size``.
The neighbours make it climb like a local search ordered by the model; the
uniform samples, scored by the same draws, let it leave a basin when a cell
far away looks better, which greedy neighbours alone do not (the
settings tried, and why these won, are in experiments/NOTES_sample_efficiency.md).

The pool never enumerates the space, so the strategy runs unchanged on large
spaces (the DARTS cell) and with any evaluator. The whole step has fixed shapes
(the archive's empty rows are masked out of the GP) and is one jittable program;
all of it is a function of the archive and the key, so the state is empty and a
resumed search is the uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy.special import ndtri

from jaxnas.spaces import Space
from jaxnas.strategies.base import (Strategy, acquire, check_acquisition, contains, from_vectors,
                                    propose_batch)


@struct.dataclass
class GPState:
  pass


def rank_warp(y: jax.Array, mask: jax.Array) -> jax.Array:
  """Normal scores of the masked entries by rank (ties share their mean rank); 0 elsewhere."""
  n = jnp.maximum(mask.sum(), 1)
  pair = mask[None, :] & mask[:, None]
  less = jnp.sum(pair & (y[None, :] < y[:, None]), axis=1)
  equal = jnp.sum(pair & (y[None, :] == y[:, None]), axis=1)
  u = (less + 0.5 * equal) / n  # in (0, 1): equal >= 1 for a masked entry
  return jnp.where(mask, ndtri(u), 0.0)


def gp_bo(space: Space, num_init: int = 20, batch_size: int = 1, num_parents: int = 5,
          num_random: int = 2000, lengthscales: tuple = (1.0, 2.0, 4.0, 8.0),
          noises: tuple = (1e-3, 1e-2, 1e-1), acquisition: str = "its",
          encoding: str = "onehot", warp: str = "rank") -> Strategy:
  """GP-BO with a Hamming-type kernel and Thompson sampling over neighbours + uniform samples.

  acquisition: "its" (independent Thompson sampling), "ucb" (mean + std) or "mean".
  encoding: "onehot" (decisions one-hot) or "space" (``space.featurize``, e.g. the
    NAS-Bench-201 path encoding with the one-hot).
  warp: "rank" (normal scores by rank) or "none" (the fitness itself), standardised.
  """
  check_acquisition(acquisition)
  if encoding not in ("onehot", "space"):
    raise ValueError(f"encoding must be 'onehot' or 'space', got {encoding!r}")
  if warp not in ("rank", "none"):
    raise ValueError(f"warp must be 'rank' or 'none', got {warp!r}")
  for name, value in (("num_init", num_init), ("batch_size", batch_size),
                      ("num_parents", num_parents)):
    if int(value) < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if int(num_random) < 0:
    raise ValueError(f"num_random must be >= 0, got {num_random}")
  num_init, batch_size, num_parents, num_random = (int(num_init), int(batch_size),
                                                  int(num_parents), int(num_random))
  featurize = space.one_hot if encoding == "onehot" else space.featurize
  grid = [(float(l), float(s)) for l in lengthscales for s in noises]
  if not grid:
    raise ValueError("lengthscales and noises must not be empty")
  num_neighbours = space.num_neighbours
  num_candidates = num_parents * num_neighbours + num_random
  n_ranked = min(num_candidates, 4 * batch_size)

  def sq_dist(a, b):
    return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T, 0.0)

  @jax.custom_batching.sequential_vmap
  def acquisition_scores(k_its, vectors, fitness, mask, candidates):
    """Fits the GP to the archive and scores ``candidates`` (``float[C]``).

    Under a vmap over seeds this runs seed by seed, so that every seed's floats are
    computed as when it runs alone (as ``predictor``: XLA:CPU's batched and unbatched
    matrix products can round differently, and a Cholesky turns an ulp into another
    argmax).
    """
    y = jnp.where(mask, fitness, 0.0)
    if warp == "rank":
      y = rank_warp(y, mask)
    n = jnp.maximum(mask.sum(), 1)
    mean = jnp.sum(jnp.where(mask, y, 0.0)) / n
    std = jnp.sqrt(jnp.sum(jnp.where(mask, (y - mean) ** 2, 0.0)) / n) + 1e-6
    y = jnp.where(mask, (y - mean) / std, 0.0)
    x = jax.vmap(featurize)(vectors)
    d2 = sq_dist(x, x)
    pair = mask[:, None] & mask[None, :]
    eye = jnp.eye(mask.shape[0], dtype=bool)

    def factor(lengthscale, noise):
      # Unused rows are decoupled unit-variance points with target 0: they change
      # neither the posterior nor the marginal likelihood.
      k = jnp.where(pair, jnp.exp(-d2 / (2 * lengthscale ** 2)), 0.0)
      k = k + jnp.where(eye, jnp.where(mask, noise, 1.0), 0.0)
      chol = jnp.linalg.cholesky(k)
      alpha = jax.scipy.linalg.cho_solve((chol, True), y)
      lml = -0.5 * y @ alpha - jnp.sum(jnp.log(jnp.diagonal(chol)))
      return jnp.where(jnp.isfinite(lml), lml, -jnp.inf), chol, alpha

    lmls, chols, alphas = (jnp.stack(t) for t in zip(*(factor(l, s) for l, s in grid)))
    best = jnp.argmax(lmls)
    lengthscale = jnp.asarray([l for l, _ in grid])[best]
    chol, alpha = chols[best], alphas[best]
    xc = jax.vmap(featurize)(candidates)
    kc = jnp.where(mask[None, :], jnp.exp(-sq_dist(xc, x) / (2 * lengthscale ** 2)), 0.0)
    mu = kc @ alpha
    v = jax.scipy.linalg.solve_triangular(chol, kc.T, lower=True)
    sigma = jnp.sqrt(jnp.maximum(1.0 - jnp.sum(v * v, axis=0), 1e-10))
    return acquire(acquisition, k_its, mu, sigma)

  def init(key):
    del key
    return GPState()

  def ask(key, state, archive):
    k_pool, k_its, k_prop = jax.random.split(key, 3)
    mask = archive.valid()
    order = jnp.argsort(-archive.masked_fitness())
    parents = archive.vectors[order[:num_parents]]
    parent_ok = jnp.arange(num_parents) < archive.count
    neighbours = jax.vmap(space.neighbour_vectors)(parents).reshape(-1, space.num_decisions)
    samples = jax.vmap(space.sample_vector)(jax.random.split(k_pool, num_random))
    candidates = jnp.concatenate([neighbours, samples]) if num_random else neighbours
    usable = jnp.concatenate([jnp.repeat(parent_ok, num_neighbours),
                              jnp.ones((num_random,), bool)])
    seen = jax.vmap(lambda v: contains(space, archive, v))(candidates)
    # Repeats within the pool (by key, sorted: the pool is too large for pairwise tests).
    keys = jax.vmap(space.key_of)(candidates)
    by_key = jnp.argsort(keys, stable=True)
    sorted_keys = keys[by_key]
    repeat_sorted = jnp.concatenate([jnp.zeros((1,), bool), sorted_keys[1:] == sorted_keys[:-1]])
    repeat = jnp.zeros_like(repeat_sorted).at[by_key].set(repeat_sorted)
    score = jnp.where(seen | repeat | ~usable, -jnp.inf,
                      acquisition_scores(k_its, archive.vectors, archive.fitness, mask,
                                         candidates))
    _, top = jax.lax.top_k(score, n_ranked)
    ranked = candidates[top]
    ranked_ok = jnp.isfinite(score[top])
    warm = archive.count >= num_init

    def propose(k, i, t):
      j = jnp.minimum(i + t * batch_size, n_ranked - 1)
      use = warm & (i + t * batch_size < n_ranked) & ranked_ok[j]
      return jnp.where(use, ranked[j], space.sample_vector(k))

    vectors, _ = propose_batch(k_prop, space, archive, batch_size, propose)
    return from_vectors(space, vectors), state

  def tell(key, archs, fitness, state, archive):
    del key, archs, fitness, archive
    return state, {}

  return Strategy("gp_bo", space, batch_size, init, ask, tell)
