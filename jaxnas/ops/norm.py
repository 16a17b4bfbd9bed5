"""Batch normalisation (Ioffe & Szegedy 2015) as the networks use it: PyTorch's defaults.

``BatchNorm`` is the module of every network (NAS-Bench-201, DARTS, the supernets);
``batch_norm`` and ``bn_normalize`` compute the same normalisation as plain functions of
its parameters, for code that differentiates an op by hand (the NB201 switch edge).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPSILON = 1e-5


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5),
  with a learned scale and bias unless ``affine`` is False (the DARTS supernet's ops)."""
  momentum: float = 0.9
  affine: bool = True

  def setup(self):
    self.bn = nn.BatchNorm(momentum=self.momentum, epsilon=BN_EPSILON, use_scale=self.affine,
                           use_bias=self.affine)

  def __call__(self, x, train: bool):
    return self.bn(x, use_running_average=not train)

  def scale_bias(self):
    """``(scale, bias)`` of the normalisation (``affine`` only)."""
    return self.bn.get_variable("params", "scale"), self.bn.get_variable("params", "bias")

  def running(self):
    """``(mean, var)``: the running statistics that evaluation normalises with."""
    return (self.bn.get_variable("batch_stats", "mean"),
            self.bn.get_variable("batch_stats", "var"))

  def update_stats(self, mean, var, use):
    """Running statistics updated with a batch's ``mean``/``var`` as ``nn.BatchNorm`` does,
    where the scalar ``use`` is true (kept otherwise)."""
    if self.is_initializing() or not self.is_mutable_collection("batch_stats"):
      return
    m = self.momentum
    for name, batch in (("mean", mean), ("var", var)):
      old = self.bn.get_variable("batch_stats", name)
      self.bn.put_variable("batch_stats", name, jnp.where(use, m * old + (1 - m) * batch, old))


def bn_normalize(z, mean, var, scale, bias):
  """``z`` normalised with ``mean``/``var`` (per channel), as ``nn.BatchNorm`` computes it."""
  return (z - mean) * (jax.lax.rsqrt(var + BN_EPSILON) * scale) + bias


def batch_norm(z, scale, bias):
  """Training-mode BN of NHWC ``z`` with batch statistics, as ``nn.BatchNorm`` computes it;
  returns ``(y, (mean, var))``."""
  mean = jnp.mean(z, (0, 1, 2))
  var = jnp.maximum(0.0, jnp.mean(jax.lax.square(z), (0, 1, 2)) - jax.lax.square(mean))
  return bn_normalize(z, mean, var, scale, bias), (mean, var)

