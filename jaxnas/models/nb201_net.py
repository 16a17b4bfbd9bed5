"""The NAS-Bench-201 network (Dong & Yang, ICLR 2020) with the architecture as data.

Macro skeleton, as in the benchmark: a 3x3 conv + BN stem; three stages of
``cells`` cells with ``C``, ``2C``, ``4C`` channels joined by residual reduction
blocks (a stride-2 ResNet basic block, He et al. 2016); then BN-ReLU, global
average pooling and a linear classifier. A cell is the 4-node DAG of
``jaxnas.spaces.nb201``: node ``j = sum_{i<j} op_ji(node_i)`` with ops
``none`` (zeros), ``skip_connect`` (identity), ``nor_conv_1x1`` and
``nor_conv_3x3`` (ReLU-Conv-BN) and ``avg_pool_3x3`` (stride 1, padding 1,
``count_include_pad=False``).

``NB201Network`` takes the cell as an ``int32[6]`` *input*, so one compiled
program trains any member of a population. How a data-dependent op choice
executes is ``op_impl`` (all three give the same function of the same params):

* ``"switch"``: ``lax.switch`` on the op index. With an unbatched index (one
  candidate at a time, e.g. under ``lax.map``) XLA runs a real conditional and
  computes only the chosen op. Under ``vmap`` the index is batched and JAX turns
  the switch into a select over all five branches.
* ``"onehot"``: compute all ops, sum with one-hot weights (DARTS-style mixing
  with hard weights; Liu et al. 2019). Costs a 3x3 and a 1x1 conv per edge.
* ``"kernel"``: one 3x3 conv per edge whose kernel embeds the chosen conv
  (the 1x1 kernel is the centre tap of a 3x3), ``relu`` on its input; skip and
  pooling are cheap and selected around it. Costs one 3x3 conv per edge, and
  under ``vmap`` it is a single grouped conv per edge.

Setting ``fixed_arch`` (a Python tuple) builds the specialised network of one
cell: only the chosen ops exist, with the same parameter names, so
``specialise_variables`` can carry trained weights over (final retraining,
export). ``cost`` gives its exact parameter count and FLOPs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import native
from jaxnas.spaces.nb201 import EDGES, NUM_EDGES, NUM_NODES, OPS

OP_IMPLS = ("switch", "onehot", "kernel")
NONE, SKIP, CONV1, CONV3, POOL = range(len(OPS))

# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)), so the JAX net
# and the PyTorch peer start from the same distribution.
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, stride, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1)):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                                      dimension_numbers=_DN)


def _tiny_conv(kernel) -> bool:
  """A conv XLA:CPU runs slowly, which one im2col matmul runs 2x faster: few input taps
  (``k*k*Cin <= 64``, e.g. the stem on grey images) and at most 16 channels either side,
  where XLA:CPU leaves the conv to Eigen instead of YNNPACK (its ``ynn_support.cc``;
  experiments/NOTES_population.md, round 6)."""
  k, cin, cout = kernel.shape[0], kernel.shape[2], kernel.shape[3]
  return k > 1 and k * k * cin <= 64 and max(cin, cout) <= 16


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_canonical(x, kernel, stride, pad, im2col=False):
  if not im2col and _tiny_conv(kernel):  # CPU
    return _conv_gemm(x, kernel, stride, pad)
  return _conv_wide(x, kernel, stride, ((pad, pad), (pad, pad)), widen=not im2col)


def _conv_wide(x, kernel, stride, padding, lhs_dilation=(1, 1), widen=True):
  """``_conv``, with ``widen`` (CPU) a 17th, zero output channel for 16 outputs from at most
  16 inputs: XLA:CPU leaves convs with at most 16 channels either side to Eigen, ~1.6x slower
  than its YNNPACK path (``ynn_support.cc``); the extra channel is sliced off in the
  consumers. A first-stage 3x3 edge at C=16 trains ~4 ms (~12 %) faster per step this way
  (experiments/NOTES_population.md, round 6)."""
  cin, cout = kernel.shape[2], kernel.shape[3]
  if widen and kernel.shape[0] > 1 and cout == 16 and cin <= 16:
    wide = jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, 1)))
    return _conv(x, wide, stride, padding, lhs_dilation)[..., :cout]
  return _conv(x, kernel, stride, padding, lhs_dilation)


def _conv_canonical_fwd(x, kernel, stride, pad, im2col=False):
  return _conv_canonical(x, kernel, stride, pad, im2col), (x, kernel)


def _tap(xp, i, j, ho, wo, stride):
  """The input pixels that kernel tap ``(i, j)`` multiplies, for every output pixel."""
  return jax.lax.slice(xp, (0, i, j, 0),
                       (xp.shape[0], i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1,
                        xp.shape[3]), (1, stride, stride, 1))


def _im2col(xp, k, ho, wo, stride):
  """The ``k*k`` taps of the padded input side by side: ``[N, ho, wo, k*k*C]``, tap-major."""
  return jnp.concatenate([_tap(xp, i, j, ho, wo, stride) for i in range(k) for j in range(k)], -1)


def _kernel_grad_taps(xp, g, k, stride):
  """``dK[i, j] = tap(i, j)^T g`` (contracting batch and pixels), as one small matmul per tap.

  ``g`` is the left operand so the output is ``[Cout, Cin]``: XLA:CPU's matmul
  is about twice as fast with the wider operand on the right for these long,
  thin contractions.
  """
  ho, wo = g.shape[1], g.shape[2]
  dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
  taps = [jax.lax.dot_general(g, _tap(xp, i, j, ho, wo, stride), dims)
          for i in range(k) for j in range(k)]
  return jnp.stack(taps).reshape(k, k, g.shape[-1], xp.shape[-1]).transpose(0, 1, 3, 2)


def _kernel_grad(x, g, k, stride, pad, chunk=None, im2col=False):
  """Kernel gradient of the NHWC conv: a sum over batch chunks of per-tap matmuls.

  Measured in a scan body on CPU (experiments/NOTES_population.md): 1.5-3x
  faster for NB201's 3x3 convs than the conv that correlates channels-as-batch
  inputs with batch-as-features output gradients (3x for stride 2, which that
  conv computes on a 4x4 window), 6x for a 1x1 conv. Chunks of ``chunk`` images
  keep each tap's operands in cache, also for a 1x1 conv: unchunked, XLA:CPU
  fuses the producer of ``g`` (BN's backward) into the transpose that feeds
  the matmul, which then re-reads every input in transposed order (a 1x1 edge's
  backward ~3x slower). Tiny kernels (the stem: ``k*k*Cin <= 64``) take one
  im2col matmul. ``im2col=True`` always takes that one matmul, also for a 1x1
  conv (accelerators: the chunk scan is hundreds of tiny serial kernels there).
  By default a chunk holds at least 784 output pixels (4 images of 28x28 or 14x14, 16
  of 7x7): per-tap matmuls over 196 pixels were ~15 % slower for NB201's third stage
  (experiments/NOTES_population.md, round 9).
  """
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  n, ho, wo = g.shape[0], g.shape[1], g.shape[2]
  if k > 1 and (im2col or k * k * x.shape[-1] <= 64):
    cols = _im2col(xp, k, ho, wo, stride)
    if not im2col:
      # CPU: with the columns (9 wide for the grey stem) on the left, XLA transposes them
      # instead of ``g``, and BN's backward is no longer fused into a transposing copy:
      # the stem's backward 5.8 -> 3.6 ms per step (profile, one core).
      dk = jax.lax.dot_general(cols, g, (((0, 1, 2), (0, 1, 2)), ((), ())))
      return dk.reshape(k, k, x.shape[-1], g.shape[-1])
    dk = jax.lax.dot_general(g, cols, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return dk.reshape(g.shape[-1], k, k, x.shape[-1]).transpose(1, 2, 3, 0)
  if chunk is None:
    chunk = 1 << max(2, (784 // (ho * wo)).bit_length() - 1)
  if im2col or n % chunk or n == chunk:  # im2col of a 1x1 conv: its input, one matmul
    return _kernel_grad_taps(xp, g, k, stride)
  xc = xp.reshape((n // chunk, chunk) + xp.shape[1:])
  gc = g.reshape((n // chunk, chunk) + g.shape[1:])
  body = lambda acc, xg: (acc + _kernel_grad_taps(xg[0], xg[1], k, stride), None)
  zero = jnp.zeros((k, k, x.shape[-1], g.shape[-1]), g.dtype)
  return jax.lax.scan(body, zero, (xc, gc))[0]


def _input_grad_subpixel(g, kernel, stride, pad, h, w):
  """Input gradient of a strided conv as ``stride**2`` stride-1 convs, one per phase.

  Input pixel ``p`` with ``(p + pad) % stride == r`` only receives the kernel
  taps ``r, r + stride, ...`` (``kernel[r::stride]`` per axis), so each phase
  of ``dx`` is a stride-1 correlation of ``g`` with that sub-kernel (flipped,
  channels swapped); the phases are interleaved with a reshape. Same sums as
  the transposed conv (``lhs_dilation=stride``), without multiplying the
  dilation's zeros: XLA:CPU runs that form as a slow generic conv (~4x the
  forward conv's time on the issue-3 benchmark's reduction blocks), these as
  its fast stride-1 convs.
  """
  k, s = kernel.shape[0], stride
  n, ho, wo, cin = g.shape[0], g.shape[1], g.shape[2], kernel.shape[2]
  hp, wp = -(-h // s) * s, -(-w // s) * s  # dx padded to whole phases, cropped below

  def axis(r, n_out, n_padded):
    """(taps, conv padding, dx offset) of phase ``r`` along one axis."""
    q0 = -((r - pad) // s)  # first output-grid index of this phase: ceil((pad - r) / s)
    m = len(range(r, k, s))
    lo = m - 1 - q0
    return m, (lo, n_padded // s + m - 1 - n_out - lo), q0 * s + r - pad

  phases = {}
  for ry in range(s):
    my, py, oy = axis(ry, ho, hp)
    for rx in range(s):
      mx, px, ox = axis(rx, wo, wp)
      if my == 0 or mx == 0:  # a phase no tap reaches (kernel smaller than the stride)
        phases[oy, ox] = jnp.zeros((n, hp // s, wp // s, cin), g.dtype)
        continue
      sub = jnp.flip(kernel[ry::s, rx::s], (0, 1)).transpose(0, 1, 3, 2)
      phases[oy, ox] = _conv(g, sub, 1, (py, px))
  rows = [jnp.stack([phases[oy, ox] for ox in range(s)], 3) for oy in range(s)]
  dx = jnp.stack(rows, 2).reshape(n, hp, wp, cin)  # [n, hp/s, s, wp/s, s, c] -> [n, hp, wp, c]
  return dx[:, :h, :w]


def _conv_canonical_bwd(stride, pad, im2col, res, g):
  # Both gradients written without autodiff's transposed convolutions: those
  # use permuted dimension labels that XLA:CPU only rewrites into its fast
  # (Eigen/YNNPACK) form in the entry computation; inside a conditional or a
  # loop body they run as naive loops, 4-30x slower
  # (experiments/NOTES_population.md). Training is a scan and op choice a
  # switch, so this matters more than anything else on CPU.
  x, kernel = res
  k, h, w = kernel.shape[0], x.shape[1], x.shape[2]
  ho, wo = g.shape[1], g.shape[2]
  if stride > 1 and not im2col:  # CPU ("taps"); accelerators keep XLA's transposed conv
    dx = _input_grad_subpixel(g, kernel, stride, pad, h, w)
  else:
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    lo = k - 1 - pad
    pads = ((lo, h + k - 1 - ((ho - 1) * stride + 1) - lo),
            (lo, w + k - 1 - ((wo - 1) * stride + 1) - lo))
    dx = _conv_wide(g, flipped, 1, pads, (stride, stride), widen=not im2col)
  return dx, _kernel_grad(x, g, k, stride, pad, im2col=im2col)


_conv_canonical.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)


def _conv_gemm(x, kernel, stride, pad):
  """The conv as one matmul of its im2col patches (the ``k*k`` shifted windows side by side).

  Autodiff of it is two more matmuls plus pads and adds, so under ``vmap``
  (per-member kernels) everything is a batched GEMM instead of a grouped
  convolution, whose backward pass cuDNN runs slowly (jax issue 13800).
  """
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (x.shape[1] + 2 * pad - k) // stride + 1
  wo = (x.shape[2] + 2 * pad - k) // stride + 1
  return _im2col(xp, k, ho, wo, stride) @ kernel.reshape(-1, kernel.shape[-1])


def _onednn_threads() -> int:
  """OpenMP threads per oneDNN call (``native.onednn_threads``)."""
  return native.onednn_threads()


def _onednn(target, shape, a, b, stride, pad):
  """One oneDNN convolution primitive (``jaxnas.native``) as an XLA FFI call."""
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")
  return call(a, b, stride=np.int64(stride), pad=np.int64(pad),
              threads=np.int64(_onednn_threads()))


# Forward, input gradient and kernel gradient of the oneDNN conv: each is linear in each
# operand and its VJP is the other two, so reverse over reverse (DARTS' exact mixed
# second derivative) works too.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, kernel, stride, pad):
  k, (n, h, w, _) = kernel.shape[0], x.shape
  shape = (n, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, kernel.shape[3])
  return _onednn("jaxnas_onednn_conv_fwd", shape, x, kernel, stride, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_input_grad(g, kernel, stride, pad, x_shape):
  return _onednn("jaxnas_onednn_conv_bwd_data", x_shape, g, kernel, stride, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_kernel_grad(x, g, stride, pad, kernel_shape):
  return _onednn("jaxnas_onednn_conv_bwd_weights", kernel_shape, x, g, stride, pad)


def _onednn_conv_bwd(stride, pad, res, g):
  x, kernel = res
  return (_onednn_input_grad(g, kernel, stride, pad, x.shape),
          _onednn_kernel_grad(x, g, stride, pad, kernel.shape))


def _onednn_input_grad_bwd(stride, pad, x_shape, res, c):
  g, kernel = res  # <c, conv^T(g; kernel)> = <conv(c; kernel), g>
  return (_onednn_conv(c, kernel, stride, pad),
          _onednn_kernel_grad(c, g, stride, pad, kernel.shape))


def _onednn_kernel_grad_bwd(stride, pad, kernel_shape, res, c):
  x, g = res  # <c, dK(x, g)> = <conv(x; c), g>
  return (_onednn_input_grad(g, c, stride, pad, x.shape), _onednn_conv(x, c, stride, pad))


_onednn_conv.defvjp(lambda x, k, s, p: (_onednn_conv(x, k, s, p), (x, k)), _onednn_conv_bwd)
_onednn_input_grad.defvjp(
    lambda g, k, s, p, shape: (_onednn_input_grad(g, k, s, p, shape), (g, k)),
    _onednn_input_grad_bwd)
_onednn_kernel_grad.defvjp(
    lambda x, g, s, p, shape: (_onednn_kernel_grad(x, g, s, p, shape), (x, g)),
    _onednn_kernel_grad_bwd)


CONV_IMPLS = ("onednn", "taps", "im2col", "gemm", "xla")
# Experiments may set this to one of CONV_IMPLS before tracing; None picks per backend.
CONV_IMPL: str | None = None


def conv_impl(backend: str | None = None) -> str:
  """How ``conv2d`` computes, chosen at trace time (like ``darts_net.depthwise``).

  * ``"onednn"``: oneDNN's forward, input-gradient and kernel-gradient primitives on
    NHWC activations, as XLA FFI calls (``jaxnas.native``; CPU, float32). The CPU
    default wherever the library builds (a C++ compiler and ``libdnnl-dev``): the
    issue-3 benchmark's convs train 1.4-2.4x faster than with ``"taps"``
    (experiments/conv_vs_torch_cpu.py) and the benchmark 90 -> 69 s (BUILD_NOTES.md).
  * ``"taps"``: XLA's conv forward (16-channel convs widened to 17 output channels,
    ``_conv_wide``; tiny ones as an im2col matmul, ``_tiny_conv``), a hand-written VJP
    in canonical layouts with the kernel gradient as per-tap matmuls over cache-sized
    batch chunks (``_conv_canonical_bwd``; XLA:CPU, experiments/NOTES_population.md).
  * ``"im2col"``: the same VJP, the kernel gradient as one im2col matmul.
  * ``"gemm"``: forward and both gradients as matmuls (``_conv_gemm``).
  * ``"xla"``: XLA's conv and autodiff's transposed convolutions.

  On CPU without oneDNN the default is ``"taps"``, and one line on stderr says why (once
  per process). Off CPU it is ``"im2col"``: the chunk scan of ``"taps"`` is hundreds of
  tiny serial kernels on a GPU; with ``"im2col"`` the vmapped population of the issue-3
  benchmark trains at 740 instead of 445 candidate-steps/s on an H200 (BUILD_NOTES.md;
  the other forms were measured per conv only).
  """
  impl = CONV_IMPL or _SCOPED_CONV_IMPL
  if impl is None:
    if (backend or jax.default_backend()) != "cpu":
      impl = "im2col"
    else:
      impl = "onednn" if native.onednn_available(warn=True) else "taps"
  return _check_conv_impl(impl)


_SCOPED_CONV_IMPL: str | None = None


@contextlib.contextmanager
def batch_sharded():
  """Traces inside compute convs for a batch split over devices by XLA's SPMD partitioner
  (data-parallel DARTS): ``conv_impl()`` is ``"im2col"`` unless ``CONV_IMPL`` is set.

  The CPU default's kernel gradient is a scan over batch chunks; a loop over a
  sharded dimension makes the partitioner all-gather the batch, so every device
  would compute the kernel gradients of the whole batch (8 host devices, test
  supernet: 391 all-gathers, a program 1.8x the single-device one).
  ``"im2col"``'s one matmul contracting the batch partitions into local partial
  sums and an all-reduce.
  """
  global _SCOPED_CONV_IMPL
  previous, _SCOPED_CONV_IMPL = _SCOPED_CONV_IMPL, "im2col"
  try:
    yield
  finally:
    _SCOPED_CONV_IMPL = previous


def _check_conv_impl(impl: str) -> str:
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; choose one of {', '.join(CONV_IMPLS)}")
  return impl


def conv2d(x, kernel, stride: int = 1, padding: int | None = None, impl: str | None = None):
  """NHWC conv with symmetric PyTorch-style padding (``SAME`` pads stride-2 convs asymmetrically).

  ``impl`` is one of ``CONV_IMPLS`` (default ``conv_impl()``); all compute the
  same function and gradients.
  """
  p = kernel.shape[0] // 2 if padding is None else padding
  impl = conv_impl() if impl is None else _check_conv_impl(impl)
  if impl == "onednn":
    if native.onednn_status() is not None:
      raise ValueError(f"conv impl 'onednn' is unavailable: {native.onednn_status()}")
    if x.dtype == kernel.dtype == jnp.float32:
      return _onednn_conv(x, kernel, stride, p)
    impl = "taps"  # the FFI kernels are float32 only
  if impl == "gemm":
    return _conv_gemm(x, kernel, stride, p)
  if impl == "xla":
    return _conv(x, kernel, stride, ((p, p), (p, p)))
  return _conv_canonical(x, kernel, stride, p, impl == "im2col")


def _pool_counts(h: int, w: int, stride: int = 1) -> np.ndarray:
  """Real (non-padding) pixels under each 3x3 window (padding 1) at ``stride``: at stride 1,
  4 at corners, 6 on edges, 9 inside."""
  def counts(n):
    o = np.arange((n - 1) // stride + 1) * stride
    return np.minimum(o + 1, n - 1) - np.maximum(o - 1, 0) + 1
  return (counts(h)[:, None] * counts(w)[None, :]).astype(np.float32)


POOL_IMPLS = ("sum", "window")
# Experiments may set this to one of POOL_IMPLS before tracing; None picks per backend.
POOL_IMPL: str | None = None


def pool_impl(backend: str | None = None) -> str:
  """How the average pools compute, chosen at trace time (like ``conv_impl``).

  * ``"sum"``: the 3x3 pool at stride 1 as a separable window sum, the 2x2 pool
    as a reshape and a mean. XLA:CPU runs ``reduce_window`` and its gradient as
    generic windowed loops; these forms are 1.8-3.6x faster there
    (experiments/NOTES_population.md, round 4).
  * ``"window"``: ``lax.reduce_window``, the form the accelerators were measured
    with (740 candidate-steps/s for the issue-3 population on an H200; the one
    GPU run with ``"sum"`` gave 619, not bisected, BUILD_NOTES.md).

  Off CPU the default is ``"window"``.
  """
  impl = POOL_IMPL
  if impl is None:
    impl = "sum" if (backend or jax.default_backend()) == "cpu" else "window"
  if impl not in POOL_IMPLS:
    raise ValueError(f"unknown pool impl {impl!r}; choose one of {', '.join(POOL_IMPLS)}")
  return impl


def avg_pool_3x3(x, stride: int = 1, impl: str | None = None):
  """3x3 average pool, padding 1, ``count_include_pad=False`` as in NAS-Bench-201 and DARTS.

  The divisor is a small numpy constant: ``nn.avg_pool(count_include_pad=False)``
  instead pools a batch-sized array of ones, which XLA then constant-folds for
  ~10 s per pool at compile time. At stride 1 with ``impl`` (default ``pool_impl()``)
  ``"sum"`` the window sum is separable, three shifted adds per axis, which XLA fuses
  with the division (and autodiff turns into the same form).
  """
  if stride == 1 and (impl or pool_impl()) == "sum":
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = xp[:, 0:h] + xp[:, 1:h + 1] + xp[:, 2:h + 2]
    s = rows[:, :, 0:w] + rows[:, :, 1:w + 1] + rows[:, :, 2:w + 2]
  else:
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, stride, stride, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
  inv = 1.0 / _pool_counts(x.shape[1], x.shape[2], stride)
  return s * jnp.asarray(inv[None, :, :, None], x.dtype)


def avg_pool_2x2(x):
  """``nn.avg_pool(x, (2, 2), strides=(2, 2))`` (padding VALID); with
  ``pool_impl() == "sum"`` as a reshape and a mean."""
  if pool_impl() == "window":
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  n, h, w = x.shape[0], x.shape[1] // 2, x.shape[2] // 2
  return x[:, :2 * h, :2 * w].reshape(n, h, 2, w, 2, x.shape[3]).mean((2, 4))


BN_EPSILON = 1e-5


class BatchNorm(nn.Module):
  """``nn.BatchNorm`` with PyTorch's defaults (momentum 0.1 there = 0.9 here, eps 1e-5)."""
  momentum: float = 0.9

  def setup(self):
    self.bn = nn.BatchNorm(momentum=self.momentum, epsilon=BN_EPSILON)

  def __call__(self, x, train: bool):
    return self.bn(x, use_running_average=not train)

  def affine(self):
    """``(scale, bias)`` of the normalisation."""
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


