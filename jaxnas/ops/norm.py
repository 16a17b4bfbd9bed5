"""Batch normalisation (Ioffe & Szegedy 2015) as the networks use it: PyTorch's defaults.

``BatchNorm`` is the module of every network (NAS-Bench-201, DARTS, the supernets);
``batch_norm`` and ``bn_normalize`` compute the same normalisation as plain functions of
its parameters, for code that differentiates an op by hand (the NB201 switch edge).
"""

from __future__ import annotations

import functools

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
    if not train or self.is_initializing() or x.dtype != jnp.float32:
      return self.bn(x, use_running_average=not train)
    scale, bias = self.scale_bias() if self.affine else (None, None)
    y, (mean, var) = batch_norm(x, scale, bias)
    self.update_stats(mean, var, True)
    return y

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
    for name, batch in (("mean", mean), ("var", var)):
      old = self.bn.get_variable("batch_stats", name)
      self.bn.put_variable("batch_stats", name,
                           jnp.where(use, running_update(old, batch, self.momentum), old))


def running_update(old, batch, momentum: float):
  """A running statistic moved toward a batch's, as ``nn.BatchNorm`` moves it."""
  return momentum * old + (1 - momentum) * batch


def bn_normalize(z, mean, var, scale, bias, epsilon: float = BN_EPSILON):
  """``z`` normalised with ``mean``/``var`` (per channel), as ``nn.BatchNorm`` computes it
  (``scale``, ``bias``: None without them)."""
  mul = jax.lax.rsqrt(var + epsilon)
  y = (z - mean) * (mul if scale is None else mul * scale)
  return y if bias is None else y + bias


def _moments(z):
  axes = tuple(range(z.ndim - 1))
  mean = jnp.mean(z, axes)
  return mean, jnp.maximum(0.0, jnp.mean(jax.lax.square(z), axes) - jax.lax.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm(z, scale, bias, epsilon):
  return _batch_norm_fwd(z, scale, bias, epsilon)[0]


def _batch_norm_fwd(z, scale, bias, epsilon):
  mean, var = _moments(z)
  y = bn_normalize(z, mean, var, scale, bias, epsilon)
  return (y, mean, var), (z, mean, jax.lax.rsqrt(var + epsilon), scale, bias)


def _batch_norm_bwd(epsilon, res, cotangents):
  del epsilon  # in ``inv``
  z, mean, inv, scale, bias = res
  g = cotangents[0]  # the statistics' cotangents are dropped: they carry no gradient
  axes = tuple(range(z.ndim - 1))
  n = z.size // z.shape[-1]
  xhat = (z - mean) * inv
  g_sum, g_xhat = jnp.sum(g, axes), jnp.sum(g * xhat, axes)
  mul = inv if scale is None else inv * scale
  dz = (mul * (g - (g_sum + xhat * g_xhat) / n)).astype(z.dtype)
  return (dz, None if scale is None else g_xhat.astype(scale.dtype),
          None if bias is None else g_sum.astype(bias.dtype))


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(z, scale, bias, epsilon: float = BN_EPSILON):
  """Training-mode BN of ``z`` (channels last) with batch statistics, as ``nn.BatchNorm``
  computes it; returns ``(y, (mean, var))``, the statistics without gradient (they feed
  the running averages), computed once for both. The backward pass is the closed form
  (Ioffe & Szegedy 2015, sec. 3): two per-channel sums and one elementwise pass, where
  autodiff of the forward gives a chain of small ops per BN that every supernet step
  traces and XLA compiles (the DARTS-space supernet has ~360 BNs). Differentiable again
  (reverse over reverse: DARTS' second order)."""
  y, mean, var = _batch_norm(z, scale, bias, epsilon)
  return y, jax.lax.stop_gradient((mean, var))
