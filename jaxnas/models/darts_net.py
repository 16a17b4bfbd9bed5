"""Networks of the DARTS space (Liu, Simonyan & Yang, ICLR 2019), with the architecture as data.

Macro skeleton, as in the DARTS code base: a 3x3 conv + BN stem with
``3C`` channels, then ``layers`` cells; the cells at ``layers // 3`` and
``2 * layers // 3`` are reduction cells (stride 2, channels doubled), the rest
normal cells; then global average pooling and a linear classifier. A cell
preprocesses its two inputs (outputs of the previous two cells) to ``C``
channels (``FactorizedReduce`` when the previous cell reduced, else
ReLU-Conv1x1-BN), computes 4 intermediate nodes and concatenates them
(``4C`` channels out). The ops (DARTS' ``operations.py``): ``none``,
3x3 max and average pooling (``count_include_pad=False``), ``skip_connect``
(``FactorizedReduce`` when strided), separable convs (twice
ReLU-depthwise-pointwise-BN) and dilated separable convs (dilation 2).

Two cells, one skeleton (``DartsNetwork(cell=...)``):

* ``"discrete"``: the architecture is a ``DartsArch`` *input* (jaxnas.spaces.darts):
  each of the 8 (node, slot) pairs picks its input node and its op from data.
  Parameters live per slot (one set per op), as in DARTS' evaluation network
  where each chosen (input, op) pair owns its weights; the input is selected
  with ``lax.select_n`` and the op with ``nn.switch``, so with an unbatched
  architecture (one candidate at a time, ``lax.map``) only the chosen op runs,
  and one compiled program trains any genotype. ``fixed_arch`` builds the
  specialised network of one genotype (only its ops exist, same parameter
  names) for retraining and export.
* ``"mixed"``: the DARTS supernet. Every one of the 14 (node, input) edges is a
  mixture ``sum_k w[e, k] * op_k(x)`` of the 8 ops; ``__call__`` takes
  ``{"normal": float[14, 8], "reduce": float[14, 8]}`` op weights (DARTS:
  softmax(alpha); GDAS: a straight-through one-hot sample). As in DARTS' search
  network, BN in the ops is not affine and pooling is followed by a BN. The
  edges leaving one state run as one ``vmap`` (``remat.PureEdges``; those of the
  two cell inputs together), which makes the program (and its compile time) 2-3x
  smaller than edge by edge.
  ``remat=True`` recomputes each edge group in the backward pass
  (``late_remat``) instead of storing its ops' activations.

Edge order of the supernet: node ``i`` (0..3) has edges ``offset(i) + j`` for
inputs ``j = 0..i+1``, ``offset = 0, 2, 5, 9`` (DARTS' order).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.models.remat import PureEdges, fan_in_uniform
from jaxnas.ops import (BatchNorm, Execution, avg_pool_3x3, conv2d, conv_init, depthwise,
                        max_pool_3x3, pointwise)
from jaxnas.spaces.darts import NUM_NODES, OPS, DartsArch

CELLS = ("discrete", "mixed")
NONE, MAX_POOL, AVG_POOL, SKIP, SEP3, SEP5, DIL3, DIL5 = range(len(OPS))
NUM_OPS = len(OPS)
OFFSETS = tuple(sum(n + 2 for n in range(i)) for i in range(NUM_NODES))  # 0, 2, 5, 9
NUM_EDGES = OFFSETS[-1] + NUM_NODES + 1  # 14

# XLA:GPU aborts the process while compiling the DARTS-space supernet step with its Triton
# GEMM fusions on: "triton_tiling_propagation.cc:703 Check failed: subdim_size_accumulator
# == dim_size (256 vs. 32)" (openxla/xla#47381), with and without autotuning; with GEMMs
# left to cuBLAS the 8-cell step compiles and runs (experiments/NOTES_gpu.md). So every
# program of this space is compiled with these options on GPU.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def compiler_options(backend: str | None = None) -> dict | None:
  """XLA options for the programs of the DARTS-space networks (None: XLA's defaults): on
  GPU ``GPU_COMPILER_OPTIONS``, unless XLA_FLAGS names the option."""
  if ((backend or jax.default_backend()) != "gpu" or
      "xla_gpu_enable_triton_gemm" in os.environ.get("XLA_FLAGS", "")):
    return None
  return dict(GPU_COMPILER_OPTIONS)


def edge_index(node: int, source: int) -> int:
  """The supernet edge of intermediate node ``node`` (0..3) from input ``source``."""
  return OFFSETS[node] + source


def zeros(x, stride: int):
  """The ``none`` op: zeros at the output resolution."""
  return jnp.zeros_like(x[:, ::stride, ::stride, :])


class ReLUConvBN(nn.Module):
  """ReLU -> Conv1x1 -> BN (the cells' input preprocessing)."""
  features: int
  affine: bool = True
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    k = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features))
    return BatchNorm(self.bn_momentum, self.affine, name="norm")(
        pointwise(nn.relu(x), k), train)