def _bn_normalize(z, mean, var, scale, bias):
  """``z`` normalised with ``mean``/``var`` (per channel), as ``nn.BatchNorm`` computes it."""
  return (z - mean) * (jax.lax.rsqrt(var + BN_EPSILON) * scale) + bias


def batch_norm(z, scale, bias):
  """Training-mode BN of NHWC ``z`` with batch statistics, as ``nn.BatchNorm`` computes it;
  returns ``(y, (mean, var))``."""
  mean = jnp.mean(z, (0, 1, 2))
  var = jnp.maximum(0.0, jnp.mean(jax.lax.square(z), (0, 1, 2)) - jax.lax.square(mean))
  return _bn_normalize(z, mean, var, scale, bias), (mean, var)


class ReLUConvBN(nn.Module):
  """ReLU -> Conv(k, stride, bias-free) -> BN: NAS-Bench-201's ``ReLUConvBN``."""
  in_features: int
  features: int
  kernel_size: int
  stride: int = 1
  bn_momentum: float = 0.9

  def setup(self):
    k = self.kernel_size
    self.kernel = self.param("kernel", conv_init, (k, k, self.in_features, self.features))
    self.norm = BatchNorm(self.bn_momentum)

  def __call__(self, x, train: bool):
    return self.norm(conv2d(nn.relu(x), self.kernel, self.stride), train)


