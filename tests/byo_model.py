"""A small user model for the protocol tests: what a researcher writes with ``jaxnas.nn``
and ``jaxnas.declare``, in their own module (nothing of jaxnas changes to add it)."""

import flax.linen as nn
import jax.numpy as jnp

import jaxnas
from jaxnas import nn as jnn

SPACE = jaxnas.declare({
    "width": jaxnas.choice(4, 8),
    "depth": jaxnas.choice(1, 2),
    "kernel": [jaxnas.choice(3, 5, when=lambda a, i=i: a["depth"] > i) for i in range(2)],
    "pool": jaxnas.choice("avg", "max"),
}, name="byo")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, choice, train=False):
    kernel, width = choice
    y = jnn.ElasticConv(8, kernel_size=5)(nn.relu(x), width=width, kernel_size=kernel)
    return x + jnn.BatchNorm()(y, train, width=width)


class SmallCNN(nn.Module):
  classes: int = 2

  @nn.compact
  def __call__(self, x, arch, train=False):
    w = arch["width"]
    x = jnn.BatchNorm()(jnn.ElasticConv(8, 3)(x, width=w), train, width=w)
    x = jnn.ElasticDepth([Block() for _ in range(2)])(
        x, arch["depth"], [(k, w) for k in arch["kernel"]], train=train)
    pools = [lambda x: nn.avg_pool(x, (2, 2), (2, 2)), lambda x: nn.max_pool(x, (2, 2), (2, 2))]
    x = jnn.OpChoice(pools)(x, arch["pool"])
    return nn.Dense(self.classes)(jnp.mean(x, (1, 2)))


MODEL = jaxnas.searchable(SmallCNN(), SPACE)