class FactorizedReduce(nn.Module):
  """ReLU, two stride-2 1x1 convs on pixel grids offset by one, concatenated, BN.

  The offset grid is zero-padded at the far edge, so odd sizes (28 -> 14 -> 7
  for Fashion-MNIST) reduce like the other ops (``ceil(H / 2)``); for even
  sizes this is exactly DARTS' ``FactorizedReduce``.
  """
  features: int
  affine: bool = True
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool):
    c_in, half = x.shape[-1], self.features // 2
    k1 = self.param("kernel_1", conv_init, (1, 1, c_in, half))
    k2 = self.param("kernel_2", conv_init, (1, 1, c_in, self.features - half))
    x = nn.relu(x)
    shifted = jnp.pad(x[:, 1:, 1:, :], ((0, 0), (0, 1), (0, 1), (0, 0)))
    y = jnp.concatenate([pointwise(x[:, ::2, ::2], k1), pointwise(shifted[:, ::2, ::2], k2)],
                        axis=-1)
    return BatchNorm(self.bn_momentum, self.affine, name="norm")(y, train)


class SepConv(nn.Module):
  """DARTS' ``SepConv`` (``dilation=1``, applied twice) or ``DilConv`` (``dilation=2``, once).

  One stage is ReLU -> depthwise kxk (stride, dilation) -> pointwise 1x1 -> BN;
  the stride applies in the first stage only.
  """
  features: int
  kernel_size: int
  dilation: int = 1
  affine: bool = True
  bn_momentum: float = 0.9
  conv: str = "auto"  # the depthwise conv's implementation (``ops.depthwise``'s ``impl``)

  @nn.compact
  def __call__(self, x, stride: int, train: bool):
    k, c = self.kernel_size, self.features
    stages = 2 if self.dilation == 1 else 1
    for s in range(stages):
      dw = self.param(f"depthwise_{s}", conv_init, (k, k, 1, x.shape[-1]))
      pw = self.param(f"pointwise_{s}", conv_init, (1, 1, x.shape[-1], c))
      x = depthwise(nn.relu(x), dw, stride if s == 0 else 1, self.dilation, impl=self.conv)
      x = BatchNorm(self.bn_momentum, self.affine, name=f"norm_{s}")(pointwise(x, pw), train)
    return x


class OpSet(nn.Module):
  """The 8 DARTS ops on one edge or slot; ``apply(k, x, stride, train)`` runs op ``k``.

  ``only`` (a Python int) builds the one op of a specialised network.
  ``strides`` lists the strides this module is used with: the strided
  ``skip_connect`` is a ``FactorizedReduce`` with weights, the unstrided one
  the identity. ``execution.pool`` computes the average pool.
  """
  features: int
  strides: tuple[int, ...] = (1,)
  affine: bool = True
  pool_bn: bool = False
  only: int | None = None
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  def setup(self):
    want = lambda k: self.only is None or self.only == k
    c, a, m = self.features, self.affine, self.bn_momentum
    conv = self.execution.resolve().conv
    if self.pool_bn:
      if want(MAX_POOL):
        self.max_pool_3x3 = BatchNorm(m, False)
      if want(AVG_POOL):
        self.avg_pool_3x3 = BatchNorm(m, False)
    if want(SKIP) and 2 in self.strides:
      self.skip_connect = FactorizedReduce(c, a, m)
    if want(SEP3):
      self.sep_conv_3x3 = SepConv(c, 3, 1, a, m, conv)
    if want(SEP5):
      self.sep_conv_5x5 = SepConv(c, 5, 1, a, m, conv)
    if want(DIL3):
      self.dil_conv_3x3 = SepConv(c, 3, 2, a, m, conv)
    if want(DIL5):
      self.dil_conv_5x5 = SepConv(c, 5, 2, a, m, conv)

  def apply_op(self, k: int, x, stride: int, train: bool):
    if k == NONE:
      return zeros(x, stride)
    if k in (MAX_POOL, AVG_POOL):
      y = (max_pool_3x3(x, stride) if k == MAX_POOL else
           avg_pool_3x3(x, stride, impl=self.execution.resolve().pool))
      return getattr(self, OPS[k])(y, train) if self.pool_bn else y
    if k == SKIP:
      return x if stride == 1 else self.skip_connect(x, train)
    return getattr(self, OPS[k])(x, stride, train)

  def __call__(self, x, weights, stride: int, train: bool):
    """``sum_k weights[k] * op_k(x)`` (``none`` adds nothing): DARTS' ``MixedOp``."""
    return sum(weights[k] * self.apply_op(k, x, stride, train) for k in range(1, NUM_OPS))


