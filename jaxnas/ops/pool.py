"""The pooling ops of the networks: 3x3 average and max pools (padding 1), and the 2x2
average pool of NAS-Bench-201's residual reduction shortcut.

The average pools take their implementation (``POOL_IMPLS``) as an argument; the
networks pass their ``ops.Execution``'s. ``pool_impl(backend)`` is the measured default
of a backend.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _pool_counts(h: int, w: int, stride: int = 1) -> np.ndarray:
  """Real (non-padding) pixels under each 3x3 window (padding 1) at ``stride``: at stride 1,
  4 at corners, 6 on edges, 9 inside."""
  def counts(n):
    o = np.arange((n - 1) // stride + 1) * stride
    return np.minimum(o + 1, n - 1) - np.maximum(o - 1, 0) + 1
  return (counts(h)[:, None] * counts(w)[None, :]).astype(np.float32)


POOL_IMPLS = ("sum", "window")


def pool_impl(backend: str | None = None) -> str:
  """The measured default average-pool implementation of ``backend`` (default: JAX's).

  * ``"sum"``: the 3x3 pool at stride 1 as a separable window sum, the 2x2 pool
    as a reshape and a mean. XLA:CPU runs ``reduce_window`` and its gradient as
    generic windowed loops; these forms are 1.8-3.6x faster there
    (experiments/NOTES_population.md).
  * ``"window"``: ``lax.reduce_window``, the form the accelerators were measured
    with (740 candidate-steps/s for the issue-3 population on an H200; the one
    GPU run with ``"sum"`` gave 619, not bisected, BUILD_NOTES.md).

  CPU's default is ``"sum"``, the other backends' ``"window"``.
  """
  return "sum" if (backend or jax.default_backend()) == "cpu" else "window"


def check_pool_impl(impl: str) -> str:
  """``impl`` if it names an average-pool implementation; a one-line ValueError otherwise."""
  if impl not in POOL_IMPLS:
    raise ValueError(f"unknown pool impl {impl!r}; choose one of {', '.join(POOL_IMPLS)}")
  return impl


def avg_pool_3x3(x, stride: int = 1, impl: str | None = None):
  """3x3 average pool, padding 1, ``count_include_pad=False`` as in NAS-Bench-201 and DARTS.

  The divisor is a small numpy constant: ``nn.avg_pool(count_include_pad=False)``
  instead pools a batch-sized array of ones, which XLA then constant-folds for
  ~10 s per pool at compile time. At stride 1 with ``impl`` (one of ``POOL_IMPLS``;
  None: ``pool_impl()``, the default backend's) ``"sum"`` the window sum is separable,
  three shifted adds per axis, which XLA fuses with the division (and autodiff turns into
  the same form).
  """
  impl = pool_impl() if impl is None else check_pool_impl(impl)
  if stride == 1 and impl == "sum":
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = xp[:, 0:h] + xp[:, 1:h + 1] + xp[:, 2:h + 2]
    s = rows[:, :, 0:w] + rows[:, :, 1:w + 1] + rows[:, :, 2:w + 2]
  else:
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, stride, stride, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
  inv = 1.0 / _pool_counts(x.shape[1], x.shape[2], stride)
  return s * jnp.asarray(inv[None, :, :, None], x.dtype)


def avg_pool_2x2(x, impl: str | None = None):
  """``nn.avg_pool(x, (2, 2), strides=(2, 2))`` (padding VALID); with ``impl`` (None:
  ``pool_impl()``) ``"sum"`` as a reshape and a mean."""
  impl = pool_impl() if impl is None else check_pool_impl(impl)
  if impl == "window":
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  n, h, w = x.shape[0], x.shape[1] // 2, x.shape[2] // 2
  return x[:, :2 * h, :2 * w].reshape(n, h, 2, w, 2, x.shape[3]).mean((2, 4))


def _max_pool_taps(x, stride: int):
  ho, wo = (x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride, :]
          for i in range(3) for j in range(3)]


def max_pool_3x3(x, stride: int):
  """3x3 max pool, padding 1: the maximum of the 9 shifted (strided) windows, with a VJP
  that routes each output's cotangent to its first maximal tap.

  Same values and (tie-free) gradients as ``lax.reduce_window(max)``
  (``max_pool_reference``), whose ``select_and_scatter`` gradient XLA:CPU
  runs slowly, as it does autodiff of a chain of ``maximum``: forward +
  backward on 64x32x32x16 take ~77 ms either way, far less with this VJP
  (both passes are single fusions over 9 shifted slices).
  """
  return _max_pool(x, stride, x.shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, stride, size):
  return _max_pool_fwd(x, stride, size)[0]


def _max_pool_fwd(x, stride, size):
  del size
  out, arg = None, None
  for t, win in enumerate(_max_pool_taps(x, stride)):
    if out is None:
      out, arg = win, jnp.zeros(win.shape, jnp.int8)
    else:
      arg = jnp.where(win > out, jnp.int8(t), arg)
      out = jnp.maximum(out, win)
  return out, arg


def _max_pool_bwd(stride, size, arg, g):
  # Output o took padded pixel o * stride + d_t, d_t = (i, j), when arg[o] == t = 3 i + j.
  # With G, A the cotangent and arg spread onto the stride grid (zeros / -1 between), input
  # pixel q (padded q + 1) gathers dx[q] = sum_t G[q + 1 - d_t] * (A[q + 1 - d_t] == t).
  (h, w), n = size, ((g.shape[1] - 1) * stride + 1, (g.shape[2] - 1) * stride + 1)
  grid = lambda a, fill: jax.lax.pad(a, jnp.asarray(fill, a.dtype), (
      (0, 0, 0), (2, h + 1 - n[0], stride - 1), (2, w + 1 - n[1], stride - 1), (0, 0, 0)))
  gp, ap = grid(g, 0), grid(arg, -1)
  dx = 0.0
  for i in range(3):
    for j in range(3):
      sl = (slice(None), slice(3 - i, 3 - i + h), slice(3 - j, 3 - j + w), slice(None))
      dx = dx + jnp.where(ap[sl] == 3 * i + j, gp[sl], 0.0)
  return (dx.astype(g.dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_reference(x, stride: int):
  """``max_pool_3x3`` as XLA's ``reduce_window`` (the reference it is tested against)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))
