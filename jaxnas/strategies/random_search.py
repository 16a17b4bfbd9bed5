"""Random search: uniform novel samples (Li & Talwalkar 2019 baseline)."""

from __future__ import annotations

from flax import struct

from jaxnas.spaces import Space
from jaxnas.strategies.base import Strategy, from_vectors, propose_batch


@struct.dataclass
class RandomState:
  pass


def random_search(space: Space, batch_size: int = 1) -> Strategy:
  """Samples ``batch_size`` uniformly random, not yet evaluated architectures per step."""

  def init(key):
    del key
    return RandomState()

  def ask(key, state, archive):
    vectors, _ = propose_batch(key, space, archive, batch_size,
                               lambda k, i, t: space.sample_vector(k))
    return from_vectors(space, vectors), state

  def tell(key, archs, fitness, state, archive):
    del key, archs, fitness, archive
    return state, {}

  return Strategy("random", space, batch_size, init, ask, tell)
