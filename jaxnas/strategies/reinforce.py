"""REINFORCE over a factorised categorical policy (Williams 1992; Zoph & Le 2017).

The policy is one independent categorical per decision, logits float32[D, K]
(choices beyond a decision's cardinality are masked out), as in the REINFORCE
baseline of NAS-Bench-201 (Dong & Yang 2020). Each step samples ``batch_size``
architectures, and after evaluation takes one optax step on

    loss = -mean_b (r_b - baseline) * log pi(a_b),    r = fitness / 100,

with an exponential moving-average baseline. Samples that were already
evaluated are re-drawn (no architecture is counted twice against the budget);
this conditions the sampling distribution on novelty, a small bias of the
gradient estimator that we accept, and that vanishes while the policy is
still broad relative to the archive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxnas.spaces import Space
from jaxnas.strategies.base import Strategy, from_vectors, propose_batch, to_vectors


@struct.dataclass
class ReinforceState:
  logits: jax.Array      # float32[D, K]
  opt_state: optax.OptState
  baseline: jax.Array    # float32 EMA of the reward
  initialized: jax.Array  # bool: baseline holds a reward


def reinforce(space: Space, learning_rate: float = 0.1, baseline_decay: float = 0.9,
              batch_size: int = 1, entropy_weight: float = 0.0) -> Strategy:
  """REINFORCE with an Adam-updated policy and an EMA baseline."""
  d, k = space.num_decisions, space.max_cardinality
  valid = jnp.asarray(np.arange(k)[None, :] < np.asarray(space.cardinalities)[:, None])
  optimizer = optax.adam(learning_rate)

  def log_probs(logits):
    # A large finite mask keeps gradients finite (-inf would give 0 * inf = NaN).
    return jax.nn.log_softmax(jnp.where(valid, logits, -1e9), axis=-1)

  def init(key):
    del key
    logits = jnp.zeros((d, k), jnp.float32)
    return ReinforceState(logits=logits, opt_state=optimizer.init(logits),
                          baseline=jnp.zeros((), jnp.float32),
                          initialized=jnp.zeros((), bool))

  def ask(key, state, archive):
    lp = log_probs(state.logits)
    sample = lambda kk, i, t: jax.random.categorical(kk, lp, axis=-1).astype(jnp.int32)
    vectors, _ = propose_batch(key, space, archive, batch_size, sample)
    return from_vectors(space, vectors), state

  def tell(key, archs, fitness, state, archive):
    del key, archive
    vectors = to_vectors(space, archs)
    reward = fitness / 100.0
    baseline = jnp.where(state.initialized, state.baseline, jnp.mean(reward))
    advantage = reward - baseline

    def loss_fn(logits):
      lp = log_probs(logits)
      chosen = jnp.take_along_axis(lp[None], vectors[:, :, None], axis=-1)[..., 0].sum(-1)
      p = jnp.exp(lp)
      entropy = -jnp.sum(jnp.where(valid, p * lp, 0.0))
      return -jnp.mean(jax.lax.stop_gradient(advantage) * chosen) - entropy_weight * entropy, entropy

    grads, entropy = jax.grad(loss_fn, has_aux=True)(state.logits)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.logits)
    new = state.replace(
        logits=optax.apply_updates(state.logits, updates), opt_state=opt_state,
        baseline=baseline_decay * baseline + (1 - baseline_decay) * jnp.mean(reward),
        initialized=jnp.ones((), bool))
    return new, {"entropy": entropy, "baseline": new.baseline * 100.0}

  return Strategy("reinforce", space, batch_size, init, ask, tell)
