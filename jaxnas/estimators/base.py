"""The evaluator protocol: a batch of architectures in, fitness out."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from jaxnas.spaces import Space


class Evaluator(NamedTuple):
  """Scores populations of architectures of one space.

  evaluate(key, archs) -> float32[B]: the search signal (higher is better, in
    percent for accuracies). NaN/inf marks a failed candidate; the search loop
    treats it as the worst possible score.
  report(archs) -> dict of float32[B]: what is reported for chosen
    architectures but never searched on (e.g. the test accuracy).
  jittable: whether ``evaluate`` can run inside jit/scan (the tabular
    benchmark can; real training is its own compiled program per call).
  setup_s: wall seconds spent building it that count against a search's time
    budget (training the SPOS supernet, over every run of its workdir).
  execution: the ``jaxnas.ops.Execution`` its networks compute with where it chose one
    (the SPOS supernet under a mesh); None: the backend's default (results.json names
    the convolutions, ``host_loop.compute_environment``).
  """

  name: str
  space: Space
  evaluate: Callable[[jax.Array, Any], jax.Array]
  report: Callable[[Any], dict]
  jittable: bool
  setup_s: float = 0.0
  execution: Any = None
