"""The choice blocks (``jaxnas.nn``): elastic forms equal the specialised network sliced out
of them, inactive parts are exact zeros with exact zero gradients, and one program serves
every member under ``vmap``/``lax.map``."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import member_grads

from jaxnas import nn as jnn

# The module alone on one core: 46.5 -> 31.6 s (conftest._library_compile_setting).
FAST_LIBRARY_COMPILE = True


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, choice=None, train=False):
    kernel, width = (None, None) if choice is None else choice
    y = jnn.ElasticConv(16, 5, name="conv")(nn.relu(x), width=width, kernel_size=kernel)
    return x + jnn.BatchNorm(name="bn")(y, train, width=width)


class Net(nn.Module):
  """Every block at once: elastic width, kernels, depth, an op choice and a dense head."""

  @nn.compact
  def __call__(self, x, arch, train=False):
    w = arch["width"]
    x = jnn.BatchNorm(name="stem_bn")(jnn.ElasticConv(16, 3, name="stem")(x, width=w), train,
                                      width=w)
    pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(1, 1), padding="SAME")
    x = jnn.OpChoice([jnn.zero, jnn.identity, pool, Block(name="op_block")], name="op")(
        x, arch["op"], (3, w), train=train)
    x = jnn.ElasticDepth([Block(name=f"b{i}") for i in range(3)], min_depth=1, name="body")(
        x, arch["depth"], [(k, w) for k in arch["kernels"]], train=train)
    x = jnn.input_choice([x, jnp.flip(x, 1)], arch["input"])
    return jnn.ElasticDense(10, name="head")(x.mean((1, 2)))


def _arch(width, op, depth, kernels, inp=0, as_data=True):
  arch = {"width": width, "op": op, "depth": depth, "kernels": list(kernels), "input": inp}
  return jax.tree.map(jnp.int32, arch) if as_data else arch


X = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 2))
NET = Net()
VARIABLES = NET.init(jax.random.PRNGKey(0), X, _arch(16, 3, 3, (5, 5, 5)))

ARCHS = [(12, 3, 2, (3, 5, 3), 0), (16, 2, 1, (5, 3, 3), 1), (8, 0, 3, (3, 3, 5), 0),
         (16, 1, 3, (5, 5, 5), 1)]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("choice", ARCHS)
def test_specialised_network_equals_the_elastic_one(choice, train):
  """The network built for Python ints, with variables ``extract``ed from the elastic ones,
  computes what the elastic network computes for the same choice given as data, and its
  variables are the chosen slices (only the chosen op, blocks and channels)."""
  data, static = _arch(*choice), _arch(*choice, as_data=False)
  shapes = jnn.specialised_shapes(NET, X, static)
  small = jnn.extract(VARIABLES, shapes)
  kw = dict(train=train, mutable=["batch_stats"]) if train else dict(train=False)
  big_out, small_out = NET.apply(VARIABLES, X, data, **kw), NET.apply(small, X, static, **kw)
  if train:  # the running statistics move the same way on the active channels
    (big_out, big_stats), (small_out, small_stats) = big_out, small_out
    chex.assert_trees_all_close(jnn.extract(big_stats, small_stats), small_stats, atol=1e-5)
  chex.assert_trees_all_close(big_out, small_out, atol=2e-5, rtol=1e-5)
  width, op, depth = choice[:3]
  params = small["params"]
  assert params["stem"]["kernel"].shape == (3, 3, 2, width)
  assert ("op_block" in params) == (op == 3)
  # Blocks live where they are created (here: in Net's scope, beside "body").
  assert sorted(k for k in params if k[0] == "b" and k[1:].isdigit()) == [
      f"b{i}" for i in range(depth)]
  for i in range(depth):
    k = choice[3][i]
    assert params[f"b{i}"]["conv"]["kernel"].shape == (k, k, width, width)


def test_inactive_parameters_get_exact_zero_gradients():
  """Channels past the width, taps outside the kernel and blocks past the depth: zero."""
  arch = _arch(12, 3, 1, (3, 5, 5))

  def loss(p):
    out, _ = NET.apply({**VARIABLES, "params": p}, X, arch, train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2)

  g = jax.grad(loss)(VARIABLES["params"])
  assert float(jnp.abs(g["stem"]["kernel"][..., 12:]).max()) == 0.0
  assert float(jnp.abs(g["stem"]["kernel"][..., :12]).max()) > 0.0
  k0 = g["b0"]["conv"]["kernel"]  # kernel 3 of max 5: the outer ring is inactive
  assert float(jnp.abs(k0[0]).max()) == float(jnp.abs(k0[:, 0]).max()) == 0.0
  assert float(jnp.abs(k0[1:4, 1:4, :12, :12]).max()) > 0.0
  for i in (1, 2):
    assert all(float(jnp.abs(t).max()) == 0.0 for t in jax.tree.leaves(g[f"b{i}"]))
  assert float(jnp.abs(g["head"]["kernel"][12:]).max()) == 0.0


class ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, width, train):
    y = jnn.ElasticConv(16, 5, use_bias=True)(x, width=width, kernel_size=3)
    return jnn.BatchNorm()(y, train, width=width)


@pytest.mark.parametrize("train", [False, True])
def test_inactive_channels_are_exact_zeros(train):
  m = ConvBN()
  v = m.init(jax.random.PRNGKey(0), X, jnp.int32(16), False)
  v = {**v, "params": jax.tree.map(lambda a: a + 0.5, v["params"])}  # non-zero biases
  out = m.apply(v, X, jnp.int32(8), train, mutable=["batch_stats"])[0]
  assert float(jnp.abs(out[..., 8:]).max()) == 0.0 and float(jnp.abs(out[..., :8]).max()) > 0


def test_skipped_blocks_keep_their_statistics():
  _, state = NET.apply(VARIABLES, X, _arch(8, 1, 1, (3, 3, 3)), train=True,
                       mutable=["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state["batch_stats"],
                         VARIABLES["batch_stats"])
  assert changed["b0"]["bn"]["mean"]  # depth 1: block 0 ran ...
  for i in (1, 2):  # ... blocks 1 and 2 did not, their BN statistics are untouched
    assert not any(jax.tree.leaves(changed[f"b{i}"]))


def test_one_program_serves_a_population():
  """``vmap`` and ``lax.map`` over members of different architectures give each member's
  own output (OpChoice under vmap becomes a select over every op)."""
  net = Net()
  archs = jax.tree.map(lambda *xs: jnp.stack(xs), *[_arch(*c) for c in ARCHS])
  one = jnp.stack([net.apply(VARIABLES, X, _arch(*c)) for c in ARCHS])
  vm = jax.jit(jax.vmap(lambda a: net.apply(VARIABLES, X, a)))(archs)
  lm = jax.jit(lambda a: jax.lax.map(lambda b: net.apply(VARIABLES, X, b), a))(archs)
  chex.assert_trees_all_close(vm, one, atol=1e-5)
  chex.assert_trees_all_close(lm, one, atol=1e-5)


def test_op_choice_forms_and_mixed_weights():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3))
  ops = [jnn.zero, jnn.identity, lambda x: 2.0 * x]
  for impl in ("switch", "onehot"):
    m = jnn.OpChoice(ops, impl=impl)
    for k in range(3):
      out = m.apply({}, x, jnp.int32(k))
      chex.assert_trees_all_close(out, ops[k](x))
      chex.assert_trees_all_close(m.apply({}, x, k), ops[k](x))
  w = jnp.asarray([0.2, 0.3, 0.5])
  chex.assert_trees_all_close(jnn.OpChoice(ops).apply({}, x, weights=w), 1.3 * x, rtol=1e-6)
  with pytest.raises(ValueError, match="not in"):
    jnn.OpChoice(ops).apply({}, x, 3)


def test_extract_refuses_what_is_not_a_slice():
  with pytest.raises(ValueError, match="have no params/conv"):
    jnn.extract({"params": {}}, {"params": {"conv": jnp.zeros((3,))}})
  with pytest.raises(ValueError, match="cannot slice"):
    jnn.extract({"params": {"w": jnp.zeros((3,))}}, {"params": {"w": jnp.zeros((4,))}})
  with pytest.raises(ValueError, match="centre-crop"):
    jnn.extract({"params": {"k": jnp.zeros((5, 5, 1, 1))}},
                {"params": {"k": jnp.zeros((4, 4, 1, 1))}})


def test_an_nnx_model_trains_as_a_population_through_flax_bridge():
  """NNX users adapt their model with ``flax.nnx.bridge.to_linen``: its variables become
  the ``params``/``batch_stats`` collections, and the population trains as one program,
  ``map`` and ``vmap`` alike."""
  from flax import nnx
  from flax.nnx import bridge

  import jaxnas
  from jaxnas.models import train

  space = jaxnas.declare({"width": jaxnas.choice(8, 16), "pool": jaxnas.choice("avg", "max")})

  class NNXCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.conv = nnx.Conv(1, 16, (3, 3), strides=(2, 2), rngs=rngs)
      self.bn = nnx.BatchNorm(16, rngs=rngs)
      self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x, arch, train=False):
      self.bn.use_running_average = not train
      mask = jnn.channel_mask(arch["width"], 16)
      x = nnx.relu(self.bn(self.conv(x) * mask)) * mask
      x = jnp.where(arch["pool"] == 0, nnx.avg_pool(x, (2, 2), (2, 2)),
                    nnx.max_pool(x, (2, 2), (2, 2)))
      return self.head(x.mean((1, 2)))

  class Adapted(nn.Module):
    @nn.compact
    def __call__(self, x, arch, train=False):
      return bridge.to_linen(NNXCNN)(x, arch, train=train)

  model = jaxnas.searchable(Adapted(), space)
  rng = np.random.default_rng(0)
  data = train.make_data(rng.integers(0, 255, (256, 28, 28, 1)), rng.integers(0, 10, 256),
                         rng.integers(0, 255, (50, 28, 28, 1)), rng.integers(0, 10, 50),
                         [0.5], [0.25])
  archs = jax.vmap(space.sample)(jax.random.split(jax.random.PRNGKey(0), 4))
  out = {plan: train.train_population_metrics(
      archs, jax.random.PRNGKey(1), data,
      train.TrainConfig(steps=3, batch_size=32, model=model, plan=plan)) for plan in ("map",
                                                                                  "vmap")}
  chex.assert_trees_all_close(out["map"]["losses"], out["vmap"]["losses"], rtol=1e-4)
  assert np.isfinite(np.asarray(out["map"]["val_accuracy"])).all()


@pytest.mark.parametrize("depthwise", [False, True])
def test_kernel_switch_computes_what_the_mask_computes(depthwise):
  """``kernel_impl="switch"`` (a conv per candidate size, centre-cropped) and the masked
  max kernel: same outputs and gradients, member by member and vmapped."""
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 7, 7, 4))
  kw = dict(features=8, kernel_size=7, strides=2, depthwise=depthwise, conv="xla")
  mask = jnn.ElasticConv(**kw)
  switch = jnn.ElasticConv(**kw, kernel_sizes=(3, 5, 7), kernel_impl="switch")
  w_max = 4 if depthwise else 8
  v = mask.init(jax.random.PRNGKey(0), x, jnp.int32(w_max), jnp.int32(7))

  def loss(m, v, w, k):
    return jnp.sum(m.apply(v, x, w, k) ** 2)

  for w, k in [(w_max, 3), (3, 5)]:
    w, k = jnp.int32(w), jnp.int32(k)
    chex.assert_trees_all_close(switch.apply(v, x, w, k), mask.apply(v, x, w, k), atol=1e-5)
    chex.assert_trees_all_close(jax.grad(loss, 1)(switch, v, w, k),
                                jax.grad(loss, 1)(mask, v, w, k), atol=1e-4)
  ks = jnp.asarray([3, 5, 7], jnp.int32)
  w = jnp.int32(w_max)
  chex.assert_trees_all_close(jax.vmap(lambda k: switch.apply(v, x, w, k))(ks),
                              jax.vmap(lambda k: mask.apply(v, x, w, k))(ks), atol=1e-5)
  with pytest.raises(ValueError, match="needs kernel_sizes"):
    jnn.ElasticConv(**kw, kernel_impl="switch").apply(v, x, w, jnp.int32(3))


class SlicedBlock(nn.Module):
  """conv -> BN -> depthwise -> BN, widths as data; ``sliced=True`` runs it under
  ``jnn.specialised_switch`` (``Sliced`` widths, the output padded to the max width)."""
  sliced: bool = False

  def setup(self):
    self.conv = jnn.ElasticConv(8, 1, conv="xla", in_features=4)
    self.bn = jnn.BatchNorm(features=8)
    self.dw = jnn.ElasticConv(8, 3, depthwise=True, conv="xla")
    self.dw_bn = jnn.BatchNorm(features=8)

  def body(self, x, width, train):
    y = self.bn(self.conv(x, width=width), train, width=width)
    y = self.dw(y, width=width if isinstance(width, jnn.Sliced) else None)
    return self.dw_bn(y, train, width=width)

  def __call__(self, x, w_in, width, train=False):
    if not self.sliced or self.is_initializing():
      return self.body(x, width, train)

    def branch(mdl, x, i, w):
      y = mdl.body(x[..., :i], jnn.Sliced(w), train)
      return jnp.pad(y, ((0, 0),) * 3 + ((0, 8 - w),))

    rows = [(i, w) for i in (2, 4) for w in (4, 6, 8)]
    return jnn.specialised_switch(self, branch, (w_in, width), rows, x)


def test_sliced_widths_compute_what_the_mask_computes():
  """``specialised_switch`` with ``Sliced`` widths (each branch on slices of the max-shape
  variables) and the masked form: the same outputs, BN statistics and gradients, member by
  member under ``lax.map``; a vmapped ``specialised_switch`` selects the same values."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, 4))
  masked, sliced = SlicedBlock(), SlicedBlock(sliced=True)
  v = masked.init(jax.random.PRNGKey(0), x, jnp.int32(4), jnp.int32(8))

  call = lambda x, r: (x * (jnp.arange(4) < r[0]), r[0], r[1])  # zeros past the input width
  pairs = jnp.asarray([(2, 4), (4, 6), (2, 8), (4, 8)], jnp.int32)
  got = {name: member_grads(m, v, x, pairs, call) for name, m in (("mask", masked),
                                                                 ("sliced", sliced))}
  # Float32 rounding only (in float64 the two agree to 1e-9): BN-scale gradients are sums
  # of cancelling terms, ~1e-3 here.
  chex.assert_trees_all_close(got["sliced"], got["mask"], atol=1e-4, rtol=1e-4)
  out = got["sliced"][1][0]
  assert not np.any(np.asarray(out[0, ..., 4:])), "channels past the width are exact zeros"
  vmapped = member_grads(sliced, v, x, pairs, call, batched=True)
  chex.assert_trees_all_close(vmapped, got["mask"], atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="Sliced width 3 but 4 input channels"):
    jnn.BatchNorm(features=8).apply({"params": v["params"]["bn"],
                                     "batch_stats": v["batch_stats"]["bn"]},
                                    x, False, jnn.Sliced(3))


