"""Rematerialisation that saves memory on every backend, and modules applied through it.

``late_remat(f)`` is ``jax.checkpoint`` with the recomputation pinned to the
backward pass; ``PureEdges`` runs a flax module as a pure function of its
variables (optionally ``vmap``-ped over copies sharing one input, optionally
through ``late_remat``). The supernets (models/supernet.py, models/darts_net.py)
build their mixed edges with it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def late_remat(f):
  """``f(*args) -> (y, aux)`` whose activations are recomputed in the backward pass.

  Like ``jax.checkpoint``, the forward pass keeps only the inputs; unlike it,
  the recomputation sits behind an ``optimization_barrier`` together with the
  incoming cotangent, so it cannot run before the backward pass reaches this
  function. XLA:CPU schedules a ``jax.checkpoint`` recomputation right after
  the forward pass, which saves nothing (measured: an MLP's run peak 118 MB
  with or without ``jax.checkpoint``, 23 MB with this). ``aux`` gets no
  gradient (the supernets return their new BN statistics there).
  """
  @jax.custom_vjp
  def g(*args):
    return f(*args)

  def fwd(*args):
    return f(*args), args

  def bwd(args, ct):
    args, ct_y = jax.lax.optimization_barrier((args, ct[0]))
    _, vjp = jax.vjp(lambda *a: f(*a)[0], *args)
    return vjp(ct_y)

  g.defvjp(fwd, bwd)
  return g


class PureEdges(nn.Module):
  """``op`` applied as a pure function of its variables: ``__call__(x, w) -> op(x, w, *static)``.

  ``copies=n`` holds ``n`` independent sets of ``op``'s variables (leading
  axis ``n``) and applies them to the one input ``x`` with ``vmap``, ``w``
  having a leading axis ``n`` too (a supernet's mixed edges leaving one
  state); ``copies=None`` is one set, no extra axis. The variables are one
  ``"ops"`` entry per collection. With ``remat`` the application goes through
  ``late_remat``: only ``x``, ``w`` and the variables are kept for the backward
  pass. BN statistics are updated when ``train`` and ``batch_stats`` is mutable.

  ``inputs=k`` (with ``copies``): ``x`` stacks ``k`` inputs (leading axis ``k``), each
  with its own ``copies`` sets of variables (leading axes ``(k, n)``, ``w`` too): the
  edges leaving several states that are ready together, as one program.

  ``param_init(rng, shapes, lead)``, if given, makes the parameters (shapes:
  ``op``'s parameter tree of ``jax.ShapeDtypeStruct``; ``lead``: the copies
  axes, ``()``, ``(n,)`` or ``(k, n)``) instead of ``op``'s own initialisers, e.g.
  ``fan_in_uniform``: one RNG computation for the whole group.
  """
  op: nn.Module
  static: tuple[Any, ...] = ()
  copies: int | None = None
  train: bool = False
  remat: bool = False
  param_init: Callable | None = None
  inputs: int | None = None

  @nn.compact
  def __call__(self, x, w):
    if self.inputs is not None and self.copies is None:
      raise ValueError("PureEdges(inputs=...) needs copies")
    lead = (() if self.copies is None else (self.copies,) if self.inputs is None
            else (self.inputs, self.copies))
    x0 = x if self.inputs is None else x[0]
    w0 = w[(0,) * len(lead)]
    init = lambda rng: self.op.init(rng, x0, w0, *self.static)
    if self.param_init is not None:
      make = lambda rng: self.param_init(rng, jax.eval_shape(init, rng)["params"], lead)
    elif self.copies is None:
      make = lambda rng: init(rng)["params"]
    else:
      make = lambda rng: jax.tree.map(
          lambda a: a.reshape(lead + a.shape[1:]),
          jax.vmap(lambda k: init(k)["params"])(jax.random.split(rng, math.prod(lead))))
    params = self.param("ops", make)
    # BN statistics start at mean 0, variance 1 (no need to trace the init again).
    stats = self.variable("batch_stats", "ops", lambda: jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.full(lead + s.shape, 1.0 if path[-1].key == "var" else 0.0,
                                 s.dtype),
        jax.eval_shape(init, jax.random.PRNGKey(0)).get("batch_stats", {})))

    # x is an argument, never a closure: late_remat's backward pass recomputes from it and
    # returns its cotangent.
    def one(p, s, x, w):
      y, new = self.op.apply({"params": p, "batch_stats": s}, x, w, *self.static,
                             mutable=["batch_stats"])
      return y, new.get("batch_stats", {})

    f = one if self.copies is None else jax.vmap(one, in_axes=(0, 0, None, 0))
    if self.inputs is not None:
      f = jax.vmap(f)
    if self.remat:
      f = late_remat(f)
    y, new_stats = f(params, stats.value, x, w)
    if self.train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
      stats.value = new_stats
    return y


def fan_in_uniform(rng, shapes, lead: tuple[int, ...] = ()):
  """Conv kernels (HWIO) drawn U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch's default
  and ``ops.conv_init``, all from ONE uniform draw (a ``PureEdges`` ``param_init``).

  Each flax initialiser is its own RNG computation (a threefry loop, plus a
  ``fold_in`` of its name): the DARTS-space supernet has ~1000 of them, which
  dominate its init program's compile time. Here a group of edges costs one. A kernel
  with axes before its HWIO ones (a stack of layers under ``nn.scan``) is a stack of
  independent kernels.
  """
  leaves, treedef = jax.tree.flatten(shapes)
  for leaf in leaves:
    if len(leaf.shape) < 4:
      raise ValueError(f"fan_in_uniform initialises conv kernels (HWIO), got shape {leaf.shape}")
  sizes = [math.prod(leaf.shape) for leaf in leaves]
  u = jax.random.uniform(rng, lead + (sum(sizes),), minval=-1.0, maxval=1.0)
  out, start = [], 0
  for leaf, n in zip(leaves, sizes):
    bound = 1.0 / math.sqrt(math.prod(leaf.shape[-4:-1]))
    out.append((u[..., start:start + n] * bound).reshape(lead + leaf.shape).astype(leaf.dtype))
    start += n
  return treedef.unflatten(out)
