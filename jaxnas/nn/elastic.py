"""Elastic width and kernel size: max-shape parameters, the active part chosen by data.

Convention (NNI's ``MixedConv2d``/``MixedLinear``; Once-for-All, Cai et al. 2020):
the active channels are the *first* ``width`` of the max width (prefix slice),
the active ``k x k`` kernel is the *centre* of the max kernel. Inactive channels
are exact zeros in the forward pass and their parameters get exact zero
gradients (the parameters are multiplied by a 0/1 mask). A layer that follows
an elastic one sees exact zeros in the inactive channels, so its own input
dimension is elastic for free; use ``BatchNorm`` here (not ``nn.BatchNorm``)
after an elastic layer, so that BN's bias does not refill them.

Called with Python ints the layers build the specialised parameters
(``k x k x c_in x width``) under the same names: ``extract`` slices them out
of the elastic ones.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.nn.choice import Sliced, gate, is_static
from jaxnas.ops import BN_EPSILON, batch_norm, bn_normalize, conv2d, depthwise
from jaxnas.ops.norm import running_update
from jaxnas.spaces.declared import Mixture


def channel_mask(width, features: int, dtype=jnp.float32):
  """``float[features]``: 1 for the first ``width`` channels, 0 after."""
  return (jnp.arange(features) < width).astype(dtype)


def _expected(choice, f):
  """``f(choice)``, or its expectation over a ``Mixture``'s candidates."""
  return choice.expect(f) if isinstance(choice, Mixture) else f(choice)


