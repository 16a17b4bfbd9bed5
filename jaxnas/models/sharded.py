"""A population trained across devices: members sharded over a 1-D mesh.

Candidates never communicate while training (each has its own parameters, BN
statistics and optimizer state), so the population axis is embarrassingly
parallel: ``shard_map`` gives every device a contiguous block of members and
runs the single-device plan (``map`` or ``vmap``, ``resolve_plan``) on it. The
data and the minibatch key are replicated, per-member init keys are split
exactly as ``train_population_metrics`` splits them, so member ``p`` computes
the same function on the same inputs as in a single-device run. A population
that does not divide the device count is padded with copies of member 0 whose
results are dropped; the members are first ordered so that every device's block
holds about equal work (``train.device_layout``).

Several processes (a Cloud TPU pod, a GPU cluster, or processes on one CPU machine;
``jaxnas.distributed``): the mesh spans ``jax.devices()`` of all processes; every
process loads the same data and passes the same population and key,
``distributed.put`` places each device's block (and the data and key,
replicated, on every device: a process cannot pass its local arrays to a program that
spans others), and the per-member results are gathered back to every process, so all
of them hold the same fitness and go on in step (tests/test_distributed.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxnas import distributed
from jaxnas.models.train import (TrainConfig, TrainData, device_layout, make_train, model_of,
                                 population, resolve_plan)

AXIS = "population"


@functools.lru_cache(maxsize=16)
def _sharded(config: TrainConfig, mesh: Mesh):
  train = make_train(config)

  def per_shard(archs, keys, data_key, data, scales):  # this device's block of members
    if config.plan == "vmap":
      return jax.vmap(train, in_axes=(0, 0, None, None, 0))(archs, keys, data_key, data, scales)
    return jax.lax.map(lambda a: train(a[0], a[1], data_key, data, a[2]), (archs, keys, scales))

  return jax.jit(jax.shard_map(
      per_shard, mesh=mesh,
      in_specs=(P(AXIS), P(AXIS), P(), P(), P(AXIS)), out_specs=P(AXIS),
      # Members are independent: nothing crosses devices, so the varying-axes
      # type check (which flax's lifted switch trips over) has nothing to protect.
      check_vma=False))


def _global(x, mesh: Mesh, spec) -> jax.Array:
  return distributed.put(x, NamedSharding(mesh, spec))


def train_population_sharded(archs, key, data: TrainData, config: TrainConfig = TrainConfig(),
                             lr_scales=None, mesh: Mesh | None = None) -> dict:
  """``train_population_metrics`` with the population sharded over ``mesh`` (default: all devices)."""
  config = resolve_plan(config)
  if config.plan not in ("map", "vmap"):
    raise ValueError(f"plan {config.plan!r} runs members from the host; sharding needs map or vmap")
  mesh = mesh or distributed.mesh(AXIS)
  archs, size = population(archs, model_of(config).space)
  archs = jax.tree.map(np.asarray, archs)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise ValueError("pass a raw uint32 key (jax.random.PRNGKey), not a typed key")
  data_key, init_key = jax.random.split(key)
  keys = np.asarray(jax.random.split(init_key, size))
  scales = np.ones(size, np.float32) if lr_scales is None else np.asarray(lr_scales, np.float32)
  # Padded with copies of member 0 to fill every device, each device's block of about
  # equal work (what "map" runs one after another; harmless under "vmap").
  order, back = device_layout(archs, config, mesh.devices.size)
  archs, keys, scales = jax.tree.map(lambda a: a[order], (archs, keys, scales))
  if jax.process_count() > 1:
    data_key, data = jax.tree.map(lambda a: _global(a, mesh, P()), (data_key, data))
  out = _sharded(config, mesh)(jax.tree.map(lambda a: _global(a, mesh, P(AXIS)), archs),
                               _global(keys, mesh, P(AXIS)),
                               data_key, data, _global(scales, mesh, P(AXIS)))
  if jax.process_count() > 1:
    out = distributed.host(out)
  return jax.tree.map(lambda x: x[back], out)
