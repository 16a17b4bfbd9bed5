"""The NAS-Bench-201 supernet: every edge a mixture of all five ops (Liu et al., ICLR 2019).

``NB201SuperNet(...)(images, weights, train)`` with ``weights`` a float
``[6, 5]`` array, one row of op weights per edge (NAS-Bench-201 edge order).
DARTS passes ``softmax(alpha)``; GDAS passes a straight-through one-hot Gumbel
sample; SPOS passes a one-hot path. The weights are data, so one compiled
program serves every weighting, and ``jax.grad`` with respect to them is the
architecture gradient.

The macro skeleton and the ops are exactly those of ``NB201Network`` (same
stem, residual reductions and ReLU-Conv-BN ops), so a cell derived from the
supernet is retrained by the same code. Each edge is a ``remat.PureEdges``
(its variables under ``edge{e}/ops``); ``remat=True`` applies it through
``late_remat``: the five ops' activations are recomputed in the backward pass
instead of stored (``jax.checkpoint`` would save nothing on XLA:CPU, see
models/remat.py), for ~1/3 more compute.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnas.models.nb201_net import ReLUConvBN, skeleton
from jaxnas.models.remat import PureEdges
from jaxnas.ops import Execution, avg_pool_3x3
from jaxnas.spaces.nb201 import EDGES, NUM_NODES, OPS


class MixedEdge(nn.Module):
  """``sum_k w[k] * op_k(x)`` over none, skip, conv1x1, conv3x3, avg_pool."""
  features: int
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x, w, train: bool):
    c, m, ex = self.features, self.bn_momentum, self.execution.resolve()
    conv1 = ReLUConvBN(c, c, 1, bn_momentum=m, execution=ex, name="nor_conv_1x1")(x, train)
    conv3 = ReLUConvBN(c, c, 3, bn_momentum=m, execution=ex, name="nor_conv_3x3")(x, train)
    # "none" contributes w[0] * 0.
    return w[1] * x + w[2] * conv1 + w[3] * conv3 + w[4] * avg_pool_3x3(x, impl=ex.pool)


class SuperCell(nn.Module):
  """The NAS-Bench-201 cell with a ``MixedEdge`` on every edge (``weights[6, 5]``)."""
  features: int
  bn_momentum: float = 0.9
  remat: bool = False
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x, weights, train: bool):
    nodes = [x]
    incoming = [[] for _ in range(NUM_NODES)]
    ex = self.execution.resolve()
    for e, (j, i) in enumerate(EDGES):
      edge = PureEdges(MixedEdge(self.features, self.bn_momentum, ex), (train,), None, train,
                       self.remat, name=f"edge{e}")
      incoming[j].append((edge, i, e))
      if len(incoming[j]) == j:
        nodes.append(sum(m(nodes[src], weights[e]) for m, src, e in incoming[j]))
    return nodes[-1]


class NB201SuperNet(nn.Module):
  """NAS-Bench-201 skeleton with mixed edges; ``__call__(images, weights[6, 5], train)``.

  ``execution``: the conv and pool implementations (``jaxnas.ops.Execution``)."""
  channels: int = 16
  cells: int = 1
  num_classes: int = 10
  bn_momentum: float = 0.9
  remat: bool = False
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, images, weights, train: bool = False):
    ex = self.execution.resolve()
    return skeleton(self, images, train, lambda x, c, name: SuperCell(
        c, self.bn_momentum, self.remat, ex, name=name)(x, weights, train))


NUM_OPS = len(OPS)
NUM_EDGES = len(EDGES)


def derive_nb201(alpha: jax.Array) -> jax.Array:
  """Discretisation for NAS-Bench-201: the argmax op of every edge (int32[6])."""
  return jnp.argmax(alpha, axis=-1).astype(jnp.int32)
