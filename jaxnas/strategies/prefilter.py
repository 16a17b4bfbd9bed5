"""Cheap-score prefiltering for any strategy: propose more, keep the best by a proxy.

``prefiltered(strategy, score_fn, factor)`` wraps a strategy so that each
``ask`` draws ``factor`` batches from the inner ``ask`` (fresh keys, same
state) and keeps the ``batch_size`` best by ``score_fn``, a jittable batch
scorer such as a zero-cost proxy (Abdelfattah et al. 2021 warm-up and move
proposal; Mellor et al. 2021 "NASWOT + search"). Only the kept cells reach
the (expensive) evaluator and the budget. The strategy never imports an
evaluator: ``score_fn`` is any ``archs -> float32[N]``, e.g.
``jaxnas.estimators.zero_cost_evaluator("naswot").evaluate`` with a key bound.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxnas.strategies.base import Strategy, to_vectors


def prefiltered(strategy: Strategy, score_fn: Callable, factor: int = 4) -> Strategy:
  """``strategy`` whose every ask keeps the best ``1/factor`` of ``factor`` inner asks by ``score_fn``.

  The inner asks share the incoming state and the returned state is the
  first one's: correct for strategies whose ``ask`` leaves the state as it
  found it (all of jaxnas's; their learning happens in ``tell``, which sees
  exactly the kept, evaluated cells). Each inner batch is novel with respect
  to the archive; duplicates across the inner batches and NaN scores rank as
  ``-inf``, so the kept batch stays novel unless fewer distinct cells came up.
  """
  if factor < 1:
    raise ValueError(f"factor must be >= 1, got {factor}")
  space, b = strategy.space, strategy.batch_size

  def ask(key, state, archive):
    archs, states = jax.vmap(lambda k: strategy.ask(k, state, archive))(
        jax.random.split(key, factor))
    flat = jax.tree_util.tree_map(lambda x: x.reshape((factor * b,) + x.shape[2:]), archs)
    vectors = to_vectors(space, flat)
    scores = jnp.asarray(score_fn(flat), jnp.float32)
    dup = jnp.any(jnp.triu(jnp.all(vectors[:, None] == vectors[None], -1), 1), axis=0)
    _, idx = jax.lax.top_k(jnp.where(dup | jnp.isnan(scores), -jnp.inf, scores), b)
    return (jax.tree_util.tree_map(lambda x: x[idx], flat),
            jax.tree_util.tree_map(lambda x: x[0], states))

  return Strategy(f"{strategy.name}+prefilter{factor}", space, b, strategy.init, ask,
                  strategy.tell)
