"""The MBConv network of ``jaxnas.spaces.mbconv``, written only with the public choice blocks.

An inverted-residual block (Sandler et al. 2018, MobileNetV2): a 1x1 expansion
to ``expand x`` its input channels, BN, ReLU6; a ``k x k`` depthwise conv (the
block's stride), BN, ReLU6; a 1x1 projection, BN; plus the input where the shape
is kept (every block of a stage but the first). Each stage is an ``ElasticDepth``
over its four blocks (the first two always run); widths are ``ElasticConv``
prefixes (the expansion's width is ``expand * input width``, as in Once-for-All),
kernels centre crops of a 7x7 depthwise kernel. The same module, called with
Python numbers, is the specialised network of one architecture (``jaxnas.nn``),
so weight sharing and export need nothing of their own; it is what a user could
have written with ``jaxnas.nn`` and ``jaxnas.searchable``.

``cost`` counts parameters and multiply-accumulates exactly (conv and linear
layers; BN parameters counted, BN arithmetic not), as ``nb201_net.cost`` does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnas import nn as jnn
from jaxnas.ops import Execution
from jaxnas.spaces.mbconv import DEPTHS, EXPANSIONS, HEAD, KERNELS, STAGES, STEM, stage_widths


def own_widths(kernel_impl: str, width_impl: str) -> bool:
  """Whether traced widths run as one specialised branch each (``MBConv``'s switch)."""
  return kernel_impl == "switch" and width_impl == "switch"


class MBConv(nn.Module):
  """One inverted-residual block; ``choice = (kernel, expand, in_width, out_width)``.

  ``in_widths`` / ``out_widths``: the candidate input and output widths. With
  ``kernel_impl`` and ``width_impl`` "switch" and traced widths the block runs under
  ``jnn.specialised_switch``: one branch per (expansion, input width, output width), each
  the specialised block on slices of the elastic variables (``jnn.Sliced``), its output
  padded to ``out_max``. A member running alone (``lax.map``) then computes only its own
  widths, where the masked form computes the widest (about 2.2x the multiply-accumulates
  of a random member); every one of the 9-27 branches is compiled (the network's
  population program: 124 s instead of 20 s on a CPU core, BUILD_NOTES.md).
  """
  in_max: int
  out_max: int
  stride: int
  residual: bool
  conv: str = "auto"
  kernel_impl: str = "switch"
  bn_momentum: float = 0.9
  width_impl: str = "mask"
  in_widths: tuple = ()
  out_widths: tuple = ()

  def setup(self):
    mid_max = max(EXPANSIONS) * self.in_max
    self.expand = jnn.ElasticConv(mid_max, 1, conv=self.conv, in_features=self.in_max)
    self.expand_bn = jnn.BatchNorm(self.bn_momentum, features=mid_max)
    self.depthwise = jnn.ElasticConv(mid_max, max(KERNELS), strides=self.stride, depthwise=True,
                                     conv=self.conv, kernel_impl=self.kernel_impl,
                                     kernel_sizes=KERNELS)
    self.depthwise_bn = jnn.BatchNorm(self.bn_momentum, features=mid_max)
    self.project = jnn.ElasticConv(self.out_max, 1, conv=self.conv, in_features=mid_max)
    self.project_bn = jnn.BatchNorm(self.bn_momentum, features=self.out_max)

  def block(self, x, kernel, mid, w_out, train):
    """The block at expansion width ``mid`` and output width ``w_out`` (arrays: masked;
    Python ints: specialised; ``Sliced``: specialised on the elastic variables)."""
    h = jnn.relu6(self.expand_bn(self.expand(x, width=mid), train, width=mid))
    h = self.depthwise(h, width=mid if isinstance(mid, jnn.Sliced) else None,
                       kernel_size=kernel)
    h = jnn.relu6(self.depthwise_bn(h, train, width=mid))
    h = self.project_bn(self.project(h, width=w_out), train, width=w_out)
    return x + h if self.residual else h

  def __call__(self, x, choice, train=False):
    kernel, expand, w_in, w_out = choice
    widths = (expand, w_in, w_out)
    if (not own_widths(self.kernel_impl, self.width_impl)
        or all(jnn.is_static(c) for c in widths)
        or any(isinstance(c, jnn.Mixture) for c in choice) or self.is_initializing()):
      return self.block(x, kernel, expand * w_in, w_out, train)
    options = lambda c, cands: (int(c),) if jnn.is_static(c) else cands
    rows = [(e, i, o) for e in options(expand, EXPANSIONS)
            for i in options(w_in, self.in_widths) for o in options(w_out, self.out_widths)
            if not self.residual or i == o]  # a residual block keeps its width

    def branch(mdl, x, e, i, o):
      y = mdl.block(x[..., :i], kernel, jnn.Sliced(e * i), jnn.Sliced(o), train)
      return jnp.pad(y, ((0, 0),) * (y.ndim - 1) + ((0, mdl.out_max - o),))

    return jnn.specialised_switch(self, branch, widths, rows, x)


class MBConvNetwork(nn.Module):
  """Stem, the four stages of ``spaces.mbconv.STAGES``, head; ``arch`` as ``mbconv_space``
  builds it (arrays: one program for every member; Python numbers: the specialised network;
  ``Mixture``s: the relaxation).

  ``kernel_impl``: how a traced kernel choice runs (``jnn.ElasticConv``): ``"switch"``
  computes only the chosen size where members run one at a time (``lax.map``), ``"mask"``
  always the 7x7 conv with the outer taps zeroed. ``width_impl``: with ``"switch"`` (and
  ``kernel_impl="switch"``) traced widths run as ``MBConv`` says, each member only its own;
  ``"mask"``: the widest network, inactive channels zero.
  """
  num_classes: int = 10
  bn_momentum: float = 0.9
  kernel_impl: str = "switch"
  width_impl: str = "mask"
  execution: Execution = Execution()

  @property
  def own_widths(self) -> bool:
    """Whether a member running alone computes only its own widths (``own_widths``): its
    training work is then its own multiply-accumulates, not the widest network's."""
    return own_widths(self.kernel_impl, self.width_impl)

  @nn.compact
  def __call__(self, x, arch, train=False):
    conv = self.execution.resolve().conv
    bn = lambda name: jnn.BatchNorm(self.bn_momentum, name=name)
    x = jnn.ElasticConv(STEM, 3, conv=conv, name="stem")(x)
    x = jnn.relu6(bn("stem_bn")(x, train))
    w_in, in_max, in_widths = STEM, STEM, (STEM,)
    for s, stage in enumerate(STAGES, 1):
      a = arch[f"stage{s}"]
      w = a["width"]
      blocks = [MBConv(in_max if b == 1 else stage.width, stage.width,
                       stage.stride if b == 1 else 1, residual=b > 1, conv=conv,
                       kernel_impl=self.kernel_impl, width_impl=self.width_impl,
                       bn_momentum=self.bn_momentum,
                       in_widths=in_widths if b == 1 else stage_widths(stage),
                       out_widths=stage_widths(stage), name=f"stage{s}_block{b}")
                for b in range(1, max(DEPTHS) + 1)]
      choices = [(a[f"block{b}"]["kernel"], a[f"block{b}"]["expand"], w_in if b == 1 else w, w)
                 for b in range(1, max(DEPTHS) + 1)]
      x = jnn.ElasticDepth(blocks, min_depth=min(DEPTHS), name=f"stage{s}")(
          x, a["depth"], choices, train=train)
      w_in, in_max, in_widths = w, stage.width, stage_widths(stage)
    x = jnn.ElasticConv(HEAD, 1, conv=conv, name="head")(x)
    x = jnn.relu6(bn("head_bn")(x, train))
    return nn.Dense(self.num_classes, name="classifier")(jnp.mean(x, (1, 2)))


def cost(arch, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
  """Exact ``(params, flops)`` (int32 scalars, jittable, vmappable) of the specialised
  network of ``arch`` (as ``mbconv_space().from_vector`` gives it): trainable parameters
  (conv kernels, BN scale/bias, classifier) and multiply-accumulates of the convs and the
  classifier for one image."""
  i32 = lambda v: jnp.asarray(v, jnp.int32)
  params = i32(9 * in_channels * STEM + 2 * STEM)
  h = image_size
  flops = i32(h * h * 9 * in_channels * STEM)
  w_in = i32(STEM)
  for s, stage in enumerate(STAGES, 1):
    a = jax.tree.map(i32, arch[f"stage{s}"])
    w = a["width"]
    for b in range(1, max(DEPTHS) + 1):
      on = i32(a["depth"] >= b)
      k, e = a[f"block{b}"]["kernel"], a[f"block{b}"]["expand"]
      c_in = w_in if b == 1 else w
      stride = stage.stride if b == 1 else 1
      h_out = (h - 1) // stride + 1  # padding k // 2
      mid = e * c_in
      params = params + on * (c_in * mid + 2 * mid + k * k * mid + 2 * mid + mid * w + 2 * w)
      flops = flops + on * (h * h * c_in * mid + h_out * h_out * (k * k * mid + mid * w))
      h = h_out
    w_in = w
  params = params + w_in * HEAD + 2 * HEAD + HEAD * num_classes + num_classes
  flops = flops + h * h * w_in * HEAD + HEAD * num_classes
  return params, flops
