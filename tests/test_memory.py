"""Seeds that do not fit a device run in chunks that do (jaxnas.memory): same results, or a
refusal up front that names what one seed needs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import memory
from jaxnas.strategies.darts import DartsConfig, DartsData, make_darts

from conftest import FAST_COMPILE

# The module alone on one core: 53.5 -> 39.0 s (conftest._library_compile_setting).
FAST_LIBRARY_COMPILE = True


def _data(n=32, image=8, classes=3):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (2 * n, image, image, 1), dtype=np.uint8)
  y = (x.reshape(2 * n, -1).mean(1) // (256 / classes)).astype(np.int32)
  return DartsData(*jax.device_put((x[:n], y[:n], x[n:], y[n:], np.float32([0.5]),
                                    np.float32([0.25]))))


def test_parse_limit(monkeypatch):
  monkeypatch.setenv("JAXNAS_MEMORY_LIMIT", "1.5G")
  assert memory.device_bytes() == int(1.5 * 2**30)
  monkeypatch.setenv("JAXNAS_MEMORY_LIMIT", "lots")
  with pytest.raises(memory.MemoryFitError, match="not a size"):
    memory.device_bytes()
  monkeypatch.delenv("JAXNAS_MEMORY_LIMIT")
  assert 0 < memory.device_bytes() < 2**50


def test_darts_epoch_in_seed_chunks_is_bit_identical(monkeypatch):
  """Three seeds of a DARTS epoch with a memory limit under what three need: chunks of
  fewer seeds, and every seed's state and metrics bitwise those of the one-vmap program;
  under what one seed needs, a refusal naming the need."""
  darts = make_darts(DartsConfig(epochs=1, steps_per_epoch=2, batch_size=8, channels=2,
                                 cells=1, num_classes=3))
  data = _data()
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(3))
  states = jax.jit(jax.vmap(darts.init, in_axes=(0, None)))(keys, data)
  monkeypatch.setenv("JAXNAS_MEMORY_LIMIT", str(2**40))
  full, chunk = memory.fit_seeds(darts.run_epoch, states, data, what="test", knobs="x",
                                 options=FAST_COMPILE)
  assert chunk == 3
  need = memory.program_bytes(full)
  monkeypatch.setenv("JAXNAS_MEMORY_LIMIT", str(need - 1))
  part, chunk = memory.fit_seeds(darts.run_epoch, states, data, what="test", knobs="x",
                                 options=FAST_COMPILE)
  assert 1 <= chunk < 3 and memory.program_bytes(part) < need
  a, b = full(states, data), part(states, data)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  monkeypatch.setenv("JAXNAS_MEMORY_LIMIT", "1K")
  with pytest.raises(memory.MemoryFitError, match=r"test: one seed needs .* lower --knob"):
    memory.fit_seeds(darts.run_epoch, states, data, what="test", knobs="--knob",
                     options=FAST_COMPILE)
