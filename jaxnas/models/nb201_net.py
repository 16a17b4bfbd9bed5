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

The convolution and pooling implementations are ``execution`` (``jaxnas.ops.Execution``),
a field of every module here: the default ``"auto"`` is the backend's measured default.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.ops import (BatchNorm, Execution, avg_pool_2x2, avg_pool_3x3, batch_norm,
                        bn_normalize, conv2d, conv_init)
from jaxnas.spaces.nb201 import EDGES, NUM_EDGES, NUM_NODES, OPS

OP_IMPLS = ("switch", "onehot", "kernel")
NONE, SKIP, CONV1, CONV3, POOL = range(len(OPS))


class ReLUConvBN(nn.Module):
  """ReLU -> Conv(k, stride, bias-free) -> BN: NAS-Bench-201's ``ReLUConvBN``."""
  in_features: int
  features: int
  kernel_size: int
  stride: int = 1
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  def setup(self):
    k = self.kernel_size
    self.kernel = self.param("kernel", conv_init, (k, k, self.in_features, self.features))
    self.norm = BatchNorm(self.bn_momentum)

  def __call__(self, x, train: bool):
    conv = self.execution.resolve().conv
    return self.norm(conv2d(nn.relu(x), self.kernel, self.stride, impl=conv), train)


def _centre(kernel_1x1):
  """A 1x1 kernel as the centre tap of a 3x3 kernel: the same conv with padding 1."""
  return jnp.pad(kernel_1x1, ((1, 1), (1, 1), (0, 0), (0, 0)))


@functools.cache
def _edge_switch_branches(conv: str, pool: str):
  """The five ops of a cell edge in training mode for one resolved ``Execution``'s
  (``conv``, ``pool``) pair, as ``(forward, backward, evaluate)`` tuples of functions of
  their operands: ``lax.switch`` reuses its trace of a function at the same shapes, so the six edges of a
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
    return bn_normalize(relu_conv(x, k), mean, var, s, b)

  evaluate = (
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: jnp.zeros_like(x),
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: x,
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: conv_bn_eval(x, k1, s1, b1, m1, v1),
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: conv_bn_eval(x, k3, s3, b3, m3, v3),
      lambda x, k1, s1, b1, m1, v1, k3, s3, b3, m3, v3: pool3(x),
  )
  return forward, backward, evaluate


_FORWARD, _BACKWARD, _EVALUATE = range(3)


def _edge_switch(execution: Execution, op, *operands, mode=_FORWARD):
  """``lax.switch`` over the edge branches of ``mode`` for the resolved ``execution``."""
  return jax.lax.switch(op, _edge_switch_branches(*execution)[mode], *operands)


def switch_edge(execution: Execution, op, x, k1, s1, b1, k3, s3, b3):
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
  own op (BN statistics recomputed from that conv output). ``execution`` is resolved
  (``Execution.resolve``).
  """
  return _switch_edge(execution)(op, x, k1, s1, b1, k3, s3, b3)


@functools.cache
def _switch_edge(execution: Execution):
  """``switch_edge`` for one resolved ``execution``, as a custom VJP of the operands."""
  @jax.custom_vjp
  def edge(op, x, k1, s1, b1, k3, s3, b3):
    y, _, mean, var = _edge_switch(execution, op, x, k1, s1, b1, k3, s3, b3)
    return y, mean, var

  def fwd(op, x, k1, s1, b1, k3, s3, b3):
    y, z, mean, var = _edge_switch(execution, op, x, k1, s1, b1, k3, s3, b3)
    return (y, mean, var), (op, x, k1, s1, b1, k3, s3, b3, z)

  def bwd(res, ct):
    op, *operands = res
    return (None,) + tuple(_edge_switch(execution, op, *operands, ct[0], mode=_BACKWARD))

  edge.defvjp(fwd, bwd)
  return edge


