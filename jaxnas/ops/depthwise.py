"""The DARTS space's separable-conv primitives: depthwise and pointwise convolutions.

DARTS' ``SepConv`` and ``DilConv`` (Liu et al. 2019) are ReLU, a depthwise kxk conv
(optionally dilated) and a pointwise 1x1 conv; these compute the two convolutions in the
forms XLA runs fast per backend (``depthwise``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import native
from jaxnas.ops.conv import check_conv_impl, conv_impl, onednn_depthwise

_DN = ("NHWC", "HWIO", "NHWC")


def pointwise(x, kernel):
  """A 1x1 conv (``kernel`` ``[1, 1, Cin, Cout]``) as a matmul over pixels (a batched
  matmul under ``vmap`` over members, where a conv would become a grouped conv)."""
  return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])


def _depthwise_geometry(x, kernel, stride, dilation):
  k = kernel.shape[0]
  p = dilation * (k // 2)
  ho = (x.shape[1] + 2 * p - dilation * (k - 1) - 1) // stride + 1
  wo = (x.shape[2] + 2 * p - dilation * (k - 1) - 1) // stride + 1
  ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
  taps = (jnp.asarray(ii.reshape(-1) * dilation), jnp.asarray(jj.reshape(-1) * dilation),
          kernel.reshape(k * k, -1))
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  window = (xp.shape[0], (ho - 1) * stride + 1, (wo - 1) * stride + 1, xp.shape[3])
  return p, xp, taps, window


def depthwise(x, kernel, stride: int, dilation: int = 1, impl: str | None = None):
  """Depthwise NHWC conv (``kernel`` ``[k, k, 1, C]``), PyTorch padding ``dilation * (k // 2)``.

  On CPU, where the conv implementation (``impl``, as ``conv2d``'s; None: the backend's
  default) is ``"onednn"``, oneDNN's grouped convolution (float32, any dilation: 2.5-4x
  faster than the taps forward + backward at MBConv's shapes, BUILD_NOTES.md), otherwise
  ``depthwise_taps``; elsewhere XLA's grouped convolution (``depthwise_reference``), which
  cuDNN and the TPU compiler run natively.
  """
  if jax.default_backend() != "cpu":
    return depthwise_reference(x, kernel, stride, dilation)
  impl = conv_impl() if impl in (None, "auto") else check_conv_impl(impl)
  if (impl == "onednn" and x.dtype == kernel.dtype == jnp.float32 and
      native.onednn_status() is None):
    return onednn_depthwise(x, kernel, stride, dilation * (kernel.shape[0] // 2), dilation)
  return depthwise_taps(x, kernel, stride, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_taps(x, kernel, stride: int, dilation: int = 1):
  """Depthwise conv as a ``lax.scan`` over the ``k*k`` taps, each a window of the padded input
  times a per-channel weight, with a hand-written VJP (two more tap scans)
  that keeps only ``x`` and the kernel for the backward pass. XLA:CPU runs a
  depthwise (``feature_group_count=C``) convolution as a slow generic loop:
  on 32x28x28x4 the taps are 2.5-5x faster forward + backward (sep_conv_5x5:
  48 ms vs 19 ms). Unrolled taps are as fast but multiply compile time (a
  3-cell supernet step: 530 s vs 140 s); autodiff of the scan would store
  every tap's window (1.5 GB for that step).
  """
  _, xp, taps, window = _depthwise_geometry(x, kernel, stride, dilation)

  def tap(acc, t):
    i, j, w = t
    win = jax.lax.dynamic_slice(xp, (0, i, j, 0), window)
    return acc + win[:, ::stride, ::stride, :] * w, None

  out = jnp.zeros((window[0], (window[1] - 1) // stride + 1, (window[2] - 1) // stride + 1,
                   window[3]), x.dtype)
  return jax.lax.scan(tap, out, taps)[0]


def _depthwise_fwd(x, kernel, stride, dilation):
  return depthwise_taps(x, kernel, stride, dilation), (x, kernel)


def _depthwise_bwd(stride, dilation, res, g):
  x, kernel = res
  p, xp, taps, window = _depthwise_geometry(x, kernel, stride, dilation)
  # g spread back onto the stride grid of a window (zeros between samples).
  g_up = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (0, 0, stride - 1),
                                                  (0, 0, stride - 1), (0, 0, 0)))

  def tap(dxp, t):
    i, j, w = t
    win = jax.lax.dynamic_slice(xp, (0, i, j, 0), window)
    dw = jnp.sum(win[:, ::stride, ::stride, :] * g, axis=(0, 1, 2))
    cur = jax.lax.dynamic_slice(dxp, (0, i, j, 0), window)
    return jax.lax.dynamic_update_slice(dxp, cur + g_up * w, (0, i, j, 0)), dw

  dxp, dws = jax.lax.scan(tap, jnp.zeros_like(xp), taps)
  dx = dxp[:, p:p + x.shape[1], p:p + x.shape[2], :]
  return dx, dws.reshape(kernel.shape)


depthwise_taps.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_reference(x, kernel, stride: int, dilation: int = 1):
  """``depthwise`` as XLA's grouped convolution (the reference it is tested against)."""
  p = dilation * (kernel.shape[0] // 2)
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                      rhs_dilation=(dilation, dilation), dimension_numbers=_DN,
                                      feature_group_count=x.shape[-1])

