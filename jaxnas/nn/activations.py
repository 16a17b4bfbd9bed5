"""Bounded activations that data-free proxies can see through: ``relu6`` and ``linearized``.

SynFlow (Tanaka et al. 2020) scores the network made linear by all-positive
parameters and input: a ReLU then passes everything, so the score is the sum
over input-output paths of the products of the weights. A bounded activation
breaks that: ReLU6 (MobileNetV2, Sandler et al. 2018) clips at 6, so once the
positive signal grows past it every member with a saturated layer scores the
same. ``relu6`` here is ReLU6, except while ``linearized()`` is tracing, where it is
its unbounded form (ReLU), the activation SynFlow's linear network assumes.
``jaxnas.estimators.zero_cost`` traces SynFlow under ``linearized()``; training and
every other proxy see ReLU6.
"""

from __future__ import annotations

import contextlib
import threading

import jax

_TRACE = threading.local()  # whether the trace in progress is linearized (trace time only)


@contextlib.contextmanager
def linearized():
  """Traces the enclosed computation with bounded activations unbounded (``relu6`` is ReLU)."""
  depth = getattr(_TRACE, "depth", 0)
  _TRACE.depth = depth + 1
  try:
    yield
  finally:
    _TRACE.depth = depth


def is_linearized() -> bool:
  """Whether the code being traced is inside ``linearized()``."""
  return getattr(_TRACE, "depth", 0) > 0


def relu6(x: jax.Array) -> jax.Array:
  """``jax.nn.relu6``: ``min(max(x, 0), 6)``; ``max(x, 0)`` under ``linearized()``."""
  return jax.nn.relu(x) if is_linearized() else jax.nn.relu6(x)