def _centre(kernel_1x1):
  """A 1x1 kernel as the centre tap of a 3x3 kernel: the same conv with padding 1."""
  return jnp.pad(kernel_1x1, ((1, 1), (1, 1), (0, 0), (0, 0)))


@functools.cache
def _edge_switch_branches(conv: str, pool: str):
  """The five ops of a cell edge in training mode for one (``conv_impl``, ``pool_impl``)
  pair, as ``(forward, backward, evaluate)`` tuples of functions of their operands:
  ``lax.switch`` reuses its trace of a function at the same shapes, so the six edges of a
  stage trace each branch once, not six times (the benchmark's program traced its 72
  switches in ~2.7 s). Forward branches map ``(x, k1, s1, b1, k3, s3, b3)`` to
  ``(y, z, mean, var)``, ``z`` the conv's output before BN (zeros for the other ops) and
  ``mean``/``var`` its batch statistics; backward branches map those operands plus ``z``
  and the output gradient ``g`` to the gradients of ``(x, k1, s1, b1, k3, s3, b3)``;
  evaluation branches map ``(x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3)`` to ``y``, BN
  with the running statistics ``m``/``v`` (computed as ``nn.BatchNorm`` does).
  The training-mode forward and backward are one custom VJP, ``switch_edge``."""
  relu_conv = lambda x, k: conv2d(nn.relu(x), k, impl=conv)
  pool3 = functools.partial(avg_pool_3x3, impl=pool)

  def zero_stats(x):
    zc = jnp.zeros(x.shape[-1:], x.dtype)
    return jnp.zeros_like(x), zc, zc

  def conv_bn(x, k, s, b):
    z = relu_conv(x, k)
    y, (mean, var) = batch_norm(z, s, b)
    return y, z, mean, var

  def conv_bn_grads(x, k, s, b, z, g):
    _, bn_vjp = jax.vjp(lambda z, s, b: batch_norm(z, s, b)[0], z, s, b)
    gz, gs, gb = bn_vjp(g)
    gx, gk = jax.vjp(relu_conv, x, k)[1](gz)
    return gx, gk, gs, gb

  def no_param_grads(gx, k1, s1, k3, s3):
    z1, z3, zc = jnp.zeros_like(k1), jnp.zeros_like(k3), jnp.zeros_like(s1)
    return gx, z1, zc, zc, z3, zc, zc

  def conv1_grads(x, k1, s1, b1, k3, s3, b3, z, g):
    gx, gk, gs, gb = conv_bn_grads(x, k1, s1, b1, z, g)
    return gx, gk, gs, gb, jnp.zeros_like(k3), jnp.zeros_like(s3), jnp.zeros_like(b3)

  def conv3_grads(x, k1, s1, b1, k3, s3, b3, z, g):
    gx, gk, gs, gb = conv_bn_grads(x, k3, s3, b3, z, g)
    return gx, jnp.zeros_like(k1), jnp.zeros_like(s1), jnp.zeros_like(b1), gk, gs, gb

  forward = (
      lambda x, k1, s1, b1, k3, s3, b3: (jnp.zeros_like(x),) + zero_stats(x),
      lambda x, k1, s1, b1, k3, s3, b3: (x,) + zero_stats(x),
      lambda x, k1, s1, b1, k3, s3, b3: conv_bn(x, k1, s1, b1),
      lambda x, k1, s1, b1, k3, s3, b3: conv_bn(x, k3, s3, b3),
      lambda x, k1, s1, b1, k3, s3, b3: (pool3(x),) + zero_stats(x),
  )
  backward = (
      lambda x, k1, s1, b1, k3, s3, b3, z, g: no_param_grads(jnp.zeros_like(x), k1, s1, k3, s3),
      lambda x, k1, s1, b1, k3, s3, b3, z, g: no_param_grads(g, k1, s1, k3, s3),
      conv1_grads,
      conv3_grads,
      lambda x, k1, s1, b1, k3, s3, b3, z, g: no_param_grads(jax.vjp(pool3, x)[1](g)[0], k1,
                                                             s1, k3, s3),
  )

  def conv_bn_eval(x, k, s, b, mean, var):
    return _bn_normalize(relu_conv(x, k), mean, var, s, b)

  evaluate = (
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: jnp.zeros_like(x),
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: x,
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: conv_bn_eval(x, k1, s1, b1, m1, v1),
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: conv_bn_eval(x, k3, s3, b3, m3, v3),
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: pool3(x),
  )
  return forward, backward, evaluate