class Edge(nn.Module):
  """One cell edge: ``op`` (int32 scalar, data) or ``fixed_op`` (Python int) applied to ``x``."""
  features: int
  op_impl: str = "switch"
  fixed_op: int | None = None
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  def setup(self):
    want = lambda o: self.fixed_op is None or self.fixed_op == o
    ex = self.execution.resolve()
    if want(CONV1):
      self.nor_conv_1x1 = ReLUConvBN(self.features, self.features, 1,
                                     bn_momentum=self.bn_momentum, execution=ex)
    if want(CONV3):
      self.nor_conv_3x3 = ReLUConvBN(self.features, self.features, 3,
                                     bn_momentum=self.bn_momentum, execution=ex)

  def _branches(self, train, pool: str):
    return [
        lambda m, x: jnp.zeros_like(x),
        lambda m, x: x,
        lambda m, x: m.nor_conv_1x1(x, train),
        lambda m, x: m.nor_conv_3x3(x, train),
        lambda m, x: avg_pool_3x3(x, impl=pool),
    ]

  def __call__(self, x, op, train: bool):
    ex = self.execution.resolve()
    branches = self._branches(train, ex.pool)
    if self.fixed_op is not None:
      return branches[self.fixed_op](self, x)
    if self.is_initializing():
      # Create every op's variables, so all branches see one variable structure.
      for branch in branches:
        branch(self, x)
    if self.op_impl == "switch" and train:
      c1, c3 = self.nor_conv_1x1, self.nor_conv_3x3
      y, mean, var = switch_edge(ex, op, x, c1.kernel, *c1.norm.scale_bias(), c3.kernel,
                                 *c3.norm.scale_bias())
      mean, var = jax.lax.stop_gradient((mean, var))
      c1.norm.update_stats(mean, var, op == CONV1)
      c3.norm.update_stats(mean, var, op == CONV3)
      return y
    if self.op_impl == "switch":  # evaluation: BN with the running statistics
      c1, c3 = self.nor_conv_1x1, self.nor_conv_3x3
      return _edge_switch(ex, op, x, c1.kernel, *c1.norm.scale_bias(), *c1.norm.running(),
                          c3.kernel, *c3.norm.scale_bias(), *c3.norm.running(),
                          mode=_EVALUATE)
    if self.op_impl == "onehot":
      w = jax.nn.one_hot(op, len(OPS), dtype=x.dtype)
      return sum(w[k] * b(self, x) for k, b in enumerate(branches))
    if self.op_impl == "kernel":
      k3 = self.nor_conv_3x3.kernel
      k1 = _centre(self.nor_conv_1x1.kernel)
      kernel = jnp.where(op == CONV3, k3, jnp.where(op == CONV1, k1, jnp.zeros_like(k3)))
      y = conv2d(nn.relu(x), kernel, impl=ex.conv)
      # Each conv op keeps its own BN (as in the specialised net); running
      # stats of the op not chosen also see y, but they are never read for
      # this cell, and their gradients are zero through the select below.
      y = jnp.where(op == CONV1, self.nor_conv_1x1.norm(y, train),
                    self.nor_conv_3x3.norm(y, train))
      out = jnp.where(op == SKIP, x, jnp.zeros_like(x))
      out = jnp.where((op == CONV1) | (op == CONV3), y, out)
      return jnp.where(op == POOL, avg_pool_3x3(x, impl=ex.pool), out)
    raise ValueError(f"unknown op_impl {self.op_impl!r}; choose one of {', '.join(OP_IMPLS)}")


