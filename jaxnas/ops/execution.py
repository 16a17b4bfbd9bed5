"""How the networks' primitives execute: the one place an execution choice lives.

An ``Execution`` names the ``conv2d`` and average-pool implementations a network computes
with. It is a field of every network module and of the configs that build them
(``TrainConfig``, ``DartsConfig``, ``SupernetConfig``, the zero-cost scorer), so a compiled
program, and every cache of compiled programs keyed on its config, is built for exactly
one choice. ``"auto"`` stands for the measured default of the backend (``conv_impl``,
``pool_impl``); ``resolve`` fills it in. All choices compute the same function: they differ
in speed per backend, and in float rounding.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxnas.ops.conv import check_conv_impl, conv_impl
from jaxnas.ops.pool import check_pool_impl, pool_impl

AUTO = "auto"


class Execution(NamedTuple):
  """``conv``: one of ``CONV_IMPLS``; ``pool``: one of ``POOL_IMPLS``; ``"auto"``: the
  backend's default (``resolve``)."""
  conv: str = AUTO
  pool: str = AUTO

  def resolve(self, backend: str | None = None) -> Execution:
    """This choice with ``"auto"`` (or None) replaced by ``backend``'s default (None: JAX's
    default backend); names are checked (a one-line ValueError). On CPU the conv default is
    oneDNN where its library builds, else ``"taps"`` with one line on stderr saying why
    (once per process)."""
    conv = conv_impl(backend) if self.conv in (None, AUTO) else check_conv_impl(self.conv)
    pool = pool_impl(backend) if self.pool in (None, AUTO) else check_pool_impl(self.pool)
    return Execution(conv, pool)

  def partitioned(self, mesh) -> Execution:
    """This choice for a program data-parallel over ``mesh`` (None: unchanged): a conv left
    ``"auto"`` is ``"im2col"``. The CPU default's oneDNN call is a custom call XLA's SPMD
    partitioner cannot split, and ``"taps"`` kernel gradients loop over batch chunks,
    which makes the partitioner gather the batch; ``"im2col"``'s matmuls contracting the
    batch become local sums and an all-reduce (a depthwise conv given ``"im2col"`` runs
    ``ops.depthwise_taps``, whose loop is over the taps, each on the device's part of the
    batch). A conv the caller named is kept."""
    if mesh is None or self.conv not in (None, AUTO):
      return self
    return self._replace(conv="im2col")