class Slot(nn.Module):
  """One (node, slot) of a discrete cell: op ``op`` of an input chosen by data.

  ``x`` is the chosen input when it needs stride 1, ``x_strided`` the chosen
  input when it needs stride 2 (the cell inputs of a reduction cell);
  ``strided`` (bool, data) says which one applies.
  """
  features: int
  strides: tuple[int, ...]
  affine: bool = True
  fixed: tuple[int, int] | None = None  # (stride, op) of a specialised network
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  def setup(self):
    only = None if self.fixed is None else self.fixed[1]
    strides = self.strides if self.fixed is None else (self.fixed[0],)
    self.ops = OpSet(self.features, strides, self.affine, False, only, self.bn_momentum,
                     self.execution.resolve())

  def __call__(self, x, x_strided, op, strided, train: bool):
    if self.fixed is not None:
      stride, k = self.fixed
      return self.ops.apply_op(k, x_strided if stride == 2 else x, stride, train)
    branches = []
    for stride in self.strides:
      for k in range(NUM_OPS):
        branches.append(lambda m, x, xs, k=k, s=stride:
                        m.ops.apply_op(k, xs if s == 2 else x, s, train))
    if self.is_initializing():
      for b in branches:  # every op's variables exist, so all branches share one structure
        b(self, x, x_strided)
    index = op
    if len(self.strides) == 2:
      index = op + NUM_OPS * jnp.asarray(strided, jnp.int32)  # strides == (1, 2)
    elif self.strides == (2,):
      x = x_strided
    return nn.switch(index, branches, self, x, x_strided)


def _pick(candidates, index):
  """``candidates[index]`` for a traced ``index`` (clipped; the cell's inputs of one stride)."""
  if len(candidates) == 1:
    return candidates[0]
  return jax.lax.select_n(jnp.clip(index, 0, len(candidates) - 1), *candidates)


def _preprocess(features, reduction_prev, affine, m, s0, s1, train):
  pre0 = (FactorizedReduce if reduction_prev else ReLUConvBN)(features, affine, m, name="pre0")
  return pre0(s0, train), ReLUConvBN(features, affine, m, name="pre1")(s1, train)


class DiscreteCell(nn.Module):
  """A DARTS cell whose genotype (``ops``, ``inputs``: int32[8]) is data, or ``fixed``."""
  features: int
  reduction: bool
  reduction_prev: bool
  affine: bool = True
  fixed: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (ops, inputs)
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, s0, s1, genotype, train: bool):
    s0, s1 = _preprocess(self.features, self.reduction_prev, self.affine, self.bn_momentum, s0,
                         s1, train)
    states, ex = [s0, s1], self.execution.resolve()
    for i in range(NUM_NODES):
      node = 0
      for slot in range(2):
        e = 2 * i + slot
        fixed = None
        if self.fixed is not None:
          src, op = self.fixed[1][e], self.fixed[0][e]
          fixed = (2 if self.reduction and src < 2 else 1, op)
          x, xs = states[src], states[src]
        else:
          op, src = genotype[0][e], genotype[1][e]
          if self.reduction:
            xs = _pick(states[:2], src)
            x = _pick(states[2:], src - 2) if i else None
          else:
            x, xs = _pick(states, src), None
        strides = ((2,) if i == 0 else (1, 2)) if self.reduction else (1,)
        strided = None if self.fixed is not None else src < 2
        node = node + Slot(self.features, strides, self.affine, fixed, self.bn_momentum, ex,
                           name=f"node{i}_{slot}")(x, xs, op, strided, train)
      states.append(node)
    return jnp.concatenate(states[2:], axis=-1)