def _kernel_mask(size, max_size: int, dtype):
  """``float[K, K]``: 1 on the centre ``size x size`` taps of a ``K x K`` kernel."""
  r = jnp.abs(jnp.arange(max_size) - max_size // 2)
  on = (r <= size // 2).astype(dtype)
  return on[:, None] * on[None, :]


def fan_in_init(key, shape, dtype=jnp.float32):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of a ``HWIO`` kernel: PyTorch's conv default."""
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class ElasticConv(nn.Module):
  """2-D convolution (NHWC, ``HWIO`` kernel, PyTorch-style symmetric padding ``k // 2``).

  Attributes:
    features: the max number of output channels (``depthwise``: ignored, the
      output has the input's channels).
    kernel_size: the max (odd) kernel size.
    strides: the stride.
    depthwise: one ``k x k`` filter per channel (``feature_group_count`` = channels).
    use_bias: adds a bias (masked like the kernel).
    conv: how a full convolution computes, one of ``jaxnas.ops.CONV_IMPLS`` or ``"auto"``
      (the backend's measured default: oneDNN on CPU where it builds, im2col on
      accelerators); a depthwise one runs ``jaxnas.ops.depthwise``.
    kernel_sizes: with a traced ``kernel_size``, the candidate sizes, for
      ``kernel_impl="switch"``.
    kernel_impl: ``"mask"`` (default): the max kernel with the outer taps zeroed, one
      conv whatever the size (the batched form, for ``vmap``); ``"switch"``: a
      ``lax.switch`` over ``kernel_sizes``, each branch a conv with the centre crop, so a
      member running alone (``lax.map``, CPU) pays only for its own kernel (under
      ``vmap`` JAX computes every branch). Both compute the same function.
    in_features: the max input channels, for ``Sliced`` widths (0: the input's).
  ``__call__(x, width=None, kernel_size=None)``: ``width`` active output channels
  (None: all), ``kernel_size`` the active kernel (None: the max); either may be
  an int32 array (elastic) or a Python int (specialised). A ``Sliced`` width computes on
  the first ``width`` output channels and the input's channels of the max-shape kernel
  (a depthwise conv: its input's channels, which must be ``width``).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  depthwise: bool = False
  use_bias: bool = False
  kernel_init: Callable = fan_in_init
  conv: str = "auto"
  kernel_sizes: tuple = ()
  kernel_impl: str = "mask"
  in_features: int = 0

  def _conv(self, x, kernel, k):
    if self.depthwise:
      return depthwise(x, kernel, self.strides, impl=None if self.conv == "auto" else self.conv)
    return conv2d(x, kernel, self.strides, k // 2, None if self.conv == "auto" else self.conv)

  @nn.compact
  def __call__(self, x, width=None, kernel_size=None):
    c_in = x.shape[-1]
    fixed_k = kernel_size is None or is_static(kernel_size)
    sliced = isinstance(width, Sliced)
    fixed_w = width is None or is_static(width) or sliced
    if sliced and self.depthwise and width.value != c_in:
      raise ValueError(f"ElasticConv: a depthwise conv's Sliced width {width.value} must be "
                       f"its input's {c_in} channels")
    if self.depthwise:
      out = self.features if sliced else c_in  # a depthwise conv's width is its input's
    else:
      out = self.features if width is None or not fixed_w or sliced else int(width)
    k = int(kernel_size) if kernel_size is not None and fixed_k else self.kernel_size
    if k % 2 == 0 or k > self.kernel_size:
      raise ValueError(f"ElasticConv: kernel size {k} must be odd and <= {self.kernel_size}")
    k_in = 1 if self.depthwise else (self.in_features or c_in) if sliced else c_in
    kernel = self.param("kernel", self.kernel_init, (k, k, k_in, out), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (out,), jnp.float32) if self.use_bias else None
    if sliced:  # the specialised layer's parameters: a prefix of the elastic ones
      kernel = kernel[:, :, :1 if self.depthwise else c_in, :width.value]
      bias = None if bias is None else bias[:width.value]
    if self.kernel_impl not in ("mask", "switch"):
      raise ValueError(f"ElasticConv: kernel_impl {self.kernel_impl!r} is not mask or switch")
    if isinstance(kernel_size, Mixture) and any(
        s % 2 == 0 or s > self.kernel_size for s in kernel_size.values):
      raise ValueError(f"ElasticConv: kernel sizes {kernel_size.values} must be odd and <= "
                       f"{self.kernel_size}")
    switch = not fixed_k and self.kernel_impl == "switch" and not isinstance(kernel_size, Mixture)
    if switch and (not self.kernel_sizes or any(
        s % 2 == 0 or s > self.kernel_size for s in self.kernel_sizes)):
      raise ValueError(f"ElasticConv: kernel_impl='switch' needs kernel_sizes, odd and <= "
                       f"{self.kernel_size}, got {self.kernel_sizes}")
    if not fixed_k and not switch:
      kernel = kernel * _expected(kernel_size, lambda s: _kernel_mask(s, k, kernel.dtype))[
          :, :, None, None]
    if not fixed_w:
      m = _expected(width, lambda w: channel_mask(w, out, kernel.dtype))
      kernel = kernel * m
      bias = None if bias is None else bias * m
    kernel = kernel.astype(x.dtype)
    if switch:
      sizes = tuple(int(s) for s in self.kernel_sizes)

      def branch(s):
        c = (k - s) // 2
        return lambda x, kernel: self._conv(x, kernel[c:c + s, c:c + s], s)

      index = jnp.argmax(jnp.asarray(sizes) == kernel_size)
      y = jax.lax.switch(index, [branch(s) for s in sizes], x, kernel)
    else:
      y = self._conv(x, kernel, k)
    return y if bias is None else y + bias.astype(y.dtype)


class ElasticDense(nn.Module):
  """``x @ kernel + bias`` with ``width`` of the max ``features`` outputs active.

  The input may itself be elastic (exact zeros in its inactive features).
  """
  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, width=None):
    fixed = width is None or is_static(width)
    out = (self.features if width is None else int(width)) if fixed else self.features
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], out), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (out,), jnp.float32) if self.use_bias else None
    if not fixed:
      m = _expected(width, lambda w: channel_mask(w, out, kernel.dtype))
      kernel = kernel * m
      bias = None if bias is None else bias * m
    y = x @ kernel.astype(x.dtype)
    return y if bias is None else y + bias.astype(y.dtype)


class BatchNorm(nn.Module):
  """Batch normalisation over all but the last axis that keeps inactive channels at zero.

  PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5), as
  ``nn.BatchNorm``: ``scale``/``bias`` params, ``mean``/``var`` batch statistics.
  ``__call__(x, train, width=None)``: with an int32 ``width`` the output is
  masked to the first ``width`` channels (the normalised zeros of an inactive
  channel would otherwise become ``bias``). Under a ``Mixture`` the running statistics
  move by the ``gate()`` of this layer: those of an unchosen candidate stay as they were.
  Training normalises with ``ops.batch_norm`` (its closed-form backward pass), as every
  network of the library does. A ``Sliced`` width (the input has that many channels)
  uses the first ``width`` of ``features`` channels' variables and moves the others'
  running statistics as the masked form does (toward its zero channels' 0 mean and
  variance), so both forms leave the same state.
  """
  momentum: float = 0.9
  epsilon: float = BN_EPSILON
  features: int = 0  # the max channels, for ``Sliced`` widths (0: the input's)

  @nn.compact
  def __call__(self, x, train: bool, width=None):
    n = x.shape[-1]
    sliced = isinstance(width, Sliced)
    if sliced and width.value != n:
      raise ValueError(f"BatchNorm: Sliced width {width.value} but {n} input channels")
    c = (self.features or n) if sliced else n
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    active = (lambda v: v[:n]) if sliced else (lambda v: v)
    if train:
      y, (mean, var) = batch_norm(x, active(scale), active(bias), self.epsilon)
      if n < c:  # the inactive channels' statistics, as the masked form computes them
        mean, var = (jnp.pad(v, (0, c - n)) for v in (mean, var))
      if not self.is_initializing():
        m, g = self.momentum, gate()
        if isinstance(g, float):
          ra_mean.value = running_update(ra_mean.value, mean, m)
          ra_var.value = running_update(ra_var.value, var, m)
        else:  # under a Mixture: an unchosen candidate's statistics stay as they were
          g = jax.lax.stop_gradient(g)
          ra_mean.value = ra_mean.value + g * (1 - m) * (mean - ra_mean.value)
          ra_var.value = ra_var.value + g * (1 - m) * (var - ra_var.value)
    else:
      y = bn_normalize(x, active(ra_mean.value), active(ra_var.value), active(scale),
                       active(bias), self.epsilon)
    if width is not None and not is_static(width) and not sliced:
      y = y * _expected(width, lambda w: channel_mask(w, c, y.dtype))
    return y