_FORWARD, _BACKWARD, _EVALUATE = range(3)


def _edge_switch(op, *operands, mode=_FORWARD):
  """``lax.switch`` over the edge branches of ``mode`` for the current impls."""
  return jax.lax.switch(op, _edge_switch_branches(conv_impl(), pool_impl())[mode], *operands)


@jax.custom_vjp
def switch_edge(op, x, k1, s1, b1, k3, s3, b3):
  """A cell edge in training mode, the op chosen by ``lax.switch``: ``(y, mean, var)``.

  ``k1, s1, b1`` / ``k3, s3, b3`` are the kernel and BN scale/bias of the 1x1 /
  3x3 ReLU-Conv-BN; ``mean``/``var`` are the chosen conv's batch statistics
  (zeros for the other ops; they get no gradient).

  Why a custom VJP: differentiating ``lax.switch`` makes every branch return
  the union of all branches' residuals, the branches not taken filling theirs
  with zeros, which on CPU cost ~15% of a training step in broadcasts and
  copies (experiments/NOTES_population.md). Here the forward keeps one
  residual set (the edge's input, the parameters and the conv output before
  BN), and the backward is a second switch whose branches differentiate their
  own op (BN statistics recomputed from that conv output).
  """
  y, _, mean, var = _edge_switch(op, x, k1, s1, b1, k3, s3, b3)
  return y, mean, var