class Cell(nn.Module):
  """The NAS-Bench-201 cell: node j is the sum of op_ji(node i) over i < j; output node 3."""
  features: int
  op_impl: str = "switch"
  fixed_arch: tuple[int, ...] | None = None
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x, arch, train: bool):
    nodes = [x]
    incoming = [[] for _ in range(NUM_NODES)]
    ex = self.execution.resolve()
    for e, (j, i) in enumerate(EDGES):
      fixed = None if self.fixed_arch is None else self.fixed_arch[e]
      edge = Edge(self.features, self.op_impl, fixed, self.bn_momentum, ex, name=f"edge{e}")
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
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, x, train: bool):
    c_in, c, m = x.shape[-1], self.features, self.bn_momentum
    ex = self.execution.resolve()
    y = ReLUConvBN(c_in, c, 3, stride=2, bn_momentum=m, execution=ex, name="conv_a")(x, train)
    y = ReLUConvBN(c, c, 3, bn_momentum=m, execution=ex, name="conv_b")(y, train)
    r = avg_pool_2x2(x, impl=ex.pool)
    k = self.param("shortcut", conv_init, (1, 1, x.shape[-1], self.features))
    return y + conv2d(r, k, padding=0, impl=ex.conv)


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
    execution: the conv and pool implementations (``jaxnas.ops.Execution``).
    scan_cells: with ``cells`` > 1, each stage's cells run as one ``nn.scan`` over
      stacked variables (``cells{stage}/cell/...``, leading axis ``cells``; otherwise
      ``cell{stage}_{n}``): the program's size, and its compile time, stop growing with
      ``cells`` (the same function; not the unrolled form's initial values).
  """
  channels: int = 16
  cells: int = 5
  num_classes: int = 10
  op_impl: str = "switch"
  fixed_arch: tuple[int, ...] | None = None
  bn_momentum: float = 0.9
  execution: Execution = Execution()
  scan_cells: bool = False

  @nn.compact
  def __call__(self, images, arch=None, train: bool = False):
    if self.fixed_arch is None and arch is None:
      raise ValueError("NB201Network needs an arch array unless fixed_arch is set")
    if self.fixed_arch is not None:
      arch = None
    ex = self.execution.resolve()
    return skeleton(self, images, train, lambda x, c, name: Cell(
        c, self.op_impl, self.fixed_arch, self.bn_momentum, ex, name=name)(x, arch, train))


def skeleton(net: nn.Module, images, train: bool, cell):
  """NAS-Bench-201's macro skeleton, built inside ``net``'s compact ``__call__``.

  ``net`` has the fields ``channels``, ``cells``, ``num_classes``, ``bn_momentum`` and
  ``execution``; ``cell(x, features, name)`` applies one cell (the
  arch-as-data ``Cell`` here, the supernet's mixed cell in ``supernet.py``), so
  every network of the space shares the stem, reductions, head and parameter
  names.
  """
  m, ex = net.bn_momentum, net.execution.resolve()
  k = net.param("stem", conv_init, (3, 3, images.shape[-1], net.channels))
  x = BatchNorm(m, name="stem_bn")(conv2d(images, k, impl=ex.conv), train)
  scan = getattr(net, "scan_cells", False) and net.cells > 1
  for stage in range(3):
    c = net.channels * 2 ** stage
    if stage:
      x = ResidualReduction(c, m, ex, name=f"reduce{stage}")(x, train)
    if scan:
      x = _scanned_cells(x, c, net.cells, f"cells{stage}", cell)
    else:
      for n in range(net.cells):
        x = cell(x, c, f"cell{stage}_{n}")
  x = nn.relu(BatchNorm(m, name="last_bn")(x, train))
  return nn.Dense(net.num_classes, name="classifier")(jnp.mean(x, axis=(1, 2)))


class _CellBody(nn.Module):
  """One cell as an ``nn.scan`` body: ``(x, None) -> (cell(x), None)``."""
  features: int
  cell: Callable

  @nn.compact
  def __call__(self, x, _):
    return self.cell(x, self.features, "cell"), None


def _scanned_cells(x, features: int, cells: int, name: str, cell):
  """``cells`` applications of ``cell`` as one ``nn.scan``: every variable gets a leading
  axis of ``cells`` (under ``name/cell``), and the program holds one cell's code (and its
  gradient's) however many cells the stage has.

  The body is rematerialised (``nn.remat``): the backward pass recomputes each cell's
  forward from its input instead of reading residuals that the forward scan stacked per
  iteration. On XLA:CPU those stacked residuals cost more than the recompute: in a
  profile of 5 cells per stage, the stacking (dynamic-update-slice) and reading back
  (bitcast fusions) took ~25 % of the step, and a scan without remat trained ~37 % slower
  than unrolled cells, with remat ~15 % (experiments/NOTES_population.md)."""
  stack = nn.scan(nn.remat(_CellBody, prevent_cse=False), variable_axes={True: 0},
                  split_rngs={"params": True}, length=cells)
  return stack(features, cell, name=name)(x, None)[0]


def stack_cells(variables, cells: int):
  """The variables of an unrolled network (``cell{stage}_{n}``) in the ``scan_cells``
  layout (``cells{stage}/cell``, stacked over ``n``): the same network."""
  def convert(tree):
    out = {k: v for k, v in tree.items() if not (k.startswith("cell") and "_" in k)}
    for stage in range(3):
      parts = [tree[f"cell{stage}_{n}"] for n in range(cells) if f"cell{stage}_{n}" in tree]
      if parts:
        out[f"cells{stage}"] = {"cell": jax.tree.map(lambda *a: jnp.stack(a), *parts)}
    return out

  return {col: convert(dict(tree)) for col, tree in variables.items()}


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