def group_nodes(source: int) -> range:
  """The intermediate nodes fed by cell input ``source`` (0, 1: the cell's inputs; 2..5:
  nodes 0..3): node ``i`` takes every earlier state, so nodes ``max(0, source - 1)..3``."""
  return range(max(0, source - 1), NUM_NODES)


GROUP_EDGES = tuple(np.array([edge_index(i, j) for i in group_nodes(j)], np.int32)
                    for j in range(NUM_NODES + 1))  # supernet edges leaving each source


class MixedCell(nn.Module):
  """A DARTS search cell: every edge mixes all ops with weights ``float[14, 8]``.

  The edges leaving one state (``PureEdges``: 4, 4, 3, 2, 1 edges from the
  two cell inputs and nodes 0..2) run as one ``vmap`` over their parameters
  with the input shared, the two cell inputs' 4 + 4 edges as one group over the
  stacked inputs (``inputs=2``: same shape and stride, ready together): four
  mixed-op programs per cell instead of fourteen (XLA compile time grows with
  program size), pooling and ``skip_connect`` of an input computed once, and the
  pointwise convs of a shared input one wider matmul. A reduction cell's stride
  depends only on the source (2 for the cell inputs), so grouping by source keeps
  one stride per group. Without
  ``affine`` a group's parameters are all conv kernels, drawn together
  (``remat.fan_in_uniform``, the ops' own distribution): the 8-cell supernet's
  init program then has ~40 RNG computations instead of ~1000.
  """
  features: int
  reduction: bool
  reduction_prev: bool
  affine: bool = False
  remat: bool = False
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool):
    s0, s1 = _preprocess(self.features, self.reduction_prev, self.affine, self.bn_momentum, s0,
                         s1, train)
    states, pending = [s0, s1], [[] for _ in range(NUM_NODES)]
    ex = self.execution.resolve()
    init = None if self.affine else fan_in_uniform
    # The two cell inputs' edges (4 each, same shape and stride) are one group.
    stride = 2 if self.reduction else 1
    ops = OpSet(self.features, (stride,), self.affine, True, None, self.bn_momentum, ex)
    group = PureEdges(ops, (stride, train), NUM_NODES, train, self.remat, init, inputs=2,
                      name="inputs")
    ys = group(jnp.stack([s0, s1]), weights[np.stack(GROUP_EDGES[:2])])
    for src in range(2):
      for k, i in enumerate(group_nodes(src)):
        pending[i].append(ys[src, k])
    for src in range(2, NUM_NODES + 1):
      states.append(sum(pending[src - 2]))  # node src - 2 has all its inputs now
      ops = OpSet(self.features, (1,), self.affine, True, None, self.bn_momentum, ex)
      group = PureEdges(ops, (1, train), len(GROUP_EDGES[src]), train, self.remat, init,
                        name=f"src{src}")
      ys = group(states[src], weights[GROUP_EDGES[src]])
      for k, i in enumerate(group_nodes(src)):
        pending[i].append(ys[k])
    states.append(sum(pending[-1]))
    return jnp.concatenate(states[2:], axis=-1)


