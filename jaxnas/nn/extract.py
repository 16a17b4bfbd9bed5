"""The specialised network's variables, sliced out of the elastic (max-shape) ones."""

from __future__ import annotations

import flax
import jax
import numpy as np


def _slice(big, shape):
  """``big`` cut to ``shape``: 4-D (``HWIO`` conv kernel) centre crop on the two spatial
  axes and prefix on the channels; every other leaf a prefix on every axis."""
  big = np.asarray(big) if not isinstance(big, jax.Array) else big
  if big.shape == tuple(shape):
    return big
  if len(big.shape) != len(shape) or any(s > b for s, b in zip(shape, big.shape)):
    raise ValueError(f"cannot slice a {big.shape} parameter to {tuple(shape)}")
  index = [slice(0, s) for s in shape]
  if len(shape) == 4:
    for axis in (0, 1):
      off = (big.shape[axis] - shape[axis]) // 2
      if (big.shape[axis] - shape[axis]) % 2:
        raise ValueError(f"cannot centre-crop a {big.shape} kernel to {tuple(shape)}")
      index[axis] = slice(off, off + shape[axis])
  return big[tuple(index)]


def extract(variables, shapes):
  """The leaves of ``shapes`` (a variables tree of arrays or ``ShapeDtypeStruct``, e.g.
  from ``specialised_shapes``) cut out of the elastic ``variables`` at the same paths.

  Parameters follow the choice blocks' convention (``jaxnas.nn.elastic``):
  channels by prefix, kernels by centre crop, unchosen ops and blocks absent.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items():
    if path not in flat:
      raise ValueError(f"the elastic variables have no {'/'.join(map(str, path))}")
    out[path] = _slice(flat[path], leaf.shape)
  return flax.traverse_util.unflatten_dict(out)


def specialised_shapes(module, x, arch, **kwargs):
  """Variable shapes of ``module`` built for the static ``arch`` (Python ints) on input
  shaped like ``x`` (no computation: ``jax.eval_shape``)."""
  x = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, arch, **kwargs), x)