CANDIDATES = {"width": (8, 12, 16), "op": (0, 1, 2, 3), "depth": (1, 2, 3),
              "kernels": [(3, 5)] * 3, "input": (0, 1)}


def _mixture(choice, soft=None):
  """The arch of ``choice`` as one-hot ``Mixture``s (``soft``: those decisions' weights)."""
  def mix(values, v, name):
    w = jax.nn.one_hot(values.index(v), len(values)) if soft is None or name not in soft else (
        jnp.asarray(soft[name], jnp.float32))
    return jnn.Mixture(w, values)
  width, op, depth, kernels, inp = choice
  return {"width": mix(CANDIDATES["width"], width, "width"),
          "op": mix(CANDIDATES["op"], op, "op"),
          "depth": mix(CANDIDATES["depth"], depth, "depth"),
          "kernels": [mix(c, k, "kernels") for c, k in zip(CANDIDATES["kernels"], kernels)],
          "input": mix(CANDIDATES["input"], inp, "input")}


@pytest.mark.parametrize("choice", ARCHS)
def test_a_one_hot_mixture_computes_the_member(choice):
  """Every block given a one-hot ``Mixture`` computes what it computes for the choice as
  data, in both modes, and the running statistics of unchosen ops and skipped blocks stay
  as they were (they move by ``gate()``)."""
  kw = dict(train=True, mutable=["batch_stats"])
  out, stats = NET.apply(VARIABLES, X, _arch(*choice), **kw)
  mix_out, mix_stats = NET.apply(VARIABLES, X, _mixture(choice), **kw)
  chex.assert_trees_all_close(mix_out, out, atol=2e-5, rtol=1e-5)
  chex.assert_trees_all_close(mix_stats, stats, atol=1e-6)
  chex.assert_trees_all_close(NET.apply(VARIABLES, X, _mixture(choice)),
                              NET.apply(VARIABLES, X, _arch(*choice)), atol=2e-5, rtol=1e-5)