def is_reduction(layer: int, layers: int) -> bool:
  return layer in (layers // 3, 2 * layers // 3)


class DartsNetwork(nn.Module):
  """DARTS-space network; ``__call__(images, choice, train)``.

  ``choice`` is a ``DartsArch`` for ``cell="discrete"`` (ignored with
  ``fixed_arch``) or ``{"normal": w, "reduce": w}`` op weights ``float[14, 8]``
  for ``cell="mixed"``.

  Attributes:
    channels: C, the width of the first cells (DARTS search: 16, evaluation: 36).
    layers: number of cells (DARTS search: 8, evaluation: 20).
    num_classes: classifier outputs.
    cell: ``"discrete"`` or ``"mixed"``.
    fixed_arch: ``(normal_ops, normal_inputs, reduce_ops, reduce_inputs)`` Python
      tuples for the specialised network of one genotype.
    affine: BN with scale and bias in the ops (False in the DARTS supernet).
    remat: rematerialise mixed edges in the backward pass.
    stem_multiplier: the stem has ``stem_multiplier * C`` channels (DARTS: 3).
    execution: the conv and pool implementations (``jaxnas.ops.Execution``).
  """
  channels: int = 16
  layers: int = 8
  num_classes: int = 10
  cell: str = "discrete"
  fixed_arch: Any = None
  affine: bool = True
  remat: bool = False
  stem_multiplier: int = 3
  bn_momentum: float = 0.9
  execution: Execution = Execution()

  @nn.compact
  def __call__(self, images, choice=None, train: bool = False):
    if self.cell not in CELLS:
      raise ValueError(f"unknown cell {self.cell!r}; choose one of {', '.join(CELLS)}")
    if choice is None and self.fixed_arch is None:
      raise ValueError("DartsNetwork needs a choice (genotype or op weights) unless fixed_arch")
    m, ex = self.bn_momentum, self.execution.resolve()
    k = self.param("stem", conv_init, (3, 3, images.shape[-1], self.stem_multiplier *
                                       self.channels))
    x = BatchNorm(m, name="stem_bn")(conv2d(images, k, impl=ex.conv), train)
    s0 = s1 = x
    c, reduction_prev = self.channels, False
    for layer in range(self.layers):
      reduction = is_reduction(layer, self.layers)
      c = c * 2 if reduction else c
      kind = "reduce" if reduction else "normal"
      if self.cell == "mixed":
        cell = MixedCell(c, reduction, reduction_prev, self.affine, self.remat, m, ex,
                         name=f"cell{layer}")
        out = cell(s0, s1, choice[kind], train)
      else:
        fixed = None
        genotype = None
        if self.fixed_arch is not None:
          n_ops, n_in, r_ops, r_in = self.fixed_arch
          fixed = (r_ops, r_in) if reduction else (n_ops, n_in)
        else:
          genotype = ((choice.reduce_ops, choice.reduce_inputs) if reduction else
                      (choice.normal_ops, choice.normal_inputs))
        cell = DiscreteCell(c, reduction, reduction_prev, self.affine, fixed, m, ex,
                            name=f"cell{layer}")
        out = cell(s0, s1, genotype, train)
      s0, s1, reduction_prev = s1, out, reduction
    x = jnp.mean(s1, axis=(1, 2))
    return nn.Dense(self.num_classes, name="classifier")(x)


def fixed_genotype(arch: DartsArch) -> tuple:
  """A ``DartsArch`` as the hashable ``fixed_arch`` of ``DartsNetwork``."""
  return tuple(tuple(int(v) for v in np.asarray(getattr(arch, f))) for f in DartsArch._fields)


def specialise_variables(variables, arch: DartsArch, layers: int):
  """Prunes discrete-network variables to the specialised network's tree for ``arch``.

  Each slot keeps only its chosen op's variables (a strided ``skip_connect``
  keeps its ``FactorizedReduce``); slots of parameter-free ops disappear.
  """
  n_ops, n_in, r_ops, r_in = fixed_genotype(arch)

  def prune_cell(layer, tree):
    ops, inputs = (r_ops, r_in) if is_reduction(layer, layers) else (n_ops, n_in)
    out = {}
    for name, sub in tree.items():
      if name.startswith("node"):
        i, slot = (int(t) for t in name[4:].split("_"))
        keep = OPS[ops[2 * i + slot]]
        strided = is_reduction(layer, layers) and inputs[2 * i + slot] < 2
        kept = {k: v for k, v in sub["ops"].items() if k == keep}
        if keep == "skip_connect" and not strided:
          kept = {}
        if kept:
          out[name] = {"ops": kept}
      else:
        out[name] = sub
    return out

  def prune(tree):
    return {name: prune_cell(int(name[4:]), sub) if name.startswith("cell") else sub
            for name, sub in tree.items()}

  return {col: prune(dict(tree)) for col, tree in variables.items()}


def derive_darts(alpha: dict) -> DartsArch:
  """DARTS' discretisation: per node the 2 inputs whose best non-``none`` op weighs most,
  each with that op (jittable; ``alpha`` ``{"normal", "reduce"}`` of ``float[14, 8]``)."""
  def cell(a):
    w = jax.nn.softmax(a, axis=-1)[:, 1:]  # drop "none"
    best_op = jnp.argmax(w, axis=-1) + 1
    strength = jnp.max(w, axis=-1)
    ops, inputs = [], []
    for i in range(NUM_NODES):
      edges = jnp.arange(OFFSETS[i], OFFSETS[i] + i + 2)
      _, top = jax.lax.top_k(strength[edges], 2)
      src = jnp.sort(top)
      inputs += [src[0], src[1]]
      ops += [best_op[edges[src[0]]], best_op[edges[src[1]]]]
    return jnp.stack(ops).astype(jnp.int32), jnp.stack(inputs).astype(jnp.int32)
  n_ops, n_in = cell(alpha["normal"])
  r_ops, r_in = cell(alpha["reduce"])
  return DartsArch(n_ops, n_in, r_ops, r_in)


def darts_weights(arch: DartsArch) -> dict:
  """The mixed-op weights under which the supernet computes the discrete cells of ``arch``
  (jittable): per cell ``float[14, 8]``, one-hot at each chosen (input edge, op), zero on
  the edges no node takes (they add nothing, as DARTS' derived network has no such edge)."""
  def cell(ops, inputs):
    node = jnp.arange(2 * NUM_NODES) // 2
    edges = jnp.asarray(OFFSETS, jnp.int32)[node] + inputs
    return jnp.zeros((NUM_EDGES, NUM_OPS), jnp.float32).at[edges, ops].add(1.0)
  return {"normal": cell(arch.normal_ops, arch.normal_inputs),
          "reduce": cell(arch.reduce_ops, arch.reduce_inputs)}


def darts_cost(arch: DartsArch, channels: int = 16, layers: int = 8, num_classes: int = 10,
               in_channels: int = 3, image_size: int = 32, stem_multiplier: int = 3):
  """Exact parameter count and FLOPs of the specialised ``DartsNetwork`` of ``arch``
  (jittable, vmappable over a batch of ``DartsArch``).

  Same conventions as ``nb201_net.cost``: trainable parameters (conv kernels,
  BN scale/bias, classifier; not BN statistics); FLOPs are the
  multiply-accumulates of convolutions (depthwise and pointwise) and the
  classifier, BN/ReLU/pooling/sums not counted. Returns int32 scalars.
  """
  def per_slot(ops, strided, c, h):
    """Params and MACs of each of the 8 slots' chosen ops, at c channels, output side h."""
    k2 = jnp.asarray([0, 0, 0, 0, 9, 25, 9, 25], jnp.int32)[ops]
    stages = jnp.asarray([0, 0, 0, 0, 2, 2, 1, 1], jnp.int32)[ops]
    p = stages * (k2 * c + c * c + 2 * c)
    f = stages * h * h * (k2 * c + c * c)
    fr = (ops == SKIP) & strided  # a strided skip_connect is a FactorizedReduce
    p = p + jnp.where(fr, c * c + 2 * c, 0)
    f = f + jnp.where(fr, h * h * c * c, 0)
    return jnp.sum(p), jnp.sum(f)

  c = stem_multiplier * channels
  params = 9 * in_channels * c + 2 * c
  flops = image_size * image_size * 9 * in_channels * c
  h_p = image_size
  c_pp = c_p = c
  c = channels
  for layer in range(layers):
    reduction = is_reduction(layer, layers)
    c = c * 2 if reduction else c
    # Preprocessing: 1x1 convs (FactorizedReduce or ReLU-Conv-BN) to c channels at h_p.
    params += (c_pp + c_p) * c + 4 * c
    flops += h_p * h_p * (c_pp + c_p) * c
    h = (h_p - 1) // 2 + 1 if reduction else h_p
    if reduction:
      ops, inputs = jnp.asarray(arch.reduce_ops), jnp.asarray(arch.reduce_inputs)
      strided = inputs < 2
    else:
      ops, strided = jnp.asarray(arch.normal_ops), jnp.zeros(8, bool)
    p, f = per_slot(ops.astype(jnp.int32), strided, c, h)
    params, flops = params + p, flops + f
    c_pp, c_p, h_p = c_p, 4 * c, h
  params = params + c_p * num_classes + num_classes
  flops = flops + c_p * num_classes
  return jnp.asarray(params, jnp.int32), jnp.asarray(flops, jnp.int32)