def _switch_edge_fwd(op, x, k1, s1, b1, k3, s3, b3):
  y, z, mean, var = _edge_switch(op, x, k1, s1, b1, k3, s3, b3)
  return (y, mean, var), (op, x, k1, s1, b1, k3, s3, b3, z)


def _switch_edge_bwd(res, ct):
  op, *operands = res
  return (None,) + tuple(_edge_switch(op, *operands, ct[0], mode=_BACKWARD))


switch_edge.defvjp(_switch_edge_fwd, _switch_edge_bwd)


class Edge(nn.Module):
  """One cell edge: ``op`` (int32 scalar, data) or ``fixed_op`` (Python int) applied to ``x``."""
  features: int
  op_impl: str = "switch"
  fixed_op: int | None = None
  bn_momentum: float = 0.9

  def setup(self):
    want = lambda o: self.fixed_op is None or self.fixed_op == o
    if want(CONV1):
      self.nor_conv_1x1 = ReLUConvBN(self.features, self.features, 1,
                                     bn_momentum=self.bn_momentum)
    if want(CONV3):
      self.nor_conv_3x3 = ReLUConvBN(self.features, self.features, 3,
                                     bn_momentum=self.bn_momentum)

  def _branches(self, train):
    return [
        lambda m, x: jnp.zeros_like(x),
        lambda m, x: x,
        lambda m, x: m.nor_conv_1x1(x, train),
        lambda m, x: m.nor_conv_3x3(x, train),
        lambda m, x: avg_pool_3x3(x),
    ]

  def __call__(self, x, op, train: bool):
    branches = self._branches(train)
    if self.fixed_op is not None:
      return branches[self.fixed_op](self, x)
    if self.is_initializing():
      # Create every op's variables, so all branches see one variable structure.
      for branch in branches:
        branch(self, x)
    if self.op_impl == "switch" and train:
      c1, c3 = self.nor_conv_1x1, self.nor_conv_3x3
      y, mean, var = switch_edge(op, x, c1.kernel, *c1.norm.affine(), c3.kernel,
                                 *c3.norm.affine())
      mean, var = jax.lax.stop_gradient((mean, var))
      c1.norm.update_stats(mean, var, op == CONV1)
      c3.norm.update_stats(mean, var, op == CONV3)
      return y
    if self.op_impl == "switch":  # evaluation: BN with the running statistics
      c1, c3 = self.nor_conv_1x1, self.nor_conv_3x3
      return _edge_switch(op, x, c1.kernel, *c1.norm.affine(), *c1.norm.running(), c3.kernel,
                          *c3.norm.affine(), *c3.norm.running(), mode=_EVALUATE)
    if self.op_impl == "onehot":
      w = jax.nn.one_hot(op, len(OPS), dtype=x.dtype)
      return sum(w[k] * b(self, x) for k, b in enumerate(branches))
    if self.op_impl == "kernel":
      k3 = self.nor_conv_3x3.kernel
      k1 = _centre(self.nor_conv_1x1.kernel)
      kernel = jnp.where(op == CONV3, k3, jnp.where(op == CONV1, k1, jnp.zeros_like(k3)))
      y = conv2d(nn.relu(x), kernel)
      # Each conv op keeps its own BN (as in the specialised net); running
      # stats of the op not chosen also see y, but they are never read for
      # this cell, and their gradients are zero through the select below.
      y = jnp.where(op == CONV1, self.nor_conv_1x1.norm(y, train),
                    self.nor_conv_3x3.norm(y, train))
      out = jnp.where(op == SKIP, x, jnp.zeros_like(x))
      out = jnp.where((op == CONV1) | (op == CONV3), y, out)
      return jnp.where(op == POOL, avg_pool_3x3(x), out)
    raise ValueError(f"unknown op_impl {self.op_impl!r}; choose one of {', '.join(OP_IMPLS)}")


