"""The MBConv space and network: conditional blocks counted as networks, the specialised
network equal to the elastic one, the analytic cost exact, and one program per population."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import member_grads

from jaxnas.models import mbconv_net
from jaxnas.models.protocol import count_params, layer_macs
from jaxnas.models.registry import model_of
from jaxnas.models.train import TrainConfig
from jaxnas.nn import extract, specialised_shapes
from jaxnas.spaces import InvalidArchitecture, mbconv_space
from jaxnas.spaces.declared import to_python

# The module alone on one core: 51.3 -> 40.8 s (conftest._library_compile_setting).
FAST_LIBRARY_COMPILE = True

SPACE = mbconv_space()
X = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))


def _members(n, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return SPACE.canonical(jax.vmap(SPACE.sample_vector)(keys))


def test_space_counts_networks_and_round_trips_strings():
  assert SPACE.num_decisions == 4 * (2 + 2 * 4)
  v = np.asarray(_members(1)[0])
  arch = SPACE.from_vector(v)
  text = SPACE.encode(arch)
  back = SPACE.decode(text)
  np.testing.assert_array_equal(np.asarray(SPACE.to_vector(back)), v)
  depth = int(arch["stage1"]["depth"])
  assert ("stage1.block4.kernel" in text) == (depth == 4)
  assert "stage1.block2.kernel" in text  # blocks 1 and 2 always exist
  with pytest.raises(InvalidArchitecture, match="stage1.width"):
    SPACE.decode(text.replace("stage1.width=", "stage1.width=1"))
  # A block past its stage's depth is no decision of the network: its canonical kernel
  # and expansion are fixed, whatever the vector says.
  labels = SPACE.encode(SPACE.from_vector(np.asarray([c - 1 for c in SPACE.cardinalities])))
  block4 = [d for d, part in enumerate(labels.split(",")) if part.startswith("stage1.block4")]
  shallow = v.copy()
  shallow[1] = 0  # stage1.depth = 2
  twin = shallow.copy()
  twin[block4] = 2
  np.testing.assert_array_equal(np.asarray(SPACE.canonical(twin)),
                                np.asarray(SPACE.canonical(shallow)))


@pytest.fixture(scope="module")
def widest():
  net = mbconv_net.MBConvNetwork()
  top = jnp.asarray([c - 1 for c in SPACE.cardinalities], jnp.int32)
  return net, model_of(TrainConfig(space="mbconv")).init(net, jax.random.PRNGKey(0), X,
                                                         SPACE.from_vector(top))


def test_specialised_network_equals_the_elastic_one_and_cost_is_exact(widest):
  """For sampled members: outputs and BN statistics of the specialised network (variables
  sliced out of the widest) equal the elastic network's for the member as data; the
  analytic cost equals its parameter count and the MACs of its conv and dense layers."""
  net, variables = widest
  for v in _members(3):
    arch = SPACE.from_vector(v)
    static = to_python(arch)
    small = extract(variables, specialised_shapes(net, X, static, train=False))
    big_out, big_stats = net.apply(variables, X, arch, train=True, mutable=["batch_stats"])
    out, stats = net.apply(small, X, static, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(big_out, out, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(extract(big_stats, stats), stats, atol=1e-4, rtol=1e-4)
    params, flops = mbconv_net.cost(arch, 10, 1, 28)
    assert int(params) == count_params(small)
    assert int(flops) == layer_macs(net, X, static)


@pytest.mark.parametrize("residual", [False, True])
def test_width_switch_computes_what_the_masked_block_computes(residual):
  """``width_impl="switch"`` (one specialised branch per expansion / input / output width,
  on slices of the elastic variables) and the masked block: same outputs, BN statistics
  and gradients under ``lax.map``; the output is zero past the member's width."""
  from jaxnas.spaces.mbconv import STAGES, stage_widths
  ins, outs = (stage_widths(STAGES[2]),) * 2 if residual else (stage_widths(STAGES[1]),
                                                               stage_widths(STAGES[2]))
  kw = dict(in_max=max(ins), out_max=max(outs), stride=1 if residual else 2,
            residual=residual, conv="xla", in_widths=ins, out_widths=outs)
  masked, sliced = mbconv_net.MBConv(**kw), mbconv_net.MBConv(**kw, width_impl="switch")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, max(ins)))
  widest = tuple(jnp.int32(v) for v in (7, 6, max(ins), max(outs)))
  v = masked.init(jax.random.PRNGKey(1), x, widest)
  choices = jnp.asarray([(3, 3, ins[0], outs[0]), (7, 6, ins[1], outs[1]),
                         (5, 4, ins[2], outs[0] if not residual else outs[2])], jnp.int32)

  call = lambda x, c: (x * (jnp.arange(x.shape[-1]) < c[2]), tuple(c))
  got = {name: member_grads(m, v, x, choices, call) for name, m in (("mask", masked),
                                                                   ("switch", sliced))}
  chex.assert_trees_all_close(got["switch"], got["mask"], atol=1e-4, rtol=1e-4)
  out = np.asarray(got["switch"][1][0])
  assert not out[0, ..., int(choices[0, 3]):].any()


def test_one_program_serves_a_population(widest):
  """``lax.map`` (kernel as a real switch, skipped blocks as real conditionals) and
  ``vmap`` give each member its own output."""
  net, variables = widest
  vectors = _members(3, seed=1)
  archs = jax.vmap(SPACE.from_vector)(vectors)
  one = jnp.stack([net.apply(variables, X, SPACE.from_vector(v)) for v in vectors])
  mapped = jax.jit(lambda a: jax.lax.map(lambda b: net.apply(variables, X, b), a))(archs)
  masked = mbconv_net.MBConvNetwork(kernel_impl="mask")
  vmapped = jax.jit(jax.vmap(lambda a: masked.apply(variables, X, a)))(archs)
  chex.assert_trees_all_close(mapped, one, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(vmapped, one, atol=1e-4, rtol=1e-4)