def test_a_soft_mixture_is_the_expectation_over_its_candidates():
  """A conv is linear in its width and kernel masks, so under a soft Mixture it computes the
  weighted sum of its candidates' outputs; the depth mixture is the weighted sum of the
  outputs after each depth, and everything after the body is affine in eval mode, so the
  network's output under a soft depth is the weighted sum of the members' outputs."""
  base = (12, 1, 2, (3, 5, 3), 0)
  w = jnp.asarray([0.2, 0.3, 0.5])
  members = [NET.apply(VARIABLES, X, _arch(*base[:2], d, *base[3:])) for d in (1, 2, 3)]
  soft = NET.apply(VARIABLES, X, _mixture(base, {"depth": w}))
  chex.assert_trees_all_close(soft, sum(wi * m for wi, m in zip(w, members)), atol=1e-5)
  conv = jnn.ElasticConv(6, 5)
  v = conv.init(jax.random.PRNGKey(0), X, width=6, kernel_size=5)
  for arg, values in (("kernel_size", (3, 5)), ("width", (2, 6))):
    mix = jnn.Mixture(jnp.asarray([0.25, 0.75]), values)
    expected = sum(p * conv.apply(v, X, **{arg: jnp.int32(c)}) for p, c in zip((0.25, 0.75),
                                                                             values))
    chex.assert_trees_all_close(conv.apply(v, X, **{arg: mix}), expected, atol=1e-5)


def test_gate_is_one_in_the_chosen_candidates_and_zero_elsewhere():
  """What ``gate()`` reads at every BatchNorm of the network under a one-hot Mixture."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, jnn.BatchNorm):
      seen[context.module.scope.path] = jnn.gate()
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    NET.apply(VARIABLES, X, _mixture((8, 2, 2, (3, 3, 5), 0)))
  gates = {"/".join(p): float(g) for p, g in seen.items()}
  assert gates["stem_bn"] == 1.0 and gates["op_block/bn"] == 0.0  # op 2 (pool), not the block
  assert gates["b0/bn"] == gates["b1/bn"] == 1.0 and gates["b2/bn"] == 0.0  # depth 2
  assert jnn.gate() == 1.0  # outside any Mixture
