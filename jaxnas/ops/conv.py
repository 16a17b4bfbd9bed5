"""The NHWC convolution of the networks, ``conv2d``, and its implementations.

``CONV_IMPLS`` compute the same function and gradients and differ in how XLA (or oneDNN)
runs them, which decides their speed per backend (``conv_impl`` lists them, with the
measurements behind each backend's default; experiments/NOTES_population.md). The
implementation is an argument of ``conv2d``; the networks take it from their
``ops.Execution``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import native


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
  experiments/NOTES_population.md)."""
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
  (experiments/NOTES_population.md)."""
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
  (experiments/NOTES_population.md).
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


def _onednn(target, shape, a, b, spec):
  """One oneDNN convolution primitive (``jaxnas.native``) as an XLA FFI call; ``spec`` is
  ``(stride, pad, groups, dilation)``.

  Under ``vmap`` a depthwise call (every operand and the result have ``groups``
  channels: forward, input and kernel gradient of a depthwise conv) folds the mapped
  axis into the channels, one depthwise conv of ``n * groups`` channels (a mixed edge
  group's per-edge kernels, ``models.remat.PureEdges``), and nested vmaps fold every
  axis; other calls run one after another in a loop, which XLA compiles as a while loop
  of slices and updates.
  """
  stride, pad, groups, dilation = spec

  def call(a, b, shape, groups):
    ffi = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                           vmap_method="sequential")
    return ffi(a, b, stride=np.int64(stride), pad=np.int64(pad), groups=np.int64(groups),
               dilation=np.int64(dilation), threads=np.int64(_onednn_threads()))

  if not a.shape[-1] == b.shape[-1] == shape[-1] == groups:
    return call(a, b, shape, groups)

  @jax.custom_batching.custom_vmap
  def depthwise_call(a, b):
    return call(a, b, shape, groups)

  @depthwise_call.def_vmap
  def fold(n, batched, a, b):
    def channels(v, is_batched):  # [n, ..., C] (or [..., C], shared) -> [..., n * C]
      v = jnp.moveaxis(v, 0, -2) if is_batched else jnp.broadcast_to(
          v[..., None, :], v.shape[:-1] + (n, v.shape[-1]))
      return v.reshape(v.shape[:-2] + (-1,))
    # A depthwise call again, so an enclosing vmap folds its axis too (nested vmaps: a
    # group of edges over several inputs) instead of looping over the folded call.
    out = _onednn(target, shape[:-1] + (n * groups,), channels(a, batched[0]),
                  channels(b, batched[1]), (stride, pad, n * groups, dilation))
    return jnp.moveaxis(out.reshape(shape[:-1] + (n, groups)), -2, 0), True

  return depthwise_call(a, b)


# Forward, input gradient and kernel gradient of the oneDNN conv (``spec``: stride, pad,
# ``groups`` channel groups, the input's channels = groups x the kernel's third axis, and
# dilation): each is linear in each operand and its VJP is the other two, so reverse over
# reverse (DARTS' exact mixed second derivative) works too.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onednn_conv(x, kernel, spec):
  stride, pad, _, dilation = spec
  span, (n, h, w, _) = (kernel.shape[0] - 1) * dilation + 1, x.shape
  shape = (n, (h + 2 * pad - span) // stride + 1, (w + 2 * pad - span) // stride + 1,
           kernel.shape[3])
  return _onednn("jaxnas_onednn_conv_fwd", shape, x, kernel, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_input_grad(g, kernel, spec, x_shape):
  return _onednn("jaxnas_onednn_conv_bwd_data", x_shape, g, kernel, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_kernel_grad(x, g, spec, kernel_shape):
  return _onednn("jaxnas_onednn_conv_bwd_weights", kernel_shape, x, g, spec)


def _onednn_conv_bwd(spec, res, g):
  x, kernel = res
  return (_onednn_input_grad(g, kernel, spec, x.shape),
          _onednn_kernel_grad(x, g, spec, kernel.shape))


def _onednn_input_grad_bwd(spec, x_shape, res, c):
  g, kernel = res  # <c, conv^T(g; kernel)> = <conv(c; kernel), g>
  return _onednn_conv(c, kernel, spec), _onednn_kernel_grad(c, g, spec, kernel.shape)


def _onednn_kernel_grad_bwd(spec, kernel_shape, res, c):
  x, g = res  # <c, dK(x, g)> = <conv(x; c), g>
  return _onednn_input_grad(g, c, spec, x.shape), _onednn_conv(x, c, spec)


_onednn_conv.defvjp(lambda x, k, spec: (_onednn_conv(x, k, spec), (x, k)), _onednn_conv_bwd)
_onednn_input_grad.defvjp(
    lambda g, k, spec, shape: (_onednn_input_grad(g, k, spec, shape), (g, k)),
    _onednn_input_grad_bwd)
_onednn_kernel_grad.defvjp(
    lambda x, g, spec, shape: (_onednn_kernel_grad(x, g, spec, shape), (x, g)),
    _onednn_kernel_grad_bwd)


def onednn_depthwise(x, kernel, stride: int, pad: int, dilation: int = 1):
  """Depthwise NHWC conv (``kernel`` ``[k, k, 1, C]``, ``dilation``) as oneDNN's grouped
  convolution (``groups = C``), forward and both gradients (CPU, float32)."""
  return _onednn_conv(x, kernel, (stride, pad, x.shape[-1], dilation))


CONV_IMPLS = ("onednn", "taps", "im2col", "gemm", "xla")


def conv_impl(backend: str | None = None) -> str:
  """The measured default ``conv2d`` implementation of ``backend`` (default: JAX's).

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
  if (backend or jax.default_backend()) != "cpu":
    return "im2col"
  return "onednn" if native.onednn_available(warn=True) else "taps"


def check_conv_impl(impl: str) -> str:
  """``impl`` if it names a ``conv2d`` implementation; a one-line ValueError otherwise."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; choose one of {', '.join(CONV_IMPLS)}")
  return impl


def conv2d(x, kernel, stride: int = 1, padding: int | None = None, impl: str | None = None):
  """NHWC conv with symmetric PyTorch-style padding (``SAME`` pads stride-2 convs asymmetrically).

  ``impl`` is one of ``CONV_IMPLS`` (None: ``conv_impl()``, the default backend's); all
  compute the same function and gradients.
  """
  p = kernel.shape[0] // 2 if padding is None else padding
  impl = conv_impl() if impl is None else check_conv_impl(impl)
  if impl == "onednn":
    if native.onednn_status() is not None:
      raise ValueError(f"conv impl 'onednn' is unavailable: {native.onednn_status()}")
    if x.dtype == kernel.dtype == jnp.float32:
      return _onednn_conv(x, kernel, (stride, p, 1, 1))
    impl = "taps"  # the FFI kernels are float32 only
  if impl == "gemm":
    return _conv_gemm(x, kernel, stride, p)
  if impl == "xla":
    return _conv(x, kernel, stride, ((p, p), (p, p)))
  return _conv_canonical(x, kernel, stride, p, impl == "im2col")

