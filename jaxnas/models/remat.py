"""Rematerialisation that saves memory on every backend, and modules applied through it.

``late_remat(f)`` is ``jax.checkpoint`` with the recomputation pinned to the
backward pass; ``PureEdges`` runs a flax module as a pure function of its
variables (optionally ``vmap``-ped over copies sharing one input, optionally
through ``late_remat``). The supernets (models/supernet.py, models/darts_net.py)
build their mixed edges with it.
"""

from __future__ import annotations

from typing import Any

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
  """
  op: nn.Module
  static: tuple[Any, ...] = ()
  copies: int | None = None
  train: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x, w):
    w0 = w if self.copies is None else w[0]
    init = lambda rng: self.op.init(rng, x, w0, *self.static)
    if self.copies is None:
      make = lambda rng: init(rng)["params"]
    else:
      make = lambda rng: jax.vmap(lambda k: init(k)["params"])(
          jax.random.split(rng, self.copies))
    lead = () if self.copies is None else (self.copies,)
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
    if self.remat:
      f = late_remat(f)
    y, new_stats = f(params, stats.value, x, w)
    if self.train and self.is_mutable_collection("batch_stats") and not self.is_initializing():
      stats.value = new_stats
    return y