class Cell(nn.Module):
  """The NAS-Bench-201 cell: node j is the sum of op_ji(node i) over i < j; output node 3."""
  features: int
  op_impl: str = "switch"
  fixed_arch: tuple[int, ...] | None = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, arch, train: bool):
    nodes = [x]
    incoming = [[] for _ in range(NUM_NODES)]
    for e, (j, i) in enumerate(EDGES):
      fixed = None if self.fixed_arch is None else self.fixed_arch[e]
      edge = Edge(self.features, self.op_impl, fixed, self.bn_momentum, name=f"edge{e}")
      incoming[j].append((edge, i, None if arch is None else arch[e]))
      if len(incoming[j]) == j:  # all inputs of node j are known (edges are in node order)
        nodes.append(sum(m(nodes[src], op, train) for m, src, op in incoming[j]))
    return nodes[-1]


class ResidualReduction(nn.Module):
  """NAS-Bench-201's ``ResNetBasicblock`` with stride 2 (He et al. 2016).

  ``ReLUConvBN(3x3, s2) -> ReLUConvBN(3x3)`` plus a shortcut
  ``AvgPool(2, 2) -> Conv1x1`` (bias-free, no BN); no activation after the sum.
  """
  features: int
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    c_in, c, m = x.shape[-1], self.features, self.bn_momentum
    y = ReLUConvBN(c_in, c, 3, stride=2, bn_momentum=m, name="conv_a")(x, train)
    y = ReLUConvBN(c, c, 3, bn_momentum=m, name="conv_b")(y, train)
    r = avg_pool_2x2(x)
    k = self.param("shortcut", conv_init, (1, 1, x.shape[-1], self.features))
    return y + conv2d(r, k, padding=0)


class NB201Network(nn.Module):
  """NAS-Bench-201 network; ``__call__(images, arch, train)`` with ``arch`` an ``int32[6]`` array.

  Attributes:
    channels: C, the width of the first stage (NAS-Bench-201: 16).
    cells: N, cells per stage (NAS-Bench-201: 5).
    num_classes: classifier outputs.
    op_impl: how the data-dependent op choice runs, one of ``OP_IMPLS``.
    fixed_arch: a Python tuple of 6 op indices for the specialised network (then
      ``arch`` is ignored and may be ``None``).
    bn_momentum: running-statistics decay (0.9 = PyTorch's momentum 0.1).
  """
  channels: int = 16
  cells: int = 5
  num_classes: int = 10
  op_impl: str = "switch"
  fixed_arch: tuple[int, ...] | None = None
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, images, arch=None, train: bool = False):
    if self.fixed_arch is None and arch is None:
      raise ValueError("NB201Network needs an arch array unless fixed_arch is set")
    if self.fixed_arch is not None:
      arch = None
    return skeleton(self, images, train, lambda x, c, name: Cell(
        c, self.op_impl, self.fixed_arch, self.bn_momentum, name=name)(x, arch, train))


def skeleton(net: nn.Module, images, train: bool, cell):
  """NAS-Bench-201's macro skeleton, built inside ``net``'s compact ``__call__``.

  ``net`` has the fields ``channels``, ``cells``, ``num_classes`` and
  ``bn_momentum``; ``cell(x, features, name)`` applies one cell (the
  arch-as-data ``Cell`` here, the supernet's mixed cell in ``supernet.py``), so
  every network of the space shares the stem, reductions, head and parameter
  names.
  """
  m = net.bn_momentum
  k = net.param("stem", conv_init, (3, 3, images.shape[-1], net.channels))
  x = BatchNorm(m, name="stem_bn")(conv2d(images, k), train)
  for stage in range(3):
    c = net.channels * 2 ** stage
    if stage:
      x = ResidualReduction(c, m, name=f"reduce{stage}")(x, train)
    for n in range(net.cells):
      x = cell(x, c, f"cell{stage}_{n}")
  x = nn.relu(BatchNorm(m, name="last_bn")(x, train))
  return nn.Dense(net.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


def specialise(net: NB201Network, arch: Sequence[int]) -> NB201Network:
  """The specialised network of one cell: only its ops are built and computed."""
  fixed = tuple(int(o) for o in np.asarray(arch).reshape(-1))
  if len(fixed) != NUM_EDGES or min(fixed) < 0 or max(fixed) >= len(OPS):
    raise ValueError(f"not a NAS-Bench-201 architecture: {list(fixed)}")
  return net.clone(fixed_arch=fixed)


def specialise_variables(variables, arch: Sequence[int]):
  """Prunes arch-as-data variables to the specialised network's tree for ``arch``.

  Edges whose op is ``none``, ``skip_connect`` or ``avg_pool_3x3`` lose all
  variables; conv edges keep only their chosen conv (and its BN).
  """
  fixed = tuple(int(o) for o in np.asarray(arch).reshape(-1))
  keep = {CONV1: "nor_conv_1x1", CONV3: "nor_conv_3x3"}

  def prune(tree):
    out = {}
    for name, sub in tree.items():
      if name.startswith("edge") and name[4:].isdigit():
        op = fixed[int(name[4:])]
        sub = {k: v for k, v in sub.items() if keep.get(op) == k}
        if sub:
          out[name] = sub
      elif isinstance(sub, dict):
        pruned = prune(sub)
        if pruned:
          out[name] = pruned
      else:
        out[name] = sub
    return out

  return {col: prune(dict(tree)) for col, tree in variables.items()}


def cost(arch, channels: int = 16, cells: int = 5, num_classes: int = 10, in_channels: int = 3,
         image_size: int = 32):
  """Exact parameter count and FLOPs of the specialised network for ``arch`` (jittable, vmappable).

  Parameters are the trainable ones (conv kernels, BN scale/bias, classifier);
  BN running statistics are not counted. FLOPs are multiply-accumulates of the
  convolutions and the classifier, the convention of NAS-Bench-201's
  ``FLOPs`` column (in M there); BN, ReLU, pooling and sums are not counted.
  Returns ``(params, flops)`` as int32 scalars (exact below 2**31).
  """
  ops = jnp.asarray(arch, jnp.int32)
  n1 = jnp.sum(ops == CONV1)
  n3 = jnp.sum(ops == CONV3)
  params = 9 * in_channels * channels + 2 * channels
  flops = image_size * image_size * 9 * in_channels * channels
  h = image_size
  c_prev = channels
  for stage in range(3):
    c = channels * 2 ** stage
    if stage:
      h_out = (h - 1) // 2 + 1  # 3x3, stride 2, padding 1
      params += 9 * c_prev * c + 2 * c + 9 * c * c + 2 * c + c_prev * c
      flops += h_out * h_out * (9 * c_prev * c + 9 * c * c) + (h // 2) ** 2 * c_prev * c
      h = h_out
    per_cell_params = n1 * (c * c + 2 * c) + n3 * (9 * c * c + 2 * c)
    per_cell_flops = h * h * (n1 * c * c + n3 * 9 * c * c)
    params = params + cells * per_cell_params
    flops = flops + cells * per_cell_flops
    c_prev = c
  params = params + 2 * c_prev + c_prev * num_classes + num_classes
  flops = flops + c_prev * num_classes
  return jnp.asarray(params, jnp.int32), jnp.asarray(flops, jnp.int32)
